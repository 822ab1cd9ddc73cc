"""Task metrics, in plain numpy (checked against scikit-learn and scipy by the tests): accuracy,
macro-F1, MCC and, for two classes, the positive class's F1 (MRPC's metric); Pearson, Spearman
and MSE. Macro-F1 averages over every class that occurs in the gold labels or the predictions, as
scikit-learn's does. Pearson and Spearman of a constant are undefined; they are reported as 0."""

from __future__ import annotations

import numpy as np
from sherl_pipe.errors import SherlError

PRIMARY = {"classification": "accuracy", "regression": "pearson"}
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc", "f1_positive", "train_loss")
REGRESSION_METRICS = ("pearson", "spearman", "mse", "train_loss")
LOWER_IS_BETTER = {"mse", "train_loss"}


def selection(task_type: str, metric: str, where: str = "train.metric") -> tuple[str, str]:
    """(metric, direction) that rank epochs (or trials): METRIC, or the task's primary one for "";
    train_loss is the epoch's training loss, the others are measured on the evaluation split."""
    known = CLASSIFICATION_METRICS if task_type == "classification" else REGRESSION_METRICS
    metric = metric or PRIMARY[task_type]
    if metric not in known:

        raise SherlError(f"{where} = {metric!r} is not a {task_type} metric; use one of {', '.join(known)}")
    return metric, "minimize" if metric in LOWER_IS_BETTER else "maximize"


def best_of(values, direction: str) -> float | None:
    """The best finite value (None if there is none: a trial whose metric is NaN at every epoch)."""
    finite = [float(v) for v in values if np.isfinite(v)]
    if not finite:
        return None
    return max(finite) if direction == "maximize" else min(finite)


def is_better(value: float, best: float | None, direction: str) -> bool:
    """Whether VALUE beats BEST; a non-finite value never does, and any finite one beats a
    non-finite best (a NaN first epoch must not stay the best for good)."""
    if not np.isfinite(value):
        return False
    if best is None or not np.isfinite(best):
        return True
    return value > best if direction == "maximize" else value < best


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: gold, columns: predicted
    np.add.at(cm, (gold, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    pred_n, gold_n, n = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64), cm.sum()
    denom = pred_n + gold_n
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    # Multi-class MCC (Gorodkin's R_K): binary MCC when num_classes == 2.
    c = tp.sum()
    cov = c * n - (pred_n * gold_n).sum()
    norm = np.sqrt((n * n - (pred_n ** 2).sum()) * (n * n - (gold_n ** 2).sum()))
    present = denom > 0
    out = {
        "accuracy": float(c / max(n, 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "mcc": float(cov / norm) if norm > 0 else 0.0,
    }
    if num_classes == 2:  # the positive class is label id 1: the second of data.label_names
        out["f1_positive"] = float(f1[1])
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Pearson, Spearman and MSE; all NaN when a prediction is not finite (ranks of NaNs would
    give a Spearman that looks real)."""
    pred, gold = pred.astype(np.float64), gold.astype(np.float64)
    if not np.isfinite(pred).all():
        return {"pearson": float("nan"), "spearman": float("nan"), "mse": float("nan")}
    return {"pearson": _pearson(pred, gold), "spearman": _pearson(_rank(pred), _rank(gold)),
            "mse": float(((pred - gold) ** 2).mean())}


def mean_baseline(train_targets: np.ndarray, gold: np.ndarray) -> dict:
    """The training-mean predictor's errors (a regression task's majority-class baseline)."""
    mean = float(np.mean(train_targets, dtype=np.float64))  # float32 accumulation overflows near its limit
    return {"prediction": mean, "mse": float(((gold.astype(np.float64) - mean) ** 2).mean())}


def majority_baseline(train_labels: np.ndarray, gold: np.ndarray) -> float:
    """Accuracy of always predicting the training split's most frequent class."""
    return float((gold == np.bincount(train_labels).argmax()).mean())
