"""The training-based methods on a tiny random Llama and a small separable toy task.

The toy task: a sentence contains a fruit word (label 1, " Yes") or a stone word (label 0, " No")
among filler words; every method must lower its loss and fit its training set.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fewtune.config import RunConfig, TrainConfig, validate
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.methods import METHODS, RunContext
from fewtune.methods.distill import distill_kl
from fewtune.models.loading import backbone_and_head, load_model
from fewtune.run.resources import ResourceMeter, count_parameters
from fewtune.scoring.scorer import last_token_logits, pad_batch
from fewtune.tasks.base import DataFile, Example, Split, Task
from fewtune.tasks.prompts import Pattern, verbalizer_token_ids
from fewtune.training.loop import Batch

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")
FILL = "the a big small red old new my your this that one".split()


def toy_task() -> Task:
    split = Split("train", DataFile("toy/train.tsv"), loader=lambda p: [])
    return Task(
        name="toy", description="fruit or stone", label_names=("stone", "fruit"), text_fields=("sentence",),
        train=split, eval_sets={"toy-dev": split}, in_domain=("toy-dev",), icl_separator=" ",
        patterns={"minimal": Pattern("minimal", "{sentence} ?", "", (" No", " Yes")),
                  "released": Pattern("released", "Yes or No?{sentence}", "", (" No", " Yes"))},
        instruction="Does the sentence name a fruit? Answer Yes or No.",
    )


def toy_examples(n: int, seed: int = 0, prefix: str = "t") -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lab = i % 2
        key = rng.choice(["apple", "banana", "cherry"] if lab else ["stone", "brick", "rock"])
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), key)
        out.append(Example(id=f"{prefix}{i}", fields={"sentence": " ".join(words)}, label=lab))
    return out


def make(method: str, params: dict | None = None, *, model_seed: int = 0, pool: list[Example] | None = None, **train):
    """A method instance on a fresh tiny model (fp32, CPU)."""
    lm = load_model("tiny-random", seed=0)
    task = toy_task()
    pattern = task.pattern("minimal")
    cfg = RunConfig(task="cola", method=method, params=params or {}, model="tiny-random", precision="fp32",
                    model_seed=model_seed, eval_batch_size=8, train=TrainConfig(**train))
    ctx = RunContext(cfg, task, pattern, lm, verbalizer_token_ids(lm.tokenizer, pattern.verbalizer), "fp32", CPU,
                     ResourceMeter(CPU), train_pool=pool or [])
    cls = METHODS.get(method)
    return cls(ctx, validate(cls.Params, params or {}))


def accuracy(method, examples) -> float:
    p = method.predict(examples)
    return float((p.pred == np.array([e.label for e in examples])).mean())


FAST = dict(max_steps=30, batch_size=8, warmup_ratio=0.0)

CASES = [
    ("vanilla", {}, 1e-3),
    ("vanilla", {"head": "mlp", "input": "raw"}, 1e-3),
    ("pbft", {}, 1e-3),
    ("pbft", {"restrict_to_verbalizer": True}, 1e-3),
    ("pbft-released", {}, 1e-3),
    ("adaptive", {}, 2e-3),
    ("adaptive", {"objective": "lm", "llrd": 0.9}, 2e-3),
    ("lora", {"r": 4}, 1e-2),
    ("lora", {"objective": "lm"}, 3e-2),
    # alpha 0.2: the teacher is the random tiny model, whose (confident, random) targets the KL term
    # pulls toward; fitting the gold labels needs the CE term to dominate
    ("distill", {"alpha": 0.2}, 1e-3),
    ("distill", {"student": "lora", "alpha": 0.2}, 1e-2),
    ("distill-released", {"released_logit_target": False}, 1e-3),
]


@pytest.mark.parametrize("method,params,lr", CASES, ids=[f"{m}-{'-'.join(map(str, p.values())) or 'default'}" for m, p, _ in CASES])
def test_method_lowers_its_loss_and_fits_the_training_set(method, params, lr):
    train = toy_examples(16)
    m = make(method, params, lr=lr, **FAST)
    summary = m.fit(train)
    hist = summary["loss_history"]
    assert summary["steps"] == m.optimizer_steps == 30
    first, last = np.mean(hist[:3]), np.mean(hist[-3:])
    assert last < first - 0.25 or last < 0.6 * first  # full-vocabulary losses start near ln(49152)
    assert accuracy(m, train) >= 0.9
    assert summary["train_tokens"] > 0 and summary["trainable_params"] > 0


def test_pbft_reports_full_vocabulary_argmax():
    m = make("pbft", lr=1e-3, **FAST)
    m.fit(toy_examples(16))
    p = m.predict(toy_examples(8, seed=1))
    assert p.full_argmax_token is not None and p.outside_verbalizer is not None
    assert p.label_scores.shape == (8, 2) and np.all(p.label_scores <= 0)  # full-vocab log-probs


def test_classifier_predictions_are_log_softmax_of_the_head():
    m = make("vanilla", lr=1e-3, max_steps=2, batch_size=8)
    m.fit(toy_examples(8))
    p = m.predict(toy_examples(6, seed=2))
    assert np.allclose(np.exp(p.label_scores).sum(1), 1.0) and not p.skipped.any()
    assert p.outside_verbalizer is None and p.tokens > 0


def test_vanilla_trains_backbone_and_head_and_counts_them():
    m = make("vanilla", lr=1e-3, max_steps=2, batch_size=8)
    before = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    m.fit(toy_examples(8))
    trainable, total = count_parameters(m.model)
    body, _ = backbone_and_head(m.ctx.lm.model)
    body_n = count_parameters(body)[1]
    assert trainable == total == body_n + 64 * 2  # bias-free linear head on d=64
    changed = [n for n, p in m.ctx.lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("layers.0." in n for n in changed) and any("embed_tokens" in n for n in changed)


def test_adaptive_freezes_lower_layers_bit_identically():
    m = make("adaptive", {"top_layers": 1}, lr=1e-2, max_steps=3, batch_size=8)
    before = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    m.fit(toy_examples(8))
    for n, p in m.ctx.lm.model.named_parameters():
        trained = "layers.3." in n or n.endswith("model.norm.weight")
        assert torch.equal(p, before[n]) != trained, n
    trainable, total = count_parameters(m.model)
    assert 0 < trainable < total
    assert m.describe()["trained_layers"] == [3]


def test_adaptive_embeddings_option():
    m = make("adaptive", {"train_embeddings": True}, lr=1e-2, max_steps=2, batch_size=8)
    emb = m.ctx.lm.model.get_input_embeddings().weight.detach().clone()
    m.fit(toy_examples(8))
    assert not torch.equal(emb, m.ctx.lm.model.get_input_embeddings().weight)


def test_llrd_gives_each_layer_its_rate_and_it_takes_effect():
    """Adam's first update of a weight is ±lr (for |grad| ≫ eps): the size of each layer's update
    shows the rate the optimizer really used (the released code's LLRD never took effect)."""
    gamma, lr = 0.5, 1e-3
    m = make("adaptive", {"top_layers": 3, "llrd": gamma}, lr=lr, max_steps=1, batch_size=8,
             schedule="constant", warmup_ratio=0.0, max_grad_norm=None)
    before = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    m.fit(toy_examples(8))
    L = 4
    rates = m.layer_lrs()
    assert rates == pytest.approx({"head": lr, "top": lr, **{f"layer{i}": lr * gamma ** (L - i) for i in (1, 2, 3)}})
    groups = {g["name"]: g["lr"] for g in m.param_groups()}
    assert groups["layer1"] == pytest.approx(lr * gamma ** 3) and groups["layer3"] == pytest.approx(lr * gamma)
    for i in (1, 2, 3):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        step = (dict(m.ctx.lm.model.named_parameters())[name] - before[name]).abs().max().item()
        assert step == pytest.approx(lr * gamma ** (L - i), rel=0.05), (i, step)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(dict(m.ctx.lm.model.named_parameters())[name], before[name])


def test_adaptive_rejects_more_layers_than_the_model_has():
    with pytest.raises(ConfigError, match="top_layers"):
        make("adaptive", {"top_layers": 9}, max_steps=1).fit(toy_examples(4))


def test_objective_lm_with_raw_input_is_a_config_error():
    with pytest.raises(ConfigError, match="raw"):
        validate(METHODS.get("adaptive").Params, {"objective": "lm", "input": "raw"})


def test_lora_keeps_base_weights_and_reloads_to_identical_predictions(tmp_path):
    from fewtune.methods.lora import load_adapter

    m = make("lora", {"r": 2, "save_dir": str(tmp_path / "adapter")}, lr=1e-2, max_steps=3, batch_size=8)
    base = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    summary = m.fit(toy_examples(8))
    for n, p in m.ctx.lm.model.named_parameters():
        if "lora_" in n:
            continue
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, base[key]), n
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in m.ctx.lm.model.named_parameters())
    trainable, total = count_parameters(m.model)
    lora_params = sum(p.numel() for n, p in m.ctx.lm.model.named_parameters() if "lora_" in n)
    assert trainable == lora_params + 64 * 2
    assert summary["saved_to"] == str(tmp_path / "adapter")

    evals = toy_examples(10, seed=5)
    want = m.predict(evals)
    fresh = load_model("tiny-random", seed=0).model
    model, head = load_adapter(fresh, tmp_path / "adapter")
    from fewtune.methods._trainable import classify
    from fewtune.scoring.heads import ClassifierNet

    net = ClassifierNet(backbone_and_head(model)[0], head)
    got = classify(net, m.ctx.lm.tokenizer, [m.input_text(e) for e in evals], num_labels=2, batch_size=4,
                   max_context=2048, precision="fp32", device=CPU)
    assert np.array_equal(got.pred, want.pred)
    assert np.allclose(got.label_scores, want.label_scores, atol=1e-6)


