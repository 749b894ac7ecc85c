"""Every confidence interval saeflow reports, in one place.

    clustered_ci           a mean's CI, cluster-robust SE x Student t (validate's default)
    cluster_bootstrap_ci   a mean's percentile CI, whole clusters resampled (validate's bootstrap)
    ci95                   validate's 95% CI clustered by text: "t" or "bootstrap"
    wilson_ci              a proportion's Wilson interval (independent trials)
    bootstrap_ratio_ci     sum(num) / sum(den), clusters resampled (eval's ΔCE and KL)
    cluster_ratio_ci       the same from per-item values and their cluster keys
    bootstrap_mean_ci      a mean's percentile CI, items resampled (sweep's scores)
    bootstrap_difference_ci  mean(a) - mean(b), each side resampled on its own (sweep's modes)

Each one's resampling (seed, draw order, quantile function) is part of what the stages write:
their outputs are stable only while these stay as they are.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BOOTSTRAP_SAMPLES = 2000  # resamples of every bootstrap here


# --- means of clustered observations (validate) -------------------------------------------------
def clustered_ci(values: np.ndarray, clusters: np.ndarray, level: float = 0.95,
                 z: float | None = None) -> tuple[float, float]:
    """CI of a mean whose observations come in clusters (targets of one text share it): the
    cluster-robust (ratio estimator) standard error times a Student t quantile with
    (clusters - 1) degrees of freedom; `z` a fixed normal quantile instead (1.96 gives a
    narrower interval). NaN with fewer than 2 clusters (no df) unless z is given."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    ids, inv = np.unique(np.asarray(clusters), return_inverse=True)
    m = len(ids)
    if m < 2:
        if z is None or n < 2:
            return float("nan"), float("nan")
        se = float(values.std(ddof=1) / math.sqrt(n))
    else:
        resid = np.bincount(inv, weights=values - mean, minlength=m)  # [m] per-cluster sums
        se = math.sqrt(m / (m - 1) * float((resid ** 2).sum())) / n
    q = z if z is not None else t_quantile(0.5 + level / 2, m - 1)
    return mean - q * se, mean + q * se


@lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    from scipy import stats as sst

    return float(sst.t.ppf(p, df))


def cluster_bootstrap_ci(values: np.ndarray, clusters: np.ndarray, level: float = 0.95,
                         n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of a mean from resampling whole clusters (texts) with replacement."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    ids, inv = np.unique(np.asarray(clusters), return_inverse=True)
    m = len(ids)
    if m < 2:
        return float("nan"), float("nan")
    sums = np.bincount(inv, weights=values, minlength=m)  # [m]
    counts = np.bincount(inv, minlength=m).astype(float)  # [m]
    w = np.random.default_rng(seed).multinomial(m, np.full(m, 1 / m), size=n_boot)  # [B, m]
    den = w @ counts
    means = (w @ sums)[den > 0] / den[den > 0]
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def ci95(values, clusters, how: str = "t") -> tuple[float, float]:
    """The 95% CI clustered by text: `t` (clustered_ci) or `bootstrap` (cluster_bootstrap_ci)."""
    if how == "bootstrap":
        return cluster_bootstrap_ci(values, clusters)
    return clustered_ci(values, clusters)


def wilson_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (trials taken as independent)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


# --- ratios of sums over clusters (eval) --------------------------------------------------------
def bootstrap_ratio_ci(num: np.ndarray, den: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(num) / sum(den) when the clusters [R] (documents, or
    rows) are resampled with replacement; num and den are per-cluster sums."""
    R = len(num)
    if R < 2:
        v = float(num.sum() / max(den.sum(), 1e-12))
        return v, v
    idx = np.random.default_rng(seed).integers(0, R, size=(samples, R))  # [samples, R]
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def cluster_sums(keys: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """(unique keys [C] sorted, then each of `values` summed per key [C]) from per-item keys
    [n] and values [n]: the per-document sums of per-token (or per-piece) values."""
    uniq, inv = np.unique(np.asarray(keys), return_inverse=True)
    return (uniq, *(np.bincount(inv, weights=np.asarray(v, dtype=np.float64),
                                minlength=len(uniq)) for v in values))


def cluster_ratio_ci(keys: np.ndarray, num: np.ndarray, den: np.ndarray,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% cluster-bootstrap interval of sum(num) / sum(den): items (tokens, or per-document
    pieces of a row) with equal `keys` are summed into one cluster, and clusters are resampled
    whole."""
    _, n, d = cluster_sums(keys, num, den)
    return bootstrap_ratio_ci(n, d, samples, seed)


# --- means of independent items (sweep) ---------------------------------------------------------
def bootstrap_mean_ci(x: np.ndarray, n_boot: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of mean(x), items resampled with replacement; NaN when x is empty."""
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)  # [n_boot]
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def bootstrap_difference_ci(a: np.ndarray, b: np.ndarray, n_boot: int = BOOTSTRAP_SAMPLES,
                            seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of mean(a) - mean(b) for two independent samples: each resample draws
    a, then b, with replacement from one generator (that order is part of the result)."""
    rng = np.random.default_rng(seed)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean()
             for _ in range(n_boot)]
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))
