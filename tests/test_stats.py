"""The compare report's statistics against independent computations: scipy's t-tests and
bootstrap, Holm's adjustment worked by hand, Student-t intervals and medians in closed form."""
import math

import numpy as np
import pytest
from scipy import stats as sp

import stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_and_welch_p_values_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed * 4
    a = rng.normal(30, 3, n)
    b = a + rng.normal(-2, 1, n)  # correlated: the paired test is the stronger one here
    paired = stats.t_test(a, b, paired=True)
    ref = sp.ttest_rel(a, b)
    assert paired.kind == "paired" and paired.df == n - 1
    assert paired.t == pytest.approx(ref.statistic, rel=1e-12) and paired.p == pytest.approx(ref.pvalue, rel=1e-9)
    c = rng.normal(33, 6, n + 2)  # another size and spread
    welch = stats.t_test(a, c, paired=False)
    ref = sp.ttest_ind(a, c, equal_var=False)
    assert welch.kind == "welch" and welch.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert welch.t == pytest.approx(ref.statistic, rel=1e-12) and welch.df == pytest.approx(ref.df, rel=1e-12)


def test_t_tests_without_spread_give_no_p_value():
    assert math.isnan(stats.t_test([1, 2, 3], [0, 1, 2], paired=True).p)  # every difference is 1
    assert math.isnan(stats.t_test([5, 5], [5, 5], paired=False).p)


def test_holm_equals_the_hand_worked_case():
    # sorted: 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04; made non-decreasing
    # -> 0.02, 0.03, 0.06, 0.06; in the order given:
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # capped at 1 only where it would pass it
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.2]) == [0.2] and stats.holm([]) == []
    try:  # a peer implementation, where one happens to be installed (not a dependency)
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    p = np.random.default_rng(0).uniform(0, 0.2, 7)
    assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_bootstrap_interval_agrees_with_scipy_and_resamples_pairs_together():
    rng = np.random.default_rng(5)
    a = rng.normal(30, 3, 40)
    b = a + rng.normal(-2, 0.5, 40)
    ours = stats.bootstrap_diff_ci(a, b, paired=True, resamples=20_000)
    ref = sp.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True, method="percentile",
                       n_resamples=20_000, rng=np.random.default_rng(1)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.02)  # Monte Carlo error of either, ~0.005
    ours = stats.bootstrap_diff_ci(a, b, paired=False, resamples=20_000)
    ref = sp.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), method="percentile",
                       n_resamples=20_000, rng=np.random.default_rng(1)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.1)  # width ~2.6: a paired one would be ~0.3
    assert stats.bootstrap_diff_ci(a, b, paired=True) == stats.bootstrap_diff_ci(a, b, paired=True)  # seeded


def test_summary_interval_is_student_t():
    s = stats.summarize([30, 32, 34])
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975) at 2 degrees of freedom, closed form (2p-1)/sqrt(2p(1-p))
    half = t * 2 / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, 32, 2) and s.ci95 == pytest.approx((32 - half, 32 + half), rel=1e-12)
    one = stats.summarize([7.0])
    assert one.n == 1 and one.mean == 7 and math.isnan(one.std) and all(map(math.isnan, one.ci95))


@pytest.mark.parametrize("steps, median, low, high, never", [
    ([500, 1000, 700], 700, 500, 1000, 0),
    ([500, None, 1000], 1000, 500, 1000, 1),  # the never sorts last: the middle run reached at 1000
    ([500, 1000, None, 400], 750, 400, 1000, 1),
    ([500, None, None, 400], math.inf, 400, 500, 2),  # half never got there: no finite median
    ([None, None], math.inf, math.nan, math.nan, 2),
])
def test_reach_median_range_and_nevers(steps, median, low, high, never):
    r = stats.reach_summary(steps)
    assert (r.median, r.never, r.runs) == (median, never, len(steps))
    assert (r.low, r.high) == (low, high) or (math.isnan(r.low) and math.isnan(low))
