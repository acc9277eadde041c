"""Intervals of the paired Dice difference (medcl.segment.intervals): exact small cases, then a seeded
simulation of the benchmark design (K combinations x 3 seeds x 16 test cases, seeds share their combination's
labelled volumes, test cases crossed with combinations) for the coverage and power of the crossed
random-effects t interval and the undercoverage of the former crossed bootstrap over (combination, seed)
runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medcl.segment.intervals import crossed_bootstrap, crossed_t_interval, hierarchical_interval

# ---- exact small cases -------------------------------------------------------------------------------------


def test_no_variation_gives_a_zero_width_interval():
    r = hierarchical_interval(np.full((3, 2, 5), 0.1))
    assert r.mean == pytest.approx(0.1)
    assert r.lo == pytest.approx(r.mean, abs=1e-12) and r.hi == pytest.approx(r.mean, abs=1e-12)
    assert r.se == pytest.approx(0.0, abs=1e-12)
    assert (r.n_combinations, r.n_seeds, r.n_cases) == (3, 2, 5)


def test_hand_computed_2x3_matches_anova_formulas():
    # y = 5 + a_k + b_c + r_kc with a = (-3, 3), b = (-2, 0, 2), r = [[1, -2, 1], [-1, 2, -1]]
    y = np.array([[1.0, 0.0, 5.0], [5.0, 10.0, 9.0]])
    # MS_A = 3 * (9 + 9) / 1 = 54; MS_B = 2 * (4 + 0 + 4) / 2 = 8; MS_E = (1+4+1+1+4+1) / 2 = 6
    # both components positive: V = 54 + 8 - 6 = 56, Var(mean) = 56 / 6
    # Satterthwaite: nu = 56^2 / (54^2/1 + 8^2/2 + 6^2/2) = 3136 / 2966
    # two seeds per combination averaging to y: the seed average is what is analysed
    diff = np.stack([y + 0.25, y - 0.25], axis=1)  # [2, 2, 3]
    r = hierarchical_interval(diff)
    nu = 3136 / 2966
    half = stats.t.ppf(0.975, nu) * math.sqrt(56 / 6)
    assert r.mean == pytest.approx(5.0)
    assert (r.ms_combination, r.ms_case, r.ms_residual) == pytest.approx((54.0, 8.0, 6.0))
    assert (r.var_combination, r.var_case, r.var_residual) == pytest.approx((16.0, 1.0, 6.0))
    assert r.df == pytest.approx(nu)
    assert r.se == pytest.approx(math.sqrt(56 / 6))
    assert (r.lo, r.hi) == pytest.approx((5.0 - half, 5.0 + half))
    assert r.n_seeds == 2 and r.finite


def test_negative_component_is_truncated_at_zero():
    # MS_A = 1.5 < MS_E = 3.5 < MS_B = 4.5: the combination component is set to 0 (not pooled), so
    # V = max(MS_A, MS_E) + max(MS_B, MS_E) - MS_E = MS_B = 4.5 with df = df_B = 2
    y = np.array([[1.0, 2.0, 6.0], [3.0, 5.0, 4.0]])
    r = hierarchical_interval(y)
    assert (r.ms_combination, r.ms_case, r.ms_residual) == pytest.approx((1.5, 4.5, 3.5))
    assert (r.var_combination, r.var_case, r.var_residual) == pytest.approx((0.0, 0.5, 3.5))
    assert r.df == pytest.approx(2.0)
    half = stats.t.ppf(0.975, 2.0) * math.sqrt(4.5 / 6)
    assert (r.lo, r.hi) == pytest.approx((3.5 - half, 3.5 + half))


def test_nan_case_is_dropped_and_failed_run_is_dropped():
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 0.05, (3, 2, 6))
    ref = hierarchical_interval(np.delete(d, 4, axis=2))
    d_nan = d.copy()
    d_nan[1, 0, 4] = np.nan  # case 4 missing in one run -> case 4 dropped everywhere
    r = hierarchical_interval(d_nan)
    assert (r.n_cases, r.n_cases_dropped, r.n_runs_dropped) == (5, 1, 0)
    assert (r.mean, r.lo, r.hi) == pytest.approx((ref.mean, ref.lo, ref.hi))

    d_run = d.copy()
    d_run[2, 1, :] = np.nan  # a failed run: combination 2 keeps its other seed, no case is dropped
    r = hierarchical_interval(d_run)
    y = d.mean(axis=1)
    y[2] = d[2, 0]
    ref = hierarchical_interval(y)
    assert (r.n_combinations, r.n_cases, r.n_cases_dropped, r.n_runs_dropped) == (3, 6, 0, 1)
    assert (r.mean, r.lo, r.hi) == pytest.approx((ref.mean, ref.lo, ref.hi))

    d_all = d.copy()
    d_all[0, 0, ::2] = np.nan
    d_all[1, 1, 1::2] = np.nan  # every case NaN in some run
    r = hierarchical_interval(d_all)
    assert r.n_cases == 0 and math.isnan(r.mean) and math.isnan(r.lo) and math.isnan(r.hi)
    assert math.isnan(hierarchical_interval(np.zeros((0, 3, 4))).mean)


def test_single_combination_gives_no_finite_interval():
    d = np.random.default_rng(2).normal(0.1, 0.05, (1, 3, 8))
    r = hierarchical_interval(d)
    assert r.mean == pytest.approx(d.mean())
    assert r.lo == -math.inf and r.hi == math.inf and not r.finite and r.df == 0
    assert "one combination" in r.note


def test_single_case_gives_the_one_way_interval_conditional_on_that_case():
    d = np.random.default_rng(3).normal(0.1, 0.05, (4, 3, 1))
    r = hierarchical_interval(d)
    m = d.mean(axis=(1, 2))
    half = stats.t.ppf(0.975, 3) * m.std(ddof=1) / 2.0
    assert (r.mean, r.lo, r.hi, r.df) == pytest.approx((m.mean(), m.mean() - half, m.mean() + half, 3.0))
    assert "conditional" in r.note


def test_batched_table_interval_equals_the_single_one():
    d = np.random.default_rng(4).normal(0.0, 0.05, (7, 3, 2, 5))
    b = crossed_t_interval(d.mean(axis=2), level=0.9)
    for i in range(d.shape[0]):
        r = hierarchical_interval(d[i], level=0.9)
        assert (r.mean, r.lo, r.hi, r.df) == pytest.approx((b.mean[i], b.lo[i], b.hi[i], b.df[i]))
    with pytest.raises(ValueError):
        hierarchical_interval(d[0], level=1.5)


def test_crossed_bootstrap_is_the_former_runs_by_cases_procedure():
    """The former report's statistic: a constant table gives a zero-width interval; identical runs leave only the
    case resampling, whose percentile interval lies inside the range of the case means."""
    r = crossed_bootstrap(np.full((3, 5), 0.1), n_boot=200, seed=0)
    assert (r.mean, r.lo, r.hi) == pytest.approx((0.1, 0.1, 0.1))
    cases = np.linspace(-0.1, 0.3, 16)
    r = crossed_bootstrap(np.tile(cases, (9, 1)), n_boot=500, seed=3)
    assert r.mean == pytest.approx(cases.mean()) and cases.min() < r.lo < r.mean < r.hi < cases.max()


# ---- simulation of the benchmark design ----------------------------------------------------------------

N_SIM = 400
N_SEEDS, N_CASES = 3, 16
SD_COMBINATION, SD_SEED, SD_RESIDUAL = 0.05, 0.02, 0.03
CELLS = [(k, sd_case) for k in (3, 5) for sd_case in (0.02, 0.08)]
EFFECT = 0.10
OLD_BOOT = 300


def _simulate(rng: np.random.Generator, k: int, sd_case: float, delta: float) -> np.ndarray:
    """``[N_SIM, K, S, C]``: delta + combination + case (crossed) + seed-in-combination + residual."""
    a = rng.normal(0.0, SD_COMBINATION, (N_SIM, k, 1, 1))
    b = rng.normal(0.0, sd_case, (N_SIM, 1, 1, N_CASES))
    g = rng.normal(0.0, SD_SEED, (N_SIM, k, N_SEEDS, 1))
    e = rng.normal(0.0, SD_RESIDUAL, (N_SIM, k, N_SEEDS, N_CASES))
    return delta + a + b + g + e


@pytest.fixture(scope="module")
def simulations() -> dict[tuple[int, float], tuple[np.ndarray, np.ndarray]]:
    """Per cell ``(K, case SD)``: (null draws, draws with the true effect), each ``[N_SIM, K, S, C]``."""
    out = {}
    for i, (k, sd_case) in enumerate(CELLS):
        rng = np.random.default_rng(1000 + i)
        out[(k, sd_case)] = (_simulate(rng, k, sd_case, 0.0), _simulate(rng, k, sd_case, EFFECT))
    return out


def _fmt(d: dict[tuple[int, float], float]) -> str:
    return ", ".join(f"K={k} case SD={s}: {v:.3f}" for (k, s), v in d.items())


def test_hierarchical_interval_covers_zero_in_every_cell(simulations):
    # measured with these seeds: K=3: 0.912 / 0.948, K=5: 0.953 / 0.943 (case SD 0.02 / 0.08). With 20000
    # draws the true coverage is 0.934 / 0.938 / 0.945 / 0.949: Satterthwaite is slightly liberal when df ~ 2
    # (as Welch's test is), the 400-draw estimate has SE ~0.012.
    cover = {}
    for cell, (null, _) in simulations.items():
        r = crossed_t_interval(null.mean(axis=2))  # seeds averaged within combination, all sims at once
        cover[cell] = float(np.mean((r.lo <= 0.0) & (r.hi >= 0.0)))
    assert all(c >= 0.90 for c in cover.values()), f"coverage below 0.90: {_fmt(cover)}"


def test_hierarchical_interval_finds_a_true_effect(simulations):
    # What is achievable: Var(mean) ~ (0.05^2 + 0.02^2/3)/K + case_SD^2/16 + 0.03^2/(3*16*K). With K=3 this is
    # dominated by 3 combination means, so any valid interval has ~2-5 df: a t test on the K combination means
    # (df = K-1) has power 0.44 / 0.35 (case SD 0.02 / 0.08) at K=3 and 0.88 / 0.69 at K=5 (noncentral t);
    # even knowing the variance exactly (z, not achievable) gives only 0.91 / 0.80 at K=3.
    # Measured here: K=3: 0.465 / 0.525, K=5: 0.895 / 0.838, pooled 0.681 (20000 draws: 0.487 / 0.582 /
    # 0.893 / 0.831; Satterthwaite df > K-1 when the case term contributes, hence above the df=K-1 numbers).
    power = {}
    for cell, (_, alt) in simulations.items():
        r = crossed_t_interval(alt.mean(axis=2))
        power[cell] = float(np.mean(r.lo > 0.0))
    pooled = float(np.mean(list(power.values())))
    msg = f"power per cell: {_fmt(power)}; pooled {pooled:.3f}"
    assert pooled > 0.5, msg
    for sd_case in (0.02, 0.08):
        assert power[(5, sd_case)] > power[(3, sd_case)], msg


def test_former_crossed_bootstrap_undercovers(simulations):
    # measured: K=3: 0.632 / 0.820, K=5: 0.688 / 0.830 (case SD 0.02 / 0.08) -- seeds of a combination
    # counted as independent runs divide the combination variance by K*S instead of K
    cover = {}
    for cell, (null, _) in simulations.items():
        k = cell[0]
        hits = [crossed_bootstrap(d.reshape(k * N_SEEDS, N_CASES), n_boot=OLD_BOOT, seed=j)
                for j, d in enumerate(null)]
        cover[cell] = float(np.mean([h.lo <= 0.0 <= h.hi for h in hits]))
    assert min(cover.values()) < 0.90, f"the old procedure unexpectedly covered in every cell: {_fmt(cover)}"


def test_forest_plot_draws_the_tables_intervals(tmp_path):
    """paired_differences.png: one interval per (init vs reference, budget), the same hierarchical interval as the
    results table; a planted +0.1 gain is drawn as a gain and a zero effect is not."""
    from medcl.segment.bench_report import difference_intervals, plot_paired_differences

    g = np.random.default_rng(0)
    rows = []
    for k in range(5):
        ck = g.normal(0, 0.03)
        for s in range(3):
            for c in range(16):
                base = 0.6 + g.normal(0, 0.05)
                for init, shift in (("random", 0.0), ("good", 0.1 + ck), ("same", ck)):
                    rows.append({"init": init, "budget": "2", "combination": k, "seed": s, "case": f"c{c}",
                                 "lr": "0.001", "dice": base + shift + g.normal(0, 0.02)})
    lr_of = {(i, "2"): "0.001" for i in ("random", "good", "same")}
    refs = {"good": "random", "same": "random"}
    entries = difference_intervals(rows, inits=["random", "good", "same"], references=refs, lr_of=lr_of)
    assert [(i, r, b) for i, r, b, _ in entries] == [("good", "random", "2"), ("same", "random", "2")]
    from medcl.segment.bench_report import paired_differences

    expected = hierarchical_interval(paired_differences(rows, "good", "random", "2", lr_of))
    assert entries[0][3].lo == expected.lo and entries[0][3].hi == expected.hi
    assert entries[0][3].lo > 0 and entries[1][3].lo < 0 < entries[1][3].hi
    out = plot_paired_differences(rows, tmp_path / "paired_differences.png", inits=["random", "good", "same"],
                                  references=refs, lr_of=lr_of)
    assert out is not None and out.stat().st_size > 1000