def test_lora_lm_objective_adapter_reloads(tmp_path):
    from fewtune.methods.lora import load_adapter
    from fewtune.scoring.scorer import score_prompts

    m = make("lora", {"objective": "lm", "save_dir": str(tmp_path / "a")}, lr=1e-2, max_steps=2, batch_size=8)
    m.fit(toy_examples(8))
    evals = toy_examples(6, seed=3)
    want = m.predict(evals)
    model, head = load_adapter(load_model("tiny-random", seed=0).model, tmp_path / "a")
    assert head is None
    got = score_prompts(model, m.ctx.lm.tokenizer, [m.input_text(e) for e in evals], m.ctx.verbalizer.token_ids)
    assert np.allclose(got.label_logprobs, want.label_scores, atol=1e-6)


def test_same_seeds_same_model_other_model_seed_other_head():
    a = make("vanilla", lr=1e-3, max_steps=3, batch_size=4)
    b = make("vanilla", lr=1e-3, max_steps=3, batch_size=4)
    c = make("vanilla", lr=1e-3, max_steps=3, batch_size=4, model_seed=1)
    train, evals = toy_examples(8), toy_examples(6, seed=9)
    for m in (a, b, c):
        m.fit(train)
    pa, pb, pc = (m.predict(evals).label_scores for m in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.allclose(pa, pc)


def test_training_inputs_are_truncated_from_the_left_and_counted():
    m = make("vanilla", lr=1e-3, max_steps=1, batch_size=8, max_length=8)
    long = Example("long", {"sentence": " ".join(["word"] * 30) + " apple"}, 1)
    seqs = m.encode_training([m.input_text(long), m.input_text(toy_examples(1)[0])])
    full = m.ctx.lm.tokenizer(m.input_text(long))["input_ids"]
    assert len(seqs[0]) == 8 and seqs[0] == full[-8:]  # the end (answer position) is kept
    assert any("truncated" in w for w in m.warnings())


def test_eval_curve_is_recorded_every_epoch():
    m = make("vanilla", lr=1e-3, epochs=3, batch_size=8, eval_every_epoch=True)
    evals = toy_examples(6, seed=4)
    calls = []

    def evaluate():
        calls.append(1)
        p = m.predict(evals)
        return {"toy-dev": {"accuracy": float((p.pred == np.array([e.label for e in evals])).mean())}}

    m.ctx.evaluate = evaluate
    summary = m.fit(toy_examples(8))
    assert len(calls) == 3 and [p["epoch"] for p in summary["curve"]] == [1.0, 2.0, 3.0]


# --- context distillation --------------------------------------------------------------------


def test_pbft_loss_is_full_vocabulary_cross_entropy():
    """Mosbach's PBFT: CE over all V logits with the verbalizer token as target — not CE over the
    verbalizer logits only (that is ``restrict_to_verbalizer``), which ignores the rest of V."""
    m = make("pbft", lr=1e-3, **FAST)
    m.labels = torch.tensor([0, 1, 1, 0])
    net = m.build_net()
    batch_seqs = [m.ctx.lm.tokenizer(m.input_text(e))["input_ids"] for e in toy_examples(4)]
    ids, mask, last = pad_batch(batch_seqs, m.ctx.lm.tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        logits = net(ids, mask, last)
    assert logits.shape[1] == len(m.ctx.lm.tokenizer)  # full vocabulary, not the 2 verbalizer rows
    batch = Batch(ids, mask, last, torch.arange(4))
    targets = torch.tensor(m.ctx.verbalizer.token_ids)[m.labels]
    want = -torch.log_softmax(logits.double(), -1)[torch.arange(4), targets].mean()
    assert float(m.loss(logits, batch)) == pytest.approx(float(want), rel=1e-5)
    verb_only = torch.nn.functional.cross_entropy(logits[:, list(m.ctx.verbalizer.token_ids)], m.labels)
    assert abs(float(want) - float(verb_only)) > 1.0  # the two objectives are far apart on this model


def test_pbft_moves_probability_mass_onto_the_verbalizer():
    """Full-vocabulary CE also teaches the model to answer with a verbalizer token at all."""
    train = toy_examples(16)
    m = make("pbft", lr=1e-3, **FAST)
    before = np.exp(m.predict(train).label_scores).sum(1).mean()
    m.fit(train)
    after = np.exp(m.predict(train).label_scores).sum(1).mean()
    assert before < 0.05 and after > 0.5


def test_distillation_loss_is_kl_teacher_to_student_times_t_squared():
    """T² · KL(p_teacher,T ‖ q_student,T) (Hinton et al.): the forward direction (mass-covering)
    and the T² factor that keeps gradient magnitudes independent of T."""
    from torch.distributions import Categorical, kl_divergence

    teacher = torch.log_softmax(torch.tensor([[2.0, -1.0, 0.0], [0.3, 0.1, -3.0]]), dim=-1)
    student = torch.tensor([[-1.0, 1.5, 0.2], [2.0, -2.0, 0.5]])
    for temp in (1.0, 2.0, 3.0):
        p, q = Categorical(logits=teacher / temp), Categorical(logits=student / temp)
        want = kl_divergence(p, q) * temp**2
        assert torch.allclose(distill_kl(student, teacher, temp), want, atol=1e-6)
        assert not torch.allclose(kl_divergence(q, p) * temp**2, want, atol=1e-2)  # direction matters here


def test_distill_loss_weighs_kl_and_ce():
    m = make("distill", {"alpha": 0.3, "temperature": 2.0}, lr=1e-3, max_steps=1, batch_size=8)
    vocab = len(m.ctx.lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g) * 3
    m.labels = torch.tensor([1, 0, 1])
    m.teacher_logp = torch.log_softmax(torch.randn(3, 2, generator=g) * 2, -1)
    m.teacher_valid = torch.tensor([True, True, True])
    batch = Batch(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                  torch.arange(3))
    verb = logits[:, list(m.ctx.verbalizer.token_ids)]
    from torch.distributions import Categorical, kl_divergence

    kl = (kl_divergence(Categorical(logits=m.teacher_logp / 2), Categorical(logits=verb / 2)) * 4).mean()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(m.ctx.verbalizer.token_ids)[m.labels])
    assert float(m.loss(logits, batch)) == pytest.approx(float(0.3 * kl + 0.7 * ce), rel=1e-5)


def test_distill_loss_is_a_per_example_mean_when_teacher_prompts_were_skipped():
    """The data-parallel loop weights each process's mean loss by its share of the global batch
    (``shard_batch``), which is the global mean only for a mean of per-example terms: two shards
    with different numbers of skipped teacher prompts must recombine to the whole batch's loss."""
    m = make("distill", {"alpha": 0.5}, lr=1e-3, max_steps=1, batch_size=8)
    vocab = len(m.ctx.lm.tokenizer)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, vocab, generator=g) * 3
    m.labels = torch.tensor([1, 0, 1, 0, 1, 0])
    m.teacher_logp = torch.log_softmax(torch.randn(6, 2, generator=g) * 2, -1)
    m.teacher_valid = torch.tensor([True, False, False, True, True, True])

    def loss(rows):
        idx = torch.tensor(rows)
        b = Batch(torch.zeros(len(rows), 1, dtype=torch.long), torch.ones(len(rows), 1, dtype=torch.long),
                  torch.zeros(len(rows), dtype=torch.long), idx)
        return float(m.loss(logits[idx], b))

    whole = loss([0, 1, 2, 3, 4, 5])
    for split in (([0, 1, 2], [3, 4, 5]), ([0, 1], [2, 3, 4, 5])):
        a, b = split
        assert (len(a) * loss(a) + len(b) * loss(b)) / 6 == pytest.approx(whole, rel=1e-6)


