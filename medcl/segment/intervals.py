"""Confidence intervals for the paired Dice difference of the label-efficiency benchmark.

For one label budget the benchmark gives per-test-case differences ``d = Dice_init - Dice_random`` shaped
``[K combinations, S seeds, C test cases]``. A *combination* is one draw of the labelled training volumes; the
``S`` seeds of a combination share those volumes, so they are **not** independent replicates. The same ``C``
test cases are evaluated for every combination: combinations and test cases are *crossed*.

Model
-----
``d[k, s, c] = mu + a_k + g_ks + b_c + e_ksc`` with independent zero-mean effects: ``a_k`` of the combination
(variance ``sa2``), ``g_ks`` of the seed within the combination (``sg2``), ``b_c`` of the test case (``sb2``),
``e_ksc`` residual (``se2``, which also holds any combination x case interaction: with one observation per
cell of the seed-averaged table it cannot be separated). ``mu`` is the difference we want, for a new draw of
labelled volumes *and* new test cases from the same populations.

Averaging the seeds inside a combination gives the ``[K, C]`` table ``y[k, c] = mu + A_k + b_c + E_kc`` with
``Var(A_k) = sa2 + sg2 / S =: sA2`` and ``Var(E_kc) = se2 / S =: sE2``: a balanced two-way crossed
random-effects model without replication (Searle, Casella & McCulloch 1992, *Variance Components*). The
estimate is the grand mean ``ybar`` and

    Var(ybar) = sA2 / K + sb2 / C + sE2 / (K C).

Two-way ANOVA mean squares and their expectations::

    MS_A = C / (K-1)          * sum_k (ybar_k. - ybar)^2                  E = sE2 + C sA2    df_A = K-1
    MS_B = K / (C-1)          * sum_c (ybar_.c - ybar)^2                  E = sE2 + K sb2    df_B = C-1
    MS_E = 1 / ((K-1)(C-1))   * sum_kc (y_kc - ybar_k. - ybar_.c + ybar)^2 E = sE2           df_E = (K-1)(C-1)

so ``(MS_A + MS_B - MS_E) / (K C)`` is unbiased for ``Var(ybar)``.

**Negative variance components.** The ANOVA estimates ``sA2^ = (MS_A - MS_E) / C`` and
``sb2^ = (MS_B - MS_E) / K`` can be negative. Each is truncated at zero (the usual rule for ANOVA estimates,
Searle et al. 1992), which gives

    V = max(MS_A, MS_E) + max(MS_B, MS_E) - MS_E,       Var(ybar)^ = V / (K C).

``V`` is at least ``max(MS_A, MS_B, MS_E)``, so the standard error is never below the one-way standard error
of either factor alone nor below the residual term, and never negative. A truncated component is set to zero
but its mean square is **not** pooled into the residual (pooling after a data-driven test shrinks the interval
and undercovers). Truncation only enlarges ``V`` relative to the unbiased estimate: slightly conservative.

**Degrees of freedom.** ``V`` is the linear combination ``sum_i c_i MS_i`` with ``c_A = 1[MS_A > MS_E]``,
``c_B = 1[MS_B > MS_E]`` and ``c_E = 1 - c_A - c_B`` (in {1, 0, -1}); Satterthwaite's approximation
(Satterthwaite 1946, Biometrics Bulletin 2(6):110-114)

    nu = V^2 / sum_i (c_i MS_i)^2 / df_i

gives the degrees of freedom of the t interval ``ybar +- t_{(1+level)/2, nu} sqrt(V / (K C))`` (the
Cochran-Satterthwaite interval; Burdick & Graybill 1992, *Confidence Intervals on Variance Components*; it is
the interval form of Clark's quasi-F' for subjects x items designs, Clark 1973, "The language-as-fixed-effect
fallacy"). When the combination term dominates, as it does in the benchmark, ``nu`` is close to ``K - 1``:
with few combinations the interval is necessarily wide. That is the honest price of few label draws, not a
defect of the method -- with ``K = 3`` no valid interval can be narrow.

Simulated on the benchmark design (3 seeds x 16 cases, combination SD 0.05, seed SD 0.02, residual SD 0.03,
case SD 0.02 or 0.08; 20000 draws per cell) the 95% interval covered the truth in 0.934 / 0.938 (K = 3) and
0.945 / 0.949 (K = 5) of draws: like Welch's test, the Satterthwaite interval is slightly liberal when its df
are near 2. Using the smallest df of the retained terms instead would cover 0.96-0.995 but cut the power to
detect +0.10 at K = 3 from 0.49 / 0.58 to 0.44 / 0.23, so the Satterthwaite df are kept.

Why not a bootstrap over runs and cases
---------------------------------------
The former report (``bench_report.paired_bootstrap``, removed; reproduced here as :func:`crossed_bootstrap`) resampled
the ``K x S`` (combination, seed) runs and the test cases independently. Seeds of one combination share the
combination effect, so treating them as independent units divides ``sA2`` by ``K S`` instead of ``K``; with
3 combinations x 3 seeds the "95%" interval covered the truth about half the time. Even resampling the right
units, naive bootstraps of crossed random effects misestimate the variance (Owen 2007, "The pigeonhole
bootstrap", Ann. Appl. Stat. 1(2):386-411; McCullagh 2000, "Resampling and exchangeable arrays", Bernoulli
6(2):285-301), and percentile intervals over 3-5 units are too narrow anyway; the variance-components t
interval stays close to nominal (above).

Edge cases
----------
* ``K == 1``: the combination variance cannot be estimated, so no interval over independent units exists: the
  result has the mean, ``lo = -inf``, ``hi = +inf``, ``df = 0`` and says so in ``note``.
* ``C == 1``: the case variance cannot be estimated: the interval is the one-way t interval over the ``K``
  seed-averaged combination means, *conditional on that single test case*, and ``note`` says so.
* ``NaN`` entries: first runs (combination, seed) that are NaN for *every* case are dropped (a failed run; the
  combination keeps its other seeds, a combination left without seeds is dropped); then every test case that
  is NaN in *any* remaining run is dropped, so the table stays balanced and crossed. Counts are reported.
* A ``[K, C]`` input is read as ``S = 1`` (or an already seed-averaged table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["IntervalResult", "CrossedT", "crossed_t_interval", "hierarchical_interval", "crossed_bootstrap"]

HIERARCHICAL_UNIT = "combination x test case (crossed, both random; seeds averaged within each combination)"
HIERARCHICAL_METHOD = "two-way crossed random-effects t (ANOVA variance components, Satterthwaite df)"
BOOTSTRAP_UNIT = "run (combination x seed, treated as independent) x test case"
BOOTSTRAP_METHOD = "crossed percentile bootstrap over runs and test cases (the former report; undercovers)"


@dataclass(frozen=True)
class IntervalResult:
    """A mean and its ``level`` interval, with what was resampled / modelled and the diagnostics.

    ``var_combination``, ``var_case`` and ``var_residual`` are the (truncated) variance components of the
    seed-averaged table (``sA2``, ``sb2``, ``sE2`` of the module doc); ``se`` the standard error of ``mean``;
    ``df`` the Satterthwaite degrees of freedom. Fields that a method does not estimate are NaN.
    """

    mean: float
    lo: float
    hi: float
    level: float
    unit: str
    method: str
    se: float = math.nan
    df: float = math.nan
    var_combination: float = math.nan
    var_case: float = math.nan
    var_residual: float = math.nan
    ms_combination: float = math.nan
    ms_case: float = math.nan
    ms_residual: float = math.nan
    n_combinations: int = 0
    n_seeds: int = 0
    n_cases: int = 0
    n_cases_dropped: int = 0
    n_runs_dropped: int = 0
    note: str = ""

    @property
    def finite(self) -> bool:
        """Whether the interval has finite bounds."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)


