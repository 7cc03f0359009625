"""Classification metrics over one eval set.

Skipped examples (prompt longer than the context) are excluded from every metric and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    return float((gold == pred).mean()) if len(gold) else float("nan")


def mcc(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """Matthews correlation (multi-class, Gorodkin 2004); 0 when a predictor is constant (as sklearn)."""
    if len(gold) == 0:
        return float("nan")
    c = np.zeros((num_labels, num_labels), dtype=np.float64)
    valid = (pred >= 0) & (pred < num_labels)
    np.add.at(c, (gold[valid], pred[valid]), 1)
    t, p = c.sum(axis=1), c.sum(axis=0)
    s, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * s - t @ p
    cov_ypyp = s * s - p @ p
    cov_ytyt = s * s - t @ t
    denom = np.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / denom) if denom > 0 else 0.0


def breakdown(gold: np.ndarray, pred: np.ndarray, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    keys_arr = np.asarray(keys)
    for k in sorted(set(keys)):
        m = keys_arr == k
        out[k] = {"n": int(m.sum()), "accuracy": accuracy(gold[m], pred[m])}
    return out


def eval_set_metrics(
    gold: np.ndarray,
    pred: np.ndarray,
    skipped: np.ndarray,
    label_names: Sequence[str],
    groups: dict[str, Sequence[str]] | None = None,
    outside_verbalizer: np.ndarray | None = None,
) -> dict:
    """Everything we report for one eval set (schema: docs/results.md)."""
    keep = ~skipped
    g, p = gold[keep], pred[keep]
    counts = Counter(gold.tolist())
    majority, maj_n = counts.most_common(1)[0] if counts else (0, 0)
    res = {
        "n": int(keep.sum()),
        "n_skipped": int(skipped.sum()),
        "accuracy": accuracy(g, p),
        "mcc": mcc(g, p, len(label_names)),
        "majority_label": label_names[majority],
        "majority_baseline": maj_n / len(gold) if len(gold) else float("nan"),
        "per_label": {label_names[int(k)]: v for k, v in breakdown(g, p, [str(x) for x in g]).items()},
        "pred_distribution": {label_names[k]: int((p == k).sum()) for k in range(len(label_names))},
        "groups": {},
        "full_vocab_accuracy": None,
        "frac_outside_verbalizer": None,
    }
    for field, values in (groups or {}).items():
        vals = [v for v, k in zip(values, keep) if k]
        res["groups"][field] = breakdown(g, p, vals)
    if outside_verbalizer is not None:
        out = outside_verbalizer[keep]
        res["frac_outside_verbalizer"] = float(out.mean()) if len(out) else float("nan")
        # Full-vocabulary accuracy (llmft's "accuracy"): any non-verbalizer argmax counts as wrong.
        res["full_vocab_accuracy"] = float(((g == p) & ~out).mean()) if len(out) else float("nan")
    return res