def test_lm_and_classifier_nets_compute_their_head_in_fp32_under_bf16():
    from fewtune.models.loading import autocast
    from fewtune.scoring.heads import ClassifierNet, LMNet
    from fewtune.scoring.scorer import last_hidden

    m = make("vanilla", lr=1e-3, max_steps=1)
    body, lm_head = backbone_and_head(m.ctx.lm.model)
    seqs = [m.ctx.lm.tokenizer(m.input_text(e))["input_ids"] for e in toy_examples(6)]
    ids, mask, last = pad_batch(seqs, m.ctx.lm.tokenizer.pad_token_id, CPU)
    head = torch.nn.Linear(64, 2, bias=False)
    torch.nn.init.normal_(head.weight, std=3.0)
    rows = list(m.ctx.verbalizer.token_ids)
    with torch.no_grad(), autocast("bf16", CPU):
        h = last_hidden(body, ids, mask, last).float()
        outs = {"lm": LMNet(body, lm_head)(ids, mask, last), "rows": LMNet(body, lm_head, rows)(ids, mask, last),
                "cls": ClassifierNet(body, head)(ids, mask, last)}
    want = {"lm": h @ lm_head.weight.T, "rows": h @ lm_head.weight[rows].T, "cls": h @ head.weight.T}
    for k, v in outs.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, want[k], atol=1e-4, rtol=1e-5, msg=k)


