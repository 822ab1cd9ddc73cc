import numpy as np

from sherl_pipe.metrics import classification_metrics, majority_baseline, regression_metrics


def test_classification_metrics():
    gold = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    m = classification_metrics(pred, gold, 3)
    assert m["accuracy"] == 4 / 6
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (3 + 3), 1.0]
    assert abs(m["macro_f1"] - np.mean(f1)) < 1e-12
    # binary MCC against the textbook formula
    g, p = np.array([1, 1, 0, 0, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 0, 1])
    tp, tn, fp, fn = 3, 2, 1, 1
    expect = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert abs(classification_metrics(p, g, 2)["mcc"] - expect) < 1e-12
    assert classification_metrics(np.zeros(4, int), np.array([0, 1, 0, 1]), 2)["mcc"] == 0.0


def test_regression_metrics_and_baseline():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    m = regression_metrics(x ** 3, x)
    assert abs(m["spearman"] - 1.0) < 1e-12 and 0.9 < m["pearson"] < 1.0
    assert abs(regression_metrics(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]))["spearman"] - 0.8660254) < 1e-6
    assert majority_baseline(np.array([2, 2, 1]), np.array([2, 1, 2, 2])) == 0.75
