"""Cross-validation folds: stratified, grouped by patient, seeded; imbalance by subsampling a class.

* Without patients, each class's bags are shuffled and dealt round-robin over the ``k`` folds (the
  round-robin continues from one class to the next), so every fold's class counts differ by at most one.
* With patients, whole patients are assigned greedily (the scheme of scikit-learn's
  ``StratifiedGroupKFold``, written here without the dependency): patients are shuffled, ordered by how
  unevenly their bags spread over the classes (most uneven first), and each goes to the fold that keeps the
  class proportions across folds most even (smallest mean over classes of the standard deviation over folds
  of the fraction of that class's bags in the fold), ties to the fold with fewest bags. One patient's bags
  are therefore always in the same fold: they never straddle train and test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medcl.core.errors import MedclConfigError


def stratified_group_kfold(
    labels: Sequence[int] | np.ndarray, k: int, seed: int, groups: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Test indices of each of the ``k`` folds (a partition of ``range(n)``).

    Args:
        labels: ``[n]`` class index per bag.
        k: number of folds (>= 2).
        seed: shuffling seed (a different seed gives different folds).
        groups: ``[n]`` patient id per bag, or ``None`` (every bag its own group).

    Raises:
        MedclConfigError (``cv.folds``): more folds than bags or patients, or a fold left empty.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1, dtype=np.int64)
    if groups is None:
        if k > n:
            raise MedclConfigError("cv.folds", f"{k} folds for {n} bags")
        start = 0
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            fold[idx] = (start + np.arange(len(idx))) % k
            start += len(idx)
    else:
        g = np.asarray([str(x) for x in groups])
        names, gid = np.unique(g, return_inverse=True)
        if k > len(names):
            raise MedclConfigError("cv.folds", f"{k} folds for {len(names)} patients")
        classes = np.unique(y)
        cidx = np.searchsorted(classes, y)
        counts = np.zeros((len(names), len(classes)))
        np.add.at(counts, (gid, cidx), 1)
        order = rng.permutation(len(names))
        order = order[np.argsort(-counts[order].std(axis=1), kind="stable")]
        per_fold = np.zeros((k, len(classes)))
        totals = counts.sum(0)
        for gi in order:
            trial = per_fold[None, :, :] + np.eye(k)[:, :, None] * counts[gi][None, None, :]  # [k, k, C]
            spread = (trial / totals).std(axis=1).mean(axis=1)  # [k]
            best = np.flatnonzero(np.isclose(spread, spread.min()))
            choice = best[np.argmin(per_fold[best].sum(1))]
            per_fold[choice] += counts[gi]
            fold[gid == gi] = choice
    out = [np.flatnonzero(fold == f) for f in range(k)]
    if any(len(f) == 0 for f in out):
        raise MedclConfigError("cv.folds", f"{k} folds leave a fold without bags")
    return out


def subsample_class(
    train_idx: np.ndarray, labels: Sequence[int] | np.ndarray, positive: int, ratio: float, seed: int, min_keep: int = 2
) -> np.ndarray:
    """Drop random bags of class ``positive`` from ``train_idx`` so that they make up ``ratio`` of the bags.

    With ``n_other`` bags of the other classes, ``round(ratio / (1 - ratio) * n_other)`` positive bags are
    kept (at least ``min_keep``, at most all of them), so ``kept / (kept + n_other) ~= ratio``. A fold with a
    smaller natural fraction is left as it is. Order of ``train_idx`` is preserved.
    """
    if not 0 < ratio < 1:
        raise MedclConfigError("cv.imbalance", f"must be in (0, 1), got {ratio}")
    y = np.asarray(labels)[train_idx]
    pos = train_idx[y == positive]
    n_other = int((y != positive).sum())
    n_keep = int(min(len(pos), max(min_keep, round(ratio / (1.0 - ratio) * n_other))))
    kept = np.random.default_rng(seed).choice(pos, size=n_keep, replace=False)
    return train_idx[(y != positive) | np.isin(train_idx, kept)]
