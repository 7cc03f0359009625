"""Claims as data: specs, the generic evaluator, and the bootstrap over seeds × eval examples.

Synthetic runs (``make_run``) carry stored accuracies; where a test needs per-example outcomes it
builds ``Scores`` by hand, so every expected number can be worked out on paper.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_stats import make_run

from fewtune import stats as st
from fewtune.errors import ConfigError
from fewtune.report.claims import CLAIMS_CSV_HEADER, add_claims_section, claims_csv_rows
from fewtune.report.doc import Doc, render_markdown
from fewtune.stats import claims as cl
from fewtune.stats.resample import PairedBootstrap, Scores, Term, paired_bootstrap
from fewtune.study import parse_study

SPECS = {c["key"]: c for c in cl.load_claims("srinivasan2024")}
REPS = 400


def _claims(runs, scores=None, failed=None):
    rows = st.eval_rows(runs)
    return {c.key: c for c in cl.evaluate_claims(list(SPECS.values()), rows, scores or {}, failed, replicates=REPS)}


def _scores(correct: np.ndarray, skipped: np.ndarray | None = None, prefix: str = "x") -> Scores:
    n = len(correct)
    return Scores(np.array([f"{prefix}:{i}" for i in range(n)]), np.asarray(correct, bool),
                  np.zeros(n, bool) if skipped is None else np.asarray(skipped, bool))


# ---------------------------------------------------------------------------------------------
# specs


def test_bundled_claims_load_and_bad_specs_are_config_errors() -> None:
    assert list(SPECS) == ["cd-beats-ft", "pbft-worse-ood", "efficient-comparable", "ft-icl-similar"]
    assert SPECS["efficient-comparable"]["kind"] == "non-inferiority" and SPECS["efficient-comparable"]["margin"] == 0.10
    with pytest.raises(ConfigError, match="needs a positive 'margin'"):
        cl.load_claims([{"key": "k", "statement": "s", "kind": "equivalence", "methods": ["a"], "reference": "b"}])
    with pytest.raises(ConfigError, match="unknown claim file 'nope'"):
        cl.load_claims("nope")
    with pytest.raises(ConfigError, match="unique"):
        cl.load_claims(["srinivasan2024", "srinivasan2024"])


def test_a_study_yaml_declares_its_own_claims() -> None:
    mine = {"key": "lora-close", "statement": "LoRA is within 0.02 of vanilla.", "kind": "equivalence", "methods": ["lora"],
            "reference": "vanilla", "margin": 0.02}
    study = parse_study({"name": "s", "claims": ["srinivasan2024", mine]})
    assert [c["key"] for c in study.claims][-1] == "lora-close"
    assert parse_study(study.to_dict()).claims == study.claims  # stored study.yaml round-trips
    with pytest.raises(ConfigError, match="not a valid claim"):
        parse_study({"name": "s", "claims": [{**mine, "kind": "better"}]})


# ---------------------------------------------------------------------------------------------
# verdicts (stored accuracies: no predictions, so only the seed level is resampled)


def test_claims_not_enough_data_when_methods_missing_or_one_seed() -> None:
    claims = _claims([make_run("cola", "vanilla", 16, s, (0.7, 0.6)) for s in range(3)])
    assert all(c.verdict == "not enough data" for c in claims.values())
    assert "distill" in claims["cd-beats-ft"].reason
    one_seed = [make_run(t, m, n, 0, (0.7, 0.6)) for t in ("cola", "mnli") for m in ("vanilla", "pbft") for n in (2, 16)]
    assert _claims(one_seed)["pbft-worse-ood"].verdict == "not enough data"


def test_claim_pbft_worse_ood_supported_and_contradicted() -> None:
    van = [make_run("cola", "vanilla", 16, s, (0.70, 0.60 + 0.01 * s), n_eval=5000) for s in range(5)]
    worse = [make_run("cola", "pbft", 16, s, (0.70, 0.50 + 0.01 * s + 0.002 * (s % 2)), n_eval=5000) for s in range(5)]
    better = [make_run("cola", "pbft", 16, s, (0.70, 0.70 + 0.01 * s + 0.002 * (s % 2)), n_eval=5000) for s in range(5)]
    c = _claims(van + worse)["pbft-worse-ood"]
    assert c.verdict == "supported"
    assert c.tests[0].test.diff == pytest.approx(-0.0992, abs=1e-4)
    assert "5 samples / 5 seeds" in c.reason and "no predictions for cola-ood" in c.reason
    assert _claims(van + better)["pbft-worse-ood"].verdict == "contradicted"


def test_claim_cd_beats_ft_not_supported_without_significant_difference() -> None:
    van = [make_run("mnli", "vanilla", 16, s, (0.60 + 0.02 * s, 0.5), n_eval=5000) for s in range(4)]
    cd = [make_run("mnli", "distill", 16, s, (0.60 + 0.02 * s + (0.01 if s % 2 else -0.01), 0.5), n_eval=5000) for s in range(4)]
    c = _claims(van + cd)["cd-beats-ft"]
    assert c.verdict == "not supported" and "no significant difference" in c.reason


def _efficient(delta: float) -> list:
    van = [make_run("cola", "vanilla", 16, s, (0.80 + 0.01 * s, 0.75 + 0.01 * s), n_eval=5000) for s in range(6)]
    eff = [make_run("cola", m, 16, s, (0.80 + delta + 0.01 * s + 0.003 * (s % 2), 0.75 + delta + 0.01 * s + 0.003 * (s % 3)), n_eval=5000)
           for m in ("adaptive", "lora") for s in range(6)]
    return van + eff


def test_claim_efficient_is_non_inferiority_slightly_worse_supports_it() -> None:
    """Claim 3 is one-sided: 'comparable to or slightly worse'. A CI inside [−0.10, −0.06] supports
    it (a ±0.05 equivalence test called it contradicted)."""
    c = _claims(_efficient(-0.08))["efficient-comparable"]
    assert all(-0.10 < t.ci_low and t.ci_high < -0.06 for t in (x.test for x in c.tests))
    assert c.verdict == "supported" and "non-inferior" in c.reason
    far = _claims(_efficient(-0.2))["efficient-comparable"]
    assert far.verdict == "contradicted" and "clearly worse" in far.reason
    better = _claims(_efficient(+0.1))["efficient-comparable"]
    assert better.verdict == "contradicted" and "clearly better" in better.reason


def test_a_claim_test_is_the_two_level_test_at_the_claims_level() -> None:
    """A claim's comparison holds ``stats.two_level_test`` at the claim's level (1 − 2α, TOST by
    interval, for interval kinds; 1 − α for direction claims). Only direction claims use a p: an
    interval-only comparison shows none (NaN, '–' in the report) although its two-level test has one."""
    rows = st.eval_rows(_efficient(-0.08))
    interval = cl.ClaimSpec.model_validate(SPECS["efficient-comparable"])
    direction = cl.ClaimSpec.model_validate({**SPECS["pbft-worse-ood"], "methods": ["lora"], "domains": ["id"]})
    for spec, level in ((interval, 0.90), (direction, 0.95)):
        ct = cl.claim_tests(spec, rows, {}, ["lora"], REPS)[0]
        want = st.two_level_test(ct.test.boot, level)
        assert (ct.test.ci_low, ct.test.ci_high, ct.test.t_low, ct.test.t_high) == (want.ci_low, want.ci_high, want.t_low, want.t_high)
        assert math.isfinite(ct.test.p)
    assert math.isnan(cl.claim_tests(interval, rows, {}, ["lora"], REPS)[0].p)
    assert ct.p == ct.test.p
    res = [cl.evaluate_claim(s, rows, {}, replicates=REPS, breakdown=False) for s in (interval, direction)]
    p_col = CLAIMS_CSV_HEADER.index("p")
    csv_p = [(r[0], r[p_col]) for r in claims_csv_rows(res, {})]
    assert len(csv_p) == 5 and all(math.isnan(p) for key, p in csv_p[:4]) and csv_p[4] == (direction.key, res[1].tests[0].p)
    doc = Doc()
    add_claims_section(doc, [interval, direction], res)
    md_p = [line.split(" | ")[8] for line in render_markdown(doc).splitlines() 
            if line.startswith((f"| {interval.key} | ", f"| {direction.key} | ")) and " − vanilla, " in line]
    assert md_p == ["–"] * 4 + [f"{res[1].tests[0].p:.3g}"]


def test_claim_lora_ranks_are_pooled_per_sample() -> None:
    van = [make_run("cola", "vanilla", 16, s, (0.70, 0.65)) for s in range(3)]
    lora = [make_run("cola", "lora", 16, s, (0.70 + d, 0.65 + d), params={"r": r}) for s in range(3) for r, d in ((1, -0.02), (8, 0.02))]
    c = _claims(van + lora)["efficient-comparable"]
    lora_id = next(t for t in c.tests if t.label.startswith("lora") and "ID" in t.label)
    assert lora_id.test.n_pairs == 3  # one pair per sample, not per rank
    assert lora_id.test.diff == pytest.approx(0.0)


def test_claim_ft_icl_generalise_similarly() -> None:
    van = [make_run("cola", "vanilla", n, s, (0.80 + 0.01 * s, 0.75 + 0.01 * s + 0.002 * (s % 2)), n_eval=5000) for n in (2, 16) for s in range(3)]
    icl = [make_run("cola", "icl", n, s, (0.60 + 0.01 * s, 0.55 + 0.01 * s), n_eval=5000) for n in (2, 16) for s in range(3)]
    c = _claims(van + icl)["ft-icl-similar"]
    assert c.verdict == "supported"
    assert c.tests[0].test.n_pairs == 6 and abs(c.tests[0].test.diff) < 0.01


def test_claims_between_constant_predictors_are_inconclusive() -> None:
    runs = [make_run("cola", m, 16, s, (0.69, 0.686)) for m in ("vanilla", "adaptive", "lora") for s in range(3)]
    c = _claims(runs)["efficient-comparable"]
    assert c.verdict == "inconclusive"
    assert "mostly at the majority baseline" in c.reason and "would otherwise be: supported" in c.reason


def test_failed_and_collapsed_runs_are_named_in_the_claim() -> None:
    runs = _efficient(-0.08)
    runs[0][2]["collapsed"] = "loss at ln(2)"  # a vanilla run
    c = _claims(runs, failed={"lora": 2})["efficient-comparable"]
    assert any("failed runs are not in this comparison: lora 2" in cv for cv in c.caveats)
    assert any("collapsed runs" in cv and "vanilla 1" in cv for cv in c.caveats)


# ---------------------------------------------------------------------------------------------
# pseudo-replication, Holm, intersections, eval-sampling error


def _with_glue_dev(run, delta: float):
    """The run also scored on cola-glue-dev, a second in-domain eval set."""
    rid, cfg, m = run
    m["eval"]["cola-glue-dev"] = {**m["eval"]["cola-id"], "accuracy": m["eval"]["cola-id"]["accuracy"] + delta}
    return rid, cfg, m


def test_two_eval_sets_of_one_domain_are_one_pair_per_sample() -> None:
    van = [_with_glue_dev(make_run("cola", "vanilla", 16, s, (0.70 + 0.01 * s, 0.6), n_eval=5000), 0.0) for s in range(4)]
    pb = [_with_glue_dev(make_run("cola", "pbft", 16, s, (0.60 + 0.012 * s, 0.6), n_eval=5000), 0.04) for s in range(4)]
    spec = {**SPECS["pbft-worse-ood"], "domains": ["id"]}
    c = cl.evaluate_claim(spec, st.eval_rows(van + pb), {}, replicates=REPS)
    t = c.tests[0].test
    assert t.n_pairs == 4  # not 8: cola-id and cola-glue-dev of one run are one few-shot sample
    # per sample: mean of the two sets' differences, e.g. seed 0: ((0.60 − 0.70) + (0.64 − 0.70)) / 2 = −0.08
    assert t.diff == pytest.approx(np.mean([(0.002 * s * 2 + 0.04 - 0.2) / 2 for s in range(4)]))


def _test(diff: float, p: float, label: str) -> cl.ClaimTest:
    a = np.array([0.7 + diff, 0.7 + diff, 0.7 + diff])
    b = np.full(3, 0.7)
    boot = PairedBootstrap((("m", "t", 16, 0), ("m", "t", 16, 1), ("m", "t", 16, 2)), a, b, np.full(10, diff), np.full(10, diff),
                           np.full(10, diff), (), 100)
    return cl.ClaimTest(label, st.TwoLevelTest(boot, diff - 0.01, diff + 0.01, diff - 0.01, diff + 0.01, p, p), p)


def test_holm_correction_changes_a_direction_verdict() -> None:
    """'Better in ID or OOD' at p = 0.03 and 0.50 is not significant after Holm (0.06); uncorrected it
    would be 'supported'."""
    spec = cl.ClaimSpec.model_validate(SPECS["cd-beats-ft"])
    verdict, done = cl.decide(spec, [_test(0.05, 0.03, "ID"), _test(0.01, 0.5, "OOD")])
    assert verdict == "not supported"
    assert done[0].p_holm == pytest.approx(0.06) and done[0].outcome == "no significant difference"
    verdict, _ = cl.decide(spec, [_test(0.05, 0.01, "ID"), _test(0.01, 0.5, "OOD")])
    assert verdict == "supported"  # 0.01 · 2 = 0.02 < 0.05


def test_paired_examples_are_the_intersection_of_non_skipped() -> None:
    """vanilla is right on examples 0–69; pbft skipped 60–79 and is right on 0–59. On the 80 examples
    both scored, both are right on 60: the difference is 0 (each on its own examples: +0.05;
    skipped counted as wrong: −0.10)."""
    idx = np.arange(100)
    rows, scores = [], {}
    for seed in range(3):
        for method, correct, skipped in (("vanilla", idx < 70, None), ("pbft", idx < 60, (idx >= 60) & (idx < 80))):
            rid, cfg, m = make_run("cola", method, 16, seed, (0.7, 0.6))
            rows.append((rid, cfg, m))
            scores[rid] = {"cola-id": _scores(correct, skipped, "cola-id")}
    boot = paired_bootstrap(st.eval_rows(rows), scores, [Term("pbft", "id")], [Term("vanilla", "id")], replicates=REPS)
    assert boot.diff == pytest.approx(0.0)
    assert boot.unit_a == pytest.approx([0.75] * 3) and boot.examples == 80


def test_bootstrap_includes_eval_sampling_error_that_a_seed_interval_misses() -> None:
    """Every seed of a method gets (nearly) the same outcomes on 60 shared examples: seeds agree, so
    the seed-only interval is narrow, but another draw of 60 examples would move both means."""
    rng = np.random.default_rng(0)
    base_a, base_b = rng.random(60) < 0.75, rng.random(60) < 0.65
    rows, scores = [], {}
    for seed in range(5):
        for method, base in (("pbft", base_a), ("vanilla", base_b)):
            correct = base.copy()
            correct[seed] = not correct[seed]  # one example differs per seed
            rid, cfg, m = make_run("cola", method, 16, seed, (0.7, 0.6), n_eval=60)
            rows.append((rid, cfg, m))
            scores[rid] = {"cola-id": _scores(correct, prefix="cola-id")}
    boot = paired_bootstrap(st.eval_rows(rows), scores, [Term("pbft", "id")], [Term("vanilla", "id")], replicates=REPS)
    assert boot.se("eval_only") > 4 * boot.se("seed_only")
    assert boot.se("total") >= boot.se("eval_only") * 0.9
    spec = cl.ClaimSpec.model_validate({**SPECS["pbft-worse-ood"], "domains": ["id"]})
    t = cl.claim_tests(spec, st.eval_rows(rows), scores, ["pbft"], REPS)[0].test
    assert (t.ci_high - t.ci_low) > 3 * (t.t_high - t.t_low)  # the verdict's interval is the wide one
    lo, hi = boot.ci(0.95)
    assert t.ci_low <= lo and t.ci_high >= hi


def test_few_seeds_keep_the_t_correction() -> None:
    """3 samples with differences −0.02, −0.08, −0.14: every bootstrap resample is negative (a
    percentile bootstrap over 3 values under-covers), but the paired t-test gives p ≈ 0.15."""
    van = [make_run("cola", "vanilla", 16, s, (0.70, 0.70), n_eval=5000) for s in range(3)]
    pb = [make_run("cola", "pbft", 16, s, (0.70, 0.68 - 0.06 * s), n_eval=5000) for s in range(3)]
    c = _claims(van + pb)["pbft-worse-ood"]
    assert c.tests[0].p == pytest.approx(0.147, abs=0.01)
    assert c.verdict == "not supported"
    # the same for intervals: differences −0.02, −0.06, −0.10 — the bootstrap's 90 % interval stays
    # above −0.10 (non-inferior), the t-interval reaches −0.127: the verdict must not claim it
    van = [make_run("cola", "vanilla", 16, s, (0.70, 0.70), n_eval=5000) for s in range(3)]
    ad = [make_run("cola", "adaptive", 16, s, (0.68 - 0.04 * s, 0.68 - 0.04 * s), n_eval=5000) for s in range(3)]
    c = _claims(van + ad)["efficient-comparable"]
    assert c.tests[0].test.boot.ci(0.9)[0] > -0.10 and c.tests[0].test.ci_low == pytest.approx(-0.127, abs=0.002)
    assert c.verdict == "inconclusive"


def test_identical_outcomes_have_no_eval_sampling_error_the_bootstrap_is_paired() -> None:
    """Two methods right on exactly the same examples (a different set per seed): every resample of
    the eval examples moves both the same way, so A − B never changes. An unpaired bootstrap (B's
    examples drawn with other weights) would report an eval-only SE of about √(2p(1−p)/n) ≈ 0.06 per
    seed, ≈ 0.03 over these 4 seeds."""
    rng = np.random.default_rng(1)
    rows, scores = [], {}
    for seed in range(4):
        correct = rng.random(120) < 0.7
        for method in ("pbft", "vanilla"):
            rid, cfg, m = make_run("cola", method, 16, seed, (0.7, 0.6), n_eval=120)
            rows.append((rid, cfg, m))
            scores[rid] = {"cola-id": _scores(correct, prefix="cola-id")}
    boot = paired_bootstrap(st.eval_rows(rows), scores, [Term("pbft", "id")], [Term("vanilla", "id")], replicates=REPS)
    assert boot.diff == 0.0 and len(boot.units) == 4
    assert boot.se("eval_only") < 1e-9 and boot.se("total") < 1e-9


def test_opposite_effects_at_two_n_get_their_own_verdicts() -> None:
    """Distillation 5 points ahead of vanilla at n=2 and 5 points behind at n=16: pooled over n the
    effects cancel ('not supported'), the per-n verdicts show both; per task (one task) adds nothing."""
    runs = []
    for s in range(4):
        w = 0.004 * (s % 2)
        runs += [make_run("mnli", "vanilla", n, s, (0.60 + 0.01 * s, 0.5), n_eval=5000) for n in (2, 16)]
        runs += [make_run("mnli", "distill", 2, s, (0.65 + 0.01 * s + w, 0.5), n_eval=5000),
                 make_run("mnli", "distill", 16, s, (0.55 + 0.01 * s - w, 0.5), n_eval=5000)]
    c = _claims(runs)["cd-beats-ft"]
    assert c.verdict == "not supported" and c.scope == "pooled"
    assert [(s.scope, s.verdict) for s in c.strata] == [("n=2", "supported"), ("n=16", "contradicted")]
    assert c.strata[0].tests[0].test.n_pairs == 4 and c.strata[0].tests[0].test.diff == pytest.approx(0.052)
    one_n = _claims([r for r in runs if r[1]["n"] == 2])["cd-beats-ft"]
    assert one_n.verdict == "supported" and one_n.strata == ()
    doc = Doc()
    add_claims_section(doc, [cl.ClaimSpec.model_validate(SPECS["cd-beats-ft"])], [c])
    md = render_markdown(doc)
    assert "| not supported | n=2: supported · n=16: contradicted |" in md
    assert "separate hypotheses" in md and "no correction is applied across claims" in md
    assert "| cd-beats-ft | n=16 | contradicted |" in md
    rows = claims_csv_rows([c], {})
    assert [r[-1] for r in rows] == ["pooled"] * 2 + ["n=2"] * 2 + ["n=16"] * 2  # ID and OOD per scope
