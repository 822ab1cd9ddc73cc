"""Metrics agree with scikit-learn and scipy (test dependencies), edge cases included."""

import numpy as np
import pytest

from sherl_pipe.metrics import classification_metrics, majority_baseline, mean_baseline, regression_metrics


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_equal_scikit_learn(seed):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(seed)
    k = 2 + seed % 3
    gold = rng.integers(0, k, 60)
    pred = np.where(rng.random(60) < 0.6, gold, rng.integers(0, k, 60))
    if seed % 2:
        gold[gold == k - 1] = 0  # a class that is predicted but absent from the gold labels
    m = classification_metrics(pred, gold, k)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)
    if k == 2:
        assert m["f1_positive"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    else:
        assert "f1_positive" not in m


def test_degenerate_predictions():
    m = classification_metrics(np.zeros(4, int), np.array([0, 1, 0, 1]), 2)
    assert m["mcc"] == 0.0 and m["f1_positive"] == 0.0


def test_regression_metrics_of_non_finite_predictions_are_nan():
    """All-NaN predictions scored Spearman 0.96 (NaNs ranked in input order) and Pearson 0."""
    gold = np.arange(10.0)
    m = regression_metrics(np.full(10, np.nan), gold)
    assert all(np.isnan(v) for v in m.values()), m
    assert all(np.isnan(v) for v in regression_metrics(np.r_[np.inf, np.arange(9.0)], gold).values())


def test_the_mean_baseline_of_float32_targets_near_their_limit_is_finite():
    """np.mean of float32 targets accumulates in float32: two of 3e38 gave a baseline of inf."""
    b = mean_baseline(np.array([3e38, 3e38, 0.0], np.float32), np.array([3e38, 0.0], np.float32))
    assert b["prediction"] == pytest.approx(2e38, rel=1e-6) and np.isfinite(b["mse"]), b


def test_regression_metrics_equal_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    gold = rng.normal(size=50)
    pred = gold + rng.normal(size=50) * 0.5
    pred[:5] = pred[5]  # ties
    m = regression_metrics(pred, gold)
    assert m["pearson"] == pytest.approx(pearsonr(pred, gold)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(spearmanr(pred, gold)[0], abs=1e-12)
    assert m["mse"] == pytest.approx(float(np.mean((pred - gold) ** 2)), abs=1e-12)
    assert majority_baseline(np.array([2, 2, 1]), np.array([2, 1, 2, 2])) == 0.75