def test_distillation_loss_is_zero_iff_student_matches_teacher():
    t = torch.log_softmax(torch.tensor([[1.0, -2.0], [0.3, 0.1]]), dim=-1)
    for temp in (1.0, 2.0):
        assert torch.allclose(distill_kl(t + 5.0, t, temp), torch.zeros(2), atol=1e-6)  # a shift changes nothing
        assert (distill_kl(t.flip(-1), t, temp) > 1e-3).all()
    # T² scaling: small logit gaps make KL ≈ quadratic in 1/T, so T²·KL stays of the same order
    assert distill_kl(t.flip(-1), t, 4.0).sum() > 0


def test_distill_teacher_prompt_is_never_cut_to_the_student_length():
    m = make("distill", {"k": 4, "pool": "train"}, lr=1e-3, max_steps=1, batch_size=8, max_length=8,
             pool=toy_examples(12, seed=7, prefix="p"))
    sample = toy_examples(8)
    examples = m.training_examples(sample)
    seqs = m.encode_training([m.input_text(e) for e in examples])
    m.before_build(examples, seqs)
    tok = m.ctx.lm.tokenizer
    for i, ex in enumerate(examples[:3]):
        prefix, query = m.teacher_prompt(m.demonstrations_for(i, ex), ex)
        ids = tok(prefix)["input_ids"] + tok(query, add_special_tokens=False)["input_ids"]
        assert len(ids) > 8 >= len(seqs[i])  # the student is truncated, the teacher is not
        assert prefix.startswith(m.ctx.task.instruction) and query.endswith(m.ctx.pattern.query(ex.fields))
        # alignment: both read the last token of the same pattern query
        student_full = tok(m.input_text(ex))["input_ids"]
        assert ids[-1] == seqs[i][-1] == student_full[-1]
        logits = last_token_logits(m.ctx.lm.model, *pad_batch([ids], tok.pad_token_id, CPU))
        want = torch.log_softmax(logits, -1)[0, list(m.ctx.verbalizer.token_ids)]
        assert torch.allclose(m.teacher_logp[i], want, atol=1e-5)


