"""Calibration of label scores read off the LM head (zero-shot, ICL, the PBFT objective).

An LM that reads a prompt has a prior over the answer words that has nothing to do with the
input: measured on the embedded model, ICL on CoLA says "No" to almost everything (accuracy 0.32
against a 0.69 majority baseline). Two published corrections, both a division of the label
probabilities (renormalised over the verbalizer) by an estimated bias ``b``, i.e. a subtraction
of ``log b`` from the label log-probabilities:

- ``contextual`` (Zhao et al. 2021, "Calibrate before use"): ``b`` is the mean label distribution
  of content-free inputs — every text field set to ``"N/A"``, ``""`` and ``"[MASK]"`` — in the very
  same prompt (same demonstrations, same pattern). Uses no evaluation data.
- ``batch`` (Zhou et al. 2023, "Batch calibration"): ``b`` is the mean label distribution over the
  evaluation set being scored (its non-skipped examples). *Transductive*: an example's prediction
  depends on the other examples of its eval set, which the run records (``transductive: true``).

``none`` (the default, as in the study and llmft) leaves the scores untouched. The estimated bias
is recorded per eval set in ``metrics.json`` (``eval.<set>.calibration``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import log_softmax, logsumexp

Calibration = Literal["none", "contextual", "batch"]
CALIBRATIONS: tuple[str, ...] = ("none", "contextual", "batch")
CONTENT_FREE: tuple[str, ...] = ("N/A", "", "[MASK]")
CALIBRATION_HELP = ("none | contextual (content-free inputs 'N/A', '', '[MASK]' in the same prompt, Zhao et al. 2021) "
                    "| batch (mean over the eval set, transductive, Zhou et al. 2023)")


@dataclass(frozen=True)
class Calibrated:
    """Calibrated label scores of one eval set and what the calibration estimated."""

    label_scores: np.ndarray  # [N, L] log-probs renormalised over the labels, then divided by the bias
    record: dict  # goes to metrics.json: mode, bias (label probabilities), transductive


def content_free_fields(field_names: Sequence[str]) -> list[dict[str, str]]:
    """One field mapping per content-free input: every text field set to the same filler."""
    return [{f: filler for f in field_names} for filler in CONTENT_FREE]


def label_distribution(label_logprobs: np.ndarray) -> np.ndarray:
    """Per row, the label log-probs renormalised over the labels (log-space; NaN rows stay NaN)."""
    return log_softmax(np.asarray(label_logprobs, dtype=np.float64), axis=1)


def mean_distribution(label_logprobs: np.ndarray, skipped: np.ndarray | None = None) -> np.ndarray:
    """The mean label distribution (probabilities, summing to 1) over the rows not skipped."""
    rows = label_distribution(label_logprobs)
    if skipped is not None:
        rows = rows[~np.asarray(skipped, dtype=bool)]
    rows = rows[np.isfinite(rows).all(axis=1)]
    if not len(rows):
        raise ValueError("no scored rows to estimate a calibration bias from")
    # Mean of probabilities, computed in log space for stability.
    return np.exp(logsumexp(rows, axis=0) - np.log(len(rows)))


def apply(label_logprobs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``log softmax(log p(label|x) - log b)`` per row: the calibrated label log-probabilities."""
    shifted = label_distribution(label_logprobs) - np.log(np.asarray(bias, dtype=np.float64))[None, :]
    return log_softmax(shifted, axis=1)


def calibrate(mode: str, label_logprobs: np.ndarray, skipped: np.ndarray,
              content_free: Callable[[], np.ndarray] | None = None) -> Calibrated | None:
    """Calibrate one eval set's scores; ``None`` for mode ``none``.

    ``content_free`` scores the content-free inputs in the method's own prompt (``contextual``
    only); it returns their label log-probs, one row per ``CONTENT_FREE`` filler."""
    if mode == "none":
        return None
    if mode == "contextual":
        if content_free is None:
            raise ValueError("contextual calibration needs the content-free scores")
        bias = mean_distribution(content_free())
    elif mode == "batch":
        if not (~np.asarray(skipped, dtype=bool)).any():  # nothing scored: nothing to calibrate
            return Calibrated(np.asarray(label_logprobs, dtype=np.float64),
                              {"mode": mode, "bias": None, "transductive": True})
        bias = mean_distribution(label_logprobs, skipped)
    else:
        raise ValueError(f"unknown calibration '{mode}' (expected one of {CALIBRATIONS})")
    scores = apply(label_logprobs, bias)
    scores[np.asarray(skipped, dtype=bool)] = np.nan
    record = {"mode": mode, "bias": [round(float(b), 6) for b in bias], "transductive": mode == "batch"}
    if mode == "contextual":
        record["content_free"] = list(CONTENT_FREE)
    return Calibrated(scores, record)