class CrossedT(NamedTuple):
    """Batched result of :func:`crossed_t_interval`; every field has the batch shape ``[...]``."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    se: np.ndarray
    df: np.ndarray
    var_combination: np.ndarray
    var_case: np.ndarray
    var_residual: np.ndarray
    ms_combination: np.ndarray
    ms_case: np.ndarray
    ms_residual: np.ndarray


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def crossed_t_interval(y: ArrayLike, level: float = 0.95) -> CrossedT:
    """Two-way crossed random-effects t interval of the grand mean of ``y [..., K, C]`` (module doc).

    ``y`` is the seed-averaged table (combinations x test cases), finite, ``K >= 2`` and ``C >= 2``; leading
    dimensions are a batch (e.g. simulations) and are computed at once. A table without any variation gives
    ``se = 0``, ``df = inf`` and ``lo = hi = mean``.
    """
    _check_level(level)
    t = np.asarray(y, dtype=np.float64)
    if t.ndim < 2:
        raise ValueError(f"y must be [..., K, C], got shape {t.shape}")
    k, c = t.shape[-2:]
    if k < 2 or c < 2:
        raise ValueError(f"crossed_t_interval needs K >= 2 and C >= 2, got K={k}, C={c}")
    m = t.mean(axis=(-2, -1))
    row = t.mean(axis=-1)  # [..., K]
    col = t.mean(axis=-2)  # [..., C]
    df_a, df_b, df_e = k - 1, c - 1, (k - 1) * (c - 1)
    ms_a = c * ((row - m[..., None]) ** 2).sum(axis=-1) / df_a
    ms_b = k * ((col - m[..., None]) ** 2).sum(axis=-1) / df_b
    resid = t - row[..., :, None] - col[..., None, :] + m[..., None, None]
    ms_e = (resid**2).sum(axis=(-2, -1)) / df_e

    c_a = (ms_a > ms_e).astype(np.float64)  # component kept (estimate > 0), else truncated at 0
    c_b = (ms_b > ms_e).astype(np.float64)
    c_e = 1.0 - c_a - c_b
    v = c_a * ms_a + c_b * ms_b + c_e * ms_e  # = max(MS_A, MS_E) + max(MS_B, MS_E) - MS_E >= 0
    denom = (c_a * ms_a) ** 2 / df_a + (c_b * ms_b) ** 2 / df_b + (c_e * ms_e) ** 2 / df_e
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, v**2 / np.where(denom > 0, denom, 1.0), np.inf)
    se = np.sqrt(np.maximum(v, 0.0) / (k * c))
    q = stats.t.ppf(0.5 + level / 2.0, df)
    half = np.where(se > 0, q * se, 0.0)
    return CrossedT(mean=m, lo=m - half, hi=m + half, se=se, df=df,
                    var_combination=np.maximum(ms_a - ms_e, 0.0) / c,
                    var_case=np.maximum(ms_b - ms_e, 0.0) / k, var_residual=ms_e,
                    ms_combination=ms_a, ms_case=ms_b, ms_residual=ms_e)


def _clean(diff: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Seed-averaged ``[K', C']`` table after the NaN rule, ``S`` (max seeds kept), cases and runs dropped."""
    k, s, c = diff.shape
    nan = np.isnan(diff)
    dead_run = nan.all(axis=-1)  # [K, S]: failed runs
    live = ~dead_run
    n_runs_dropped = int(dead_run.sum()) if c else 0
    bad_case = (nan & live[:, :, None]).any(axis=(0, 1))  # NaN in any remaining run
    keep_k = live.any(axis=1)
    d = np.where(live[:, :, None], diff, 0.0)[:, :, ~bad_case]
    y = d.sum(axis=1)[keep_k] / live.sum(axis=1)[keep_k][:, None]
    s_kept = int(live.sum(axis=1).max()) if live.any() else 0
    return y, s_kept, int(bad_case.sum()), n_runs_dropped