def test_distill_pool_excludes_demonstrations_and_leave_one_out_in_few_shot():
    pool = toy_examples(20, seed=7, prefix="p")
    m = make("distill", {"k": 4, "pool": "train", "pool_size": 10}, max_steps=1, pool=pool)
    sample = pool[:8]
    students = m.training_examples(sample)
    demo_ids = {e.id for e in m.shared_demos}
    assert len(students) == 10 and not demo_ids & {e.id for e in students}
    f = make("distill", {}, max_steps=1)
    sample = toy_examples(8)
    f.training_examples(sample)
    for i, ex in enumerate(sample):
        demos = f.demonstrations_for(i, ex)
        assert ex.id not in {d.id for d in demos} and len(demos) == 6  # 3 per class left → 6 balanced


def test_distill_with_pure_kl_and_lora_student_keeps_base_weights():
    m = make("distill", {"labels": False, "student": "lora", "temperature": 2.0}, lr=1e-2, max_steps=3, batch_size=8)
    base = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    s = m.fit(toy_examples(8))
    assert s["effective_alpha"] == 1.0 and s["teacher_tokens"] > 0
    for n, p in m.ctx.lm.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace("base_model.model.", "").replace(".base_layer", "")])


def test_distill_released_raw_logit_target_reproduces_the_bug_clearly():
    m = make("distill-released", {}, lr=1e-3, max_steps=2, batch_size=8)
    with pytest.raises(TrainingDiverged, match="raw logits") as exc:
        m.fit(toy_examples(8))
    assert "released_logit_target=false" in exc.value.hint


def test_distill_released_student_and_teacher_read_the_same_text():
    m = make("distill-released", {"released_logit_target": False}, lr=1e-3, max_steps=1, batch_size=8)
    ex = toy_examples(1)[0]
    assert m.input_text(ex) == f"{m.ctx.task.instruction} {ex.fields['sentence']} ?"
