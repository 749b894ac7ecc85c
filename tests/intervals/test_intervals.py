"""saeflow.intervals: every CI of the project, seeded and reproducible."""
import math

import numpy as np
import pytest

from saeflow.intervals import (
    BOOTSTRAP_SAMPLES,
    bootstrap_difference_ci,
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    ci95,
    cluster_bootstrap_ci,
    clustered_ci,
    t_quantile,
    wilson_ci,
)


def test_clustered_ci_is_the_cluster_robust_se_times_t():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(6), 4)
    values = rng.random(24) + clusters * 0.1
    lo, hi = clustered_ci(values, clusters)
    m = len(np.unique(clusters))
    sums = np.array([(values[clusters == c] - values.mean()).sum() for c in range(m)])
    se = math.sqrt(m / (m - 1) * (sums ** 2).sum()) / len(values)
    q = t_quantile(0.975, m - 1)
    assert (lo, hi) == pytest.approx((values.mean() - q * se, values.mean() + q * se))
    zlo, zhi = clustered_ci(values, clusters, z=1.96)
    assert lo < zlo < zhi < hi  # t with 5 df is wider than the normal quantile
    assert all(math.isnan(x) for x in clustered_ci(values, np.zeros(24)))
    assert all(math.isnan(x) for x in clustered_ci(np.array([]), np.array([])))


def test_cluster_bootstrap_is_seeded_and_needs_two_clusters():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(8), 3)
    values = rng.random(24)
    lo, hi = cluster_bootstrap_ci(values, clusters)
    assert lo < values.mean() < hi
    assert cluster_bootstrap_ci(values, clusters) == (lo, hi)
    assert ci95(values, clusters, "bootstrap") == (lo, hi)
    assert ci95(values, clusters) == clustered_ci(values, clusters)
    assert all(math.isnan(x) for x in cluster_bootstrap_ci(values, np.zeros(24)))


def test_wilson_interval():
    lo, hi = wilson_ci(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_ci(0, 0))


def test_item_bootstraps_resample_as_written():
    rng = np.random.default_rng(2)
    x = rng.random(15)
    idx = np.random.default_rng(0).integers(0, 15, (BOOTSTRAP_SAMPLES, 15))
    means = x[idx].mean(1)
    assert bootstrap_mean_ci(x) == (float(np.quantile(means, 0.025)),
                                    float(np.quantile(means, 0.975)))
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.array([])))
    a, b = x[:7] + 1.0, x[7:]
    g = np.random.default_rng(0)
    boots = [g.choice(a, 7).mean() - g.choice(b, 8).mean() for _ in range(BOOTSTRAP_SAMPLES)]
    lo, hi = bootstrap_difference_ci(a, b)
    assert (lo, hi) == (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)))
    assert lo < a.mean() - b.mean() < hi


def test_ratio_bootstrap_with_one_cluster_is_the_point_value():
    assert bootstrap_ratio_ci(np.array([3.0]), np.array([2.0])) == (1.5, 1.5)
