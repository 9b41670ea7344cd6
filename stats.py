"""The statistics of the compare report, on plain numbers: summaries with Student-t
intervals, paired and Welch t-tests, Holm's step-down adjustment, a seeded bootstrap
interval of a difference of means, and the reach of a target over runs. No torch, no file;
scipy.special only (its t distribution), imported where needed: scipy.stats costs ~0.5 s."""
import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same interval on every call


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # ddof=1; nan when n = 1
    ci95: tuple  # Student t; (nan, nan) when n = 1


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return Summary(n, mean, math.nan, (math.nan, math.nan))
    std = float(x.std(ddof=1))
    from scipy import special
    half = float(special.stdtrit(n - 1, 0.975)) * std / math.sqrt(n)
    return Summary(n, mean, std, (mean - half, mean + half))


@dataclass
class TTest:
    kind: str  # "paired" or "welch"
    t: float
    df: float
    p: float  # two-sided; nan when the difference has no spread (t is 0/0 or x/0)


def t_test(a, b, paired: bool) -> TTest:
    """Two-sided t-test of mean(a) - mean(b). paired: a[i] and b[i] belong together (one
    seed, two arms): a one-sample test of the differences, n - 1 degrees of freedom. Else
    Welch's test (unequal variances, Welch–Satterthwaite degrees of freedom). Each side
    needs 2 values or more (the caller checks)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired:
        d = a - b
        diff, var, df = d.mean(), d.var(ddof=1) / len(d), len(d) - 1.0
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        diff, var = a.mean() - b.mean(), va + vb
        df = var ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if var > 0 else math.nan
    if not var > 0:
        return TTest("paired" if paired else "welch", math.nan, df, math.nan)
    t = float(diff / math.sqrt(var))
    from scipy import special
    return TTest("paired" if paired else "welch", t, float(df), float(2 * special.stdtr(df, -abs(t))))


def holm(pvalues) -> list:
    """Holm–Bonferroni adjusted p-values, in the order given: the i-th smallest of m is
    multiplied by m - i + 1 (i from 1), then made non-decreasing in that order and capped at 1.
    Rejecting where the adjusted p ≤ α keeps the chance of any false rejection in the family
    ≤ α, whatever the dependence between the tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def bootstrap_diff_ci(a, b, paired: bool, level=0.95, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED) -> tuple:
    """Percentile bootstrap interval of mean(a) - mean(b): paired resamples the pairs (the
    seeds), else each side on its own. Seeded, so deterministic. With a handful of runs it is
    coarse and too narrow (3 values have 10 distinct resamples): read it beside the t-test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if paired:
        d = a - b
        stat = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    else:
        stat = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1) - \
            b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)
    low, high = np.percentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


@dataclass
class Reach:
    median: float  # inf when half of the runs or more never reached
    low: float  # the earliest and latest step of the runs that reached; nan if none did
    high: float
    never: int
    runs: int


def reach_summary(steps) -> Reach:
    """Over runs, each a first step at or below the target or None (never): the median over
    all runs, a never counting as later than any step, so a target most runs missed has no
    finite median; the range over the runs that reached; how many never did."""
    reached = [s for s in steps if s is not None]
    if not steps:
        return Reach(math.nan, math.nan, math.nan, 0, 0)
    median = float(np.median(np.array(reached + [math.inf] * (len(steps) - len(reached)), dtype=np.float64)))
    return Reach(median, float(min(reached)) if reached else math.nan, float(max(reached)) if reached else math.nan,
                 len(steps) - len(reached), len(steps))


@dataclass
class Comparison:
    """One arm against its baseline at one step."""
    kind: str  # "paired" or "welch"
    n: int  # pairs (paired) or the arm's values (welch)
    n_base: int
    p: float
    diff: float  # mean of the arm - mean of the baseline
    boot: tuple  # its 95% percentile bootstrap interval
    p_holm: float = math.nan
    m: int = 0  # the size of the Holm family this p-value was adjusted in


def compare_arms(arm, base):
    """arm, base: [(seed, value)] of two groups at one step. Paired when both hold exactly the
    same seeds, all known (then what a random seed fixes cancels in the differences);
    Welch otherwise. None when a side has fewer than 2 values."""
    if min(len(arm), len(base)) < 2:
        return None
    seeds = [s for s, _ in arm]
    paired = None not in seeds and len(set(seeds)) == len(seeds) and set(seeds) == {s for s, _ in base}
    if paired:  # in one seed order
        arm, base = (sorted(x, key=lambda sv: str(sv[0])) for x in (arm, base))
    a, b = np.array([v for _, v in arm]), np.array([v for _, v in base])
    test = t_test(a, b, paired)
    return Comparison(test.kind, len(a), len(b), test.p, float(a.mean() - b.mean()), bootstrap_diff_ci(a, b, paired))


def holm_within(comparisons: dict, family) -> None:
    """Set p_holm and m of every Comparison in {key: Comparison}, Holm-adjusted within the
    family family(key) names; comparisons without a p-value (no spread) take no part."""
    for name in {family(k) for k in comparisons}:
        members = [c for k, c in comparisons.items() if family(k) == name and math.isfinite(c.p)]
        for c, adjusted in zip(members, holm([c.p for c in members])):
            c.p_holm, c.m = adjusted, len(members)