def hierarchical_interval(diff: ArrayLike, level: float = 0.95) -> IntervalResult:
    """Mean of the paired differences ``diff [K combinations, S seeds, C test cases]`` and its ``level``
    interval with combinations and test cases as crossed random factors (seeds averaged within a combination).

    ``diff`` may also be ``[K, C]`` (one seed, or already seed-averaged). NaN entries, ``K == 1`` and
    ``C == 1`` follow the rules of the module doc; an empty input (or nothing left after the NaN rule) gives
    NaN everywhere.
    """
    _check_level(level)
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 2:
        d = d[:, None, :]
    if d.ndim != 3:
        raise ValueError(f"diff must be [K, S, C] or [K, C], got shape {d.shape}")
    base = dict(level=level, unit=HIERARCHICAL_UNIT, method=HIERARCHICAL_METHOD)
    if d.size == 0:
        return IntervalResult(math.nan, math.nan, math.nan, note="no data", **base)
    y, s, n_drop, n_runs_drop = _clean(d)
    k, c = y.shape
    counts = dict(n_combinations=k, n_seeds=s, n_cases=c, n_cases_dropped=n_drop, n_runs_dropped=n_runs_drop)
    if y.size == 0:
        return IntervalResult(math.nan, math.nan, math.nan, **base, **counts,
                              note="no complete test case left after dropping NaN")
    mean = float(y.mean())
    if k == 1:
        return IntervalResult(mean, -math.inf, math.inf, df=0.0, **base, **counts,
                              note="one combination: the combination variance cannot be estimated, so "
                                   "there is no interval over independent units (infinite by construction)")
    if c == 1:
        ms_a = float(y[:, 0].var(ddof=1))
        se = math.sqrt(ms_a / k)
        q = float(stats.t.ppf(0.5 + level / 2.0, k - 1))
        half = q * se if se > 0 else 0.0
        return IntervalResult(mean, mean - half, mean + half, se=se, df=float(k - 1), ms_combination=ms_a,
                              **base, **counts,
                              note="one test case: case variance not estimable; one-way t interval over "
                                   "combinations, conditional on that test case")
    r = crossed_t_interval(y, level)
    return IntervalResult(mean, float(r.lo), float(r.hi), se=float(r.se), df=float(r.df),
                          var_combination=float(r.var_combination), var_case=float(r.var_case),
                          var_residual=float(r.var_residual), ms_combination=float(r.ms_combination),
                          ms_case=float(r.ms_case), ms_residual=float(r.ms_residual), **base, **counts)


def crossed_bootstrap(diff_runs_by_cases: ArrayLike, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> IntervalResult:
    """The former report's interval: ``diff_runs_by_cases [R runs, C cases]`` with rows = (combination, seed)
    runs, resampled as if independent, crossed with resampled test cases; percentile interval.

    The same statistics and random draws as the former ``bench_report.paired_bootstrap`` (kept for comparison: it treats
    seeds of one combination as independent and undercovers, see the module doc).
    """
    _check_level(level)
    d = np.asarray(diff_runs_by_cases, dtype=np.float64)
    base = dict(level=level, unit=BOOTSTRAP_UNIT, method=BOOTSTRAP_METHOD)
    if d.size == 0:
        return IntervalResult(math.nan, math.nan, math.nan, note="no data", **base)
    r, c = d.shape
    rng = np.random.default_rng(seed)
    ri = rng.integers(0, r, size=(n_boot, r))
    ci = rng.integers(0, c, size=(n_boot, c))
    boot = d[ri[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(boot, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    se = float(boot.std(ddof=1)) if n_boot > 1 else 0.0
    return IntervalResult(float(d.mean()), float(lo), float(hi), se=se, n_cases=c, **base)
