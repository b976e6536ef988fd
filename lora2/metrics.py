"""Task metrics (GLUE conventions): accuracy, F1, Matthews correlation, Pearson / Spearman."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

# Metric each task is judged by (higher is better for all of them).
PRIMARY_METRIC = {"classification": "accuracy", "regression": "pearson", "causal-lm": "neg_perplexity"}


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    pred, gold = np.asarray(pred), np.asarray(gold)
    out = {"accuracy": float((pred == gold).mean())}
    f1s = []
    for c in range(num_labels):
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    out["f1"] = f1s[1] if num_labels == 2 else float(np.mean(f1s))  # binary: F1 of the positive class
    out["matthews"] = matthews(pred, gold, num_labels)
    return out


def matthews(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), equal to the binary MCC for 2 classes."""
    conf = np.zeros((num_labels, num_labels))
    np.add.at(conf, (gold, pred), 1)
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = math.sqrt(max(s * s - (p * p).sum(), 0.0) * max(s * s - (t * t).sum(), 0.0))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    pred, gold = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if np.std(pred) == 0 or np.std(gold) == 0:  # correlation undefined: report no correlation
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((pred - gold) ** 2))}
    return {
        "pearson": float(stats.pearsonr(pred, gold)[0]),
        "spearman": float(stats.spearmanr(pred, gold)[0]),
        "mse": float(np.mean((pred - gold) ** 2)),
    }


def lm_metrics(total_loss: float, total_tokens: int) -> dict[str, float]:
    loss = total_loss / max(total_tokens, 1)
    ppl = math.exp(min(loss, 50.0))
    return {"loss": loss, "perplexity": ppl, "neg_perplexity": -ppl}
