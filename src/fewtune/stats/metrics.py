"""Classification metrics over one eval set, and collapse detection.

Skipped examples (prompt longer than the context) are excluded from every metric — the majority
baseline included — and counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

#: |final training loss − chance loss| below which a run counts as collapsed (``loss_collapse``)
COLLAPSE_LOSS_TOL = 1e-3


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    return float((gold == pred).mean()) if len(gold) else float("nan")


def mcc(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """Matthews correlation (multi-class, Gorodkin 2004) via scikit-learn.

    NaN (undefined, see ``mcc_undefined``) when the gold labels have a single class: the
    correlation with a constant is 0/0, and scikit-learn's 0.0 would read as "chance level". A
    constant *predictor* on two-class gold stays 0.0 (scikit-learn's convention; such a run is
    flagged ``collapsed`` instead). ``num_labels`` is not needed: a label absent from both gold
    and predictions adds an all-zero row and column to the confusion matrix, which leaves MCC
    unchanged."""
    if mcc_undefined(gold):
        return float("nan")
    from sklearn.metrics import matthews_corrcoef  # lazy: ~0.5 s import, only when metrics are computed

    return float(matthews_corrcoef(gold, pred))


def mcc_undefined(gold: np.ndarray) -> bool:
    """MCC is undefined without examples or with a single gold class."""
    return len(np.unique(gold)) < 2


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
    tie: np.ndarray | None = None,
) -> dict:
    """Everything we report for one eval set (schema: docs/results.md).

    ``warnings`` lists what makes a figure unusable (undefined MCC, collapsed predictions); the
    runner copies them into the run's warnings."""
    keep = ~skipped
    g, p = gold[keep], pred[keep]
    counts = Counter(g.tolist())  # the scored examples only, like the accuracy it is compared with
    majority, maj_n = counts.most_common(1)[0] if counts else (0, 0)
    ties = tie[keep] if tie is not None else np.zeros(len(g), dtype=bool)
    all_ties = bool(len(g)) and bool(ties.all())
    collapsed = prediction_collapse(g, p) or all_ties
    warnings = []
    if mcc_undefined(g):
        warnings.append(f"MCC undefined: the {len(g)} scored examples have {len(np.unique(g))} gold class(es)")
    if all_ties:
        warnings.append("collapsed: every example's label scores are an exact tie (predictions are coin flips)")
    elif collapsed:
        warnings.append(f"collapsed: every prediction is '{label_names[int(p[0])]}'")
    res = {
        "n": int(keep.sum()),
        "n_skipped": int(skipped.sum()),
        "n_ties": int(ties.sum()),
        "accuracy": accuracy(g, p),
        "mcc": mcc(g, p, len(label_names)),
        "majority_label": label_names[majority],
        "majority_baseline": maj_n / len(g) if len(g) else float("nan"),
        "collapsed": collapsed,
        "warnings": warnings,
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


def prediction_collapse(gold: np.ndarray, pred: np.ndarray) -> bool:
    """Every prediction on one label although the gold labels have at least two classes."""
    return len(pred) > 0 and len(np.unique(gold)) >= 2 and len(np.unique(pred)) == 1


def loss_collapse(final_loss: float | None, chance_loss: float | None, tol: float = COLLAPSE_LOSS_TOL) -> str | None:
    """Why a run's training collapsed, or None.

    ``chance_loss`` is the cross-entropy of a uniform prediction — ln(#labels) for a classifier
    head, ln|V| for the full-vocabulary LM objective. A model that ends training exactly there
    outputs the same distribution for every input (e.g. ``train.lr=1e6`` blows the weights up
    until the last hidden state is constant): it completed, but its predictions say nothing.
    Measured with ``train.lr=1e6``: the loss sits at ln 2 / ln|V| to 1e-6. A run that merely has
    not learned yet sits near, not at, this value, so the tolerance is tight (1e-3 nats)."""
    if final_loss is None or chance_loss is None or not math.isfinite(final_loss):
        return None
    if abs(final_loss - chance_loss) <= tol:
        return (f"final training loss {final_loss:.4f} is the chance loss {chance_loss:.4f} (uniform prediction) "
                f"within {tol}: the model collapsed to a constant output")
    return None
