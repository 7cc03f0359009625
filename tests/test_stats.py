"""Statistics on hand-computed numbers: summaries, t-intervals, paired tests, gaps, Pareto, claims.

Also home of ``make_run``, a synthetic metrics.json factory (the runner's schema) shared with
test_report.py: statistics must be testable on known numbers, without a model.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from fewtune import stats as st

# ---------------------------------------------------------------------------------------------
# synthetic runs

EVAL_SETS = {"cola": (("cola-id", "id", 0.69), ("cola-ood", "ood", 0.686)), "mnli": (("mnli-m", "id", 0.52), ("hans", "ood", 0.5))}


def make_run(task: str, method: str, n: int, seed: int, accs: tuple[float, float], *, model: str = "tiny-random",
             params: dict[str, Any] | None = None, lr: float = 1e-5, n_eval: int = 100, n_skipped: int = 0,
             memory: float = 500.0, trainable: int = 1000, mcc: float = 0.1) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(run id, resolved config dict, metrics dict) in the runner's schema, with chosen accuracies."""
    params = params or {}
    cfg = {"task": task, "method": method, "model": model, "n": n, "seed": seed, "params": params, "pattern": "minimal",
           "eval_sets": [e for e, _, _ in EVAL_SETS[task]], "model_seed": 0, "train": {"lr": lr, "epochs": 40}}
    rid = f"{task}-{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}-{lr}-{n}-{seed}-{model}"
    ev = {}
    for (name, domain, majority), acc in zip(EVAL_SETS[task], accs):
        groups = {}
        if name == "hans":
            groups = {"heuristic": {h: {"n": n_eval // 3, "accuracy": acc} for h in ("lexical_overlap", "subsequence", "constituent")}}
        ev[name] = {
            "domain": domain, "n": n_eval, "n_skipped": n_skipped, "accuracy": acc, "mcc": mcc,
            "majority_label": "acceptable", "majority_baseline": majority,
            "per_label": {"a": {"n": n_eval // 2, "accuracy": acc}, "b": {"n": n_eval // 2, "accuracy": acc}},
            "groups": groups, "full_vocab_accuracy": None, "frac_outside_verbalizer": None,
            "warning": "overlaps cola-ood" if name == "cola-glue-dev" else None,
        }
    metrics = {
        "run_id": rid, "task": task, "method": method, "model": model, "model_name": "tiny random Llama", "n": n, "seed": seed,
        "eval": ev, "curve": [], "train": None,
        "resources": {"peak_memory_mb": memory, "memory_kind": "rss", "trainable_params": trainable, "total_params": 10_000,
                      "train_seconds": 1.0, "eval_seconds": 0.5, "train_tokens_per_s": None, "eval_tokens_per_s": 100.0,
                      "optimizer_steps": 0, "precision": "fp32", "device": "cpu", "machine": {}},
        "warnings": [],
    }
    return rid, cfg, metrics


# ---------------------------------------------------------------------------------------------
# summaries


def test_summarize_hand_computed_t_interval() -> None:
    s = st.summarize([0.5, 0.6, 0.7])
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302652730 → half width 4.302652730 · 0.1 / √3 = 0.248413
    assert s.count == 3
    assert s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(0.1)
    assert s.ci_low == pytest.approx(0.6 - 0.248413, abs=1e-6)
    assert s.ci_high == pytest.approx(0.6 + 0.248413, abs=1e-6)
    assert (s.min, s.max) == (pytest.approx(0.5), pytest.approx(0.7))


def test_summarize_single_run_has_undefined_ci_and_says_so() -> None:
    s = st.summarize([0.42])
    assert s.count == 1 and s.mean == 0.42
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert "undefined" in s.note


def test_summarize_ignores_nan_and_none() -> None:
    s = st.summarize([0.5, float("nan"), 0.7])
    assert s.count == 2 and s.mean == pytest.approx(0.6)
    assert st.summarize([]).count == 0


# ---------------------------------------------------------------------------------------------
# paired tests


def test_paired_test_hand_computed() -> None:
    a = [0.60, 0.70, 0.65, 0.80]
    b = [0.50, 0.60, 0.62, 0.70]
    t = st.paired_test(a, b)
    # d = [.10, .10, .03, .10]: mean .0825, sd .035, se .0175, t = 4.7142857, df 3
    assert t.n_pairs == 4
    assert t.mean_diff == pytest.approx(0.0825)
    assert t.std_diff == pytest.approx(0.035)
    assert t.t_stat == pytest.approx(0.0825 / 0.0175)
    half = 3.182446305 * 0.0175  # t(0.975, 3)
    assert t.ci_low == pytest.approx(0.0825 - half, abs=1e-7)
    assert t.ci_high == pytest.approx(0.0825 + half, abs=1e-7)
    assert t.t_p == pytest.approx(0.0180715, abs=1e-6)
    # Wilcoxon: all 4 differences positive → W = 0; two-sided exact p = 2/16
    assert t.w_stat == 0.0
    assert t.w_p == pytest.approx(0.125)
    assert t.significant()


def test_wilcoxon_with_a_negative_difference() -> None:
    # d = [1, -2, 3, 4, 5]: ranks 1..5, W- = 2; P(W ≤ 2) = 3/32 → two-sided p = 6/32
    t = st.paired_test([1, -2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert t.w_stat == 2.0
    assert t.w_p == pytest.approx(6 / 32)


def test_paired_test_degenerate_cases() -> None:
    one = st.paired_test([0.5], [0.4])
    assert one.n_pairs == 1 and math.isnan(one.t_p) and "fewer than 2" in one.note
    zero = st.paired_test([0.5, 0.6], [0.5, 0.6])
    assert zero.mean_diff == 0 and zero.t_p == 1.0 and zero.w_p == 1.0
    const = st.paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert math.isnan(const.t_p) and "undefined" in const.note and not const.significant()
    assert const.mean_diff == pytest.approx(0.1) and const.w_p == pytest.approx(0.25)
    with pytest.raises(ValueError):
        st.paired_test([1, 2], [1])


def test_paired_comparisons_pair_by_seed_only() -> None:
    runs = [make_run("cola", "vanilla", 16, s, (a, 0.6)) for s, a in [(0, 0.60), (1, 0.70), (2, 0.65), (3, 0.80)]]
    runs += [make_run("cola", "pbft", 16, s, (a, 0.5)) for s, a in [(0, 0.50), (1, 0.60), (2, 0.62), (3, 0.70), (9, 0.99)]]
    rows = st.eval_rows(runs)
    comps = [c for c in st.paired_comparisons(rows) if c.eval_set == "cola-id"]
    assert len(comps) == 1
    c = comps[0]
    assert (c.arm_a, c.arm_b, c.seeds) == ("pbft", "vanilla", (0, 1, 2, 3))  # seed 9 has no partner
    assert c.test.mean_diff == pytest.approx(-0.0825)
    every = [c for c in st.paired_comparisons(rows, reference_method=None, order=["vanilla", "pbft"]) if c.eval_set == "cola-id"]
    assert [(c.arm_a, c.arm_b) for c in every] == [("pbft", "vanilla")]  # B is earlier in the study's method order
    every = [c for c in st.paired_comparisons(rows, reference_method=None) if c.eval_set == "cola-id"]
    assert [(c.arm_a, c.arm_b) for c in every] == [("vanilla", "pbft")]  # no order given: by name


# ---------------------------------------------------------------------------------------------
# rows, arms, tables


def test_arm_labels_name_only_what_varies_within_a_method() -> None:
    runs = [make_run("cola", "lora", 16, 0, (0.6, 0.6), params={"r": r, "alpha": 8}) for r in (1, 8)]
    runs += [make_run("mnli", "lora", 16, 0, (0.6, 0.5), params={"r": 1, "alpha": 8})]
    runs += [make_run("cola", "vanilla", 16, s, (0.6, 0.6)) for s in (0, 1)]
    labels = st.arm_labels({rid: cfg for rid, cfg, _ in runs})
    assert sorted(set(labels.values())) == ["lora r=1", "lora r=8", "vanilla"]


def test_summary_table_has_majority_rows_and_flags_baseline() -> None:
    runs = [make_run("cola", "icl", 16, s, (0.69, 0.686)) for s in (0, 1, 2)]  # exactly the majority baseline
    runs += [make_run("cola", "vanilla", 16, s, (a, a)) for s, a in [(0, 0.80), (1, 0.82), (2, 0.81)]]
    table = st.summary_table(st.eval_rows(runs), metrics=("accuracy",))
    maj = [r for r in table if r.method == st.MAJORITY]
    assert {(r.eval_set, r.baseline) for r in maj} == {("cola-id", 0.69), ("cola-ood", 0.686)}
    icl = next(r for r in table if r.method == "icl" and r.eval_set == "cola-id")
    van = next(r for r in table if r.method == "vanilla" and r.eval_set == "cola-id")
    assert icl.at_baseline is True
    assert van.at_baseline is False
    assert van.stats.count == 3 and van.stats.mean == pytest.approx(0.81) and van.seeds == (0, 1, 2)


def test_baseline_check_uses_binomial_error_as_a_floor() -> None:
    # 100 examples, baseline 0.5: SE 0.05 → within 1.96·SE = 0.098 is indistinguishable
    assert st.indistinguishable(st.summarize([0.55]), 0.5, 100) is True
    assert st.indistinguishable(st.summarize([0.65]), 0.5, 100) is False
    # seeds that agree exactly have a zero-width CI; the eval-set noise still applies
    assert st.indistinguishable(st.summarize([0.55, 0.55, 0.55]), 0.5, 100) is True
    # many examples: the seed CI (±0.248 here) is the larger margin
    assert st.indistinguishable(st.summarize([0.5, 0.6, 0.7]), 0.75, 10_000) is True
    assert st.indistinguishable(st.summarize([0.5, 0.6, 0.7]), 0.9, 10_000) is False


def test_id_ood_gap_is_paired_within_runs() -> None:
    runs = [make_run("cola", "vanilla", 16, s, acc) for s, acc in [(0, (0.70, 0.60)), (1, (0.80, 0.65)), (2, (0.75, 0.70))]]
    gaps = st.id_ood_gaps(st.eval_rows(runs))
    assert len(gaps) == 1
    g = gaps[0]
    assert (g.id_set, g.ood_set) == ("cola-id", "cola-ood")
    assert g.gap.mean == pytest.approx((0.10 + 0.15 + 0.05) / 3)
    assert g.gap.std == pytest.approx(0.05)


def test_pareto_front() -> None:
    # (cost, accuracy): B dominates C; A is cheapest; D is best; E has NaN cost
    costs = [1.0, 2.0, 3.0, 4.0, float("nan")]
    accs = [0.5, 0.7, 0.6, 0.8, 0.9]
    assert st.pareto_front(costs, accs) == [True, True, False, True, False]
    assert st.pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]  # ties do not dominate each other


# ---------------------------------------------------------------------------------------------
# collapsed runs


def test_collapsed_runs_are_flagged_from_flags_and_prediction_distribution() -> None:
    rid, cfg, m = make_run("cola", "vanilla", 16, 0, (0.7, 0.6))
    assert all(r.collapsed is None for r in st.eval_rows([(rid, cfg, m)]))  # older metrics without the flags still load
    m["eval"]["cola-id"]["pred_distribution"] = {"unacceptable": 0, "acceptable": 100}
    m["eval"]["cola-ood"]["pred_distribution"] = {"unacceptable": 3, "acceptable": 97}
    rows = {r.eval_set: r for r in st.eval_rows([(rid, cfg, m)])}
    assert rows["cola-id"].collapsed == "every prediction is 'acceptable'"
    assert rows["cola-ood"].collapsed is None
    m["eval"]["cola-ood"]["collapsed"] = True
    assert {r.eval_set: r for r in st.eval_rows([(rid, cfg, m)])}["cola-ood"].collapsed
    m["collapsed"] = "loss at ln(2) for the last 10 steps"
    assert all(r.collapsed == "loss at ln(2) for the last 10 steps" for r in st.eval_rows([(rid, cfg, m)]))


# ---------------------------------------------------------------------------------------------
# the arms tied for the lead (multiple comparison with the best)


def test_leaders_are_holm_corrected_over_the_best_vs_each_comparisons() -> None:
    """Two arms each below the best on 5 samples with seed-level p = 0.033 and 0.044 (stored
    accuracies: the t-test decides). Each alone is 'significantly worse'; Holm over the two
    (0.033 · 2 = 0.066) keeps both in the lead."""
    wobble = [-0.02, -0.01, 0.0, 0.01, 0.02]
    runs = []
    for s in range(5):
        best = 0.80 + 0.01 * s
        runs += [make_run("cola", "vanilla", 16, s, (best, best), n_eval=1000),
                 make_run("cola", "lora", 16, s, (best - 0.0226 - wobble[s],) * 2, n_eval=1000),
                 make_run("cola", "pbft", 16, s, (best - 0.0205 + wobble[s],) * 2, n_eval=1000)]
    rows = [r for r in st.eval_rows(runs) if r.eval_set == "cola-id"]
    means = {(m, m): sum(r.accuracy for r in rows if r.method == m) / 5 for m in ("vanilla", "lora", "pbft")}
    lead = st.leaders(rows, {}, means, "id", replicates=400)
    assert lead.best == "vanilla"
    raw = {v.arm: v.test.p for v in lead.vs_best}
    assert raw["lora"] == pytest.approx(0.033, abs=0.001) and raw["pbft"] == pytest.approx(0.044, abs=0.001)
    assert lead.vs("lora").p_holm == pytest.approx(2 * raw["lora"]) and lead.vs("pbft").p_holm == pytest.approx(2 * raw["lora"])
    assert lead.tied == ["vanilla", "pbft", "lora"]
    assert all(v.test.significant() for v in lead.vs_best)  # each alone would be called worse
