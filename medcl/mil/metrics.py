"""Bag classification metrics: accuracy, balanced accuracy, AUC (one-vs-rest for multi-class), F1.

NumPy / SciPy (scikit-learn is not a dependency); each function matches scikit-learn's definition named in
its docstring, and the tests check them against slow, obviously correct loops.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of bags classified correctly."""
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else math.nan


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (``sklearn.metrics.balanced_accuracy_score``)."""
    y, pred = np.asarray(y), np.asarray(pred)
    classes = np.unique(y)
    if len(classes) == 0:
        return math.nan
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes]))


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for ``y in {0, 1}``: the Mann-Whitney U statistic with ties counted 1/2.

    ``nan`` when only one class is present.
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks of tied scores
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC of ``probs`` ``[n, K]``: binary AUC of class 1 when ``K == 2``, else the macro average of the
    one-vs-rest AUCs over the classes present in ``y`` (``roc_auc_score(multi_class="ovr", average="macro")``
    restricted to present classes); ``nan`` when fewer than two classes are present."""
    y = np.asarray(y)
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return binary_auc(y == 1, probs[:, 1])
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    return float(np.mean([binary_auc(y == c, probs[:, c]) for c in present]))


def f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """F1 of class 1 when ``n_classes == 2`` (``f1_score`` default), else the macro F1 over the classes present
    in ``y`` or ``pred``; a class with no true and no predicted bag is skipped, an empty F1 is 0."""
    y, pred = np.asarray(y), np.asarray(pred)

    def one(c: int) -> float:
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        return 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))

    if n_classes == 2:
        return one(1)
    present = np.union1d(np.unique(y), np.unique(pred))
    return float(np.mean([one(int(c)) for c in present])) if len(present) else math.nan


def bag_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All four metrics from labels ``[n]`` and probabilities ``[n, K]`` (prediction = argmax)."""
    probs = np.asarray(probs)
    pred = probs.argmax(1)
    return {
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "auc": auc(y, probs),
        "f1": f1(y, pred, probs.shape[1]),
    }
