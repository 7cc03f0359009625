"""The shared training loop (fewtune.training.loop) on small stand-in modules — no language model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewtune.config import TrainConfig
from fewtune.errors import TrainingDiverged
from fewtune.training.loop import LengthGroupedBatches, _optimizer_groups, make_scheduler, train

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0


class BagNet(nn.Module):
    """Mean of token embeddings over the real tokens → 2 logits (sees ids, mask, last like an LM net)."""

    def __init__(self, vocab: int = 20, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, 2)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.out.weight.copy_(torch.randn(2, dim, generator=g) * 0.1)
            self.out.bias.zero_()
        self.seen_last: list[torch.Tensor] = []

    def forward(self, ids, mask, last):
        self.seen_last.append(last.clone())
        e = self.emb(ids) * mask.unsqueeze(-1)
        return self.out(e.sum(1) / mask.sum(1, keepdim=True))


def toy_data(n: int = 16, seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """Label 1 sequences contain token 3, label 0 sequences token 4; lengths vary 2..7."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for i in range(n):
        lab = i % 2
        length = int(torch.randint(2, 8, (1,), generator=g))
        s = torch.randint(5, 20, (length,), generator=g).tolist()
        s[int(torch.randint(0, length, (1,), generator=g))] = 3 if lab else 4
        seqs.append(s)
        labels.append(lab)
    return seqs, torch.tensor(labels)


def ce(labels: torch.Tensor):
    return lambda logits, batch: F.cross_entropy(logits, labels[batch.idx])


def run(net, seqs, loss_fn, cfg: TrainConfig, seed: int = 0, **kw):
    groups = [{"params": [p for p in net.parameters() if p.requires_grad]}]
    return train(net, seqs, loss_fn, groups, cfg, pad_id=PAD, precision="fp32", model_seed=seed, device=CPU, **kw)


def test_loop_fits_a_separable_task_and_counts_steps_and_tokens():
    seqs, labels = toy_data(16)
    net = BagNet()
    cfg = TrainConfig(lr=0.05, epochs=30, batch_size=4, warmup_ratio=0.1)
    res = run(net, seqs, ce(labels), cfg)
    assert res.steps == res.total_steps == 30 * 4  # 16 examples / batch 4 = 4 steps per epoch
    assert res.warmup_steps == math.ceil(0.1 * 120)
    assert res.loss_history[-1] < 0.2 * res.loss_history[0]
    assert res.train_tokens == 30 * sum(len(s) for s in seqs)
    with torch.no_grad():
        from fewtune.scoring.scorer import pad_batch

        pred = net(*pad_batch(seqs, PAD, CPU)).argmax(-1)
    assert (pred == labels).float().mean() == 1.0
    # ``last`` handed to the module is each row's last real token
    assert all(int(lst.max()) <= 6 for lst in net.seen_last)
    s = res.summary(cfg)
    assert s["steps"] == 120 and s["final_loss"] == res.loss_history[-1] and s["train_tokens"] == res.train_tokens
    assert s["released_warmup_steps"] == 0  # the study's int(0.1 * (16 // 32) * 40)


def test_max_steps_override_epochs_and_fractional_epochs():
    seqs, labels = toy_data(16)
    res = run(BagNet(), seqs, ce(labels), TrainConfig(lr=0.01, epochs=40, max_steps=6, batch_size=4))
    assert res.steps == 6 and res.epochs_run == pytest.approx(1.5)
    res = run(BagNet(), seqs, ce(labels), TrainConfig(lr=0.01, epochs=0.5, batch_size=4))
    assert res.steps == 2


def test_gradient_accumulation_matches_the_larger_batch():
    """batch 4 × accumulation 2 takes the same optimizer steps as batch 8 (same examples per step)."""
    seqs, labels = toy_data(16)
    a, b = BagNet(), BagNet()
    common = dict(lr=0.05, epochs=3, warmup_ratio=0.0, group_by_length=False, max_grad_norm=None)
    ra = run(a, seqs, ce(labels), TrainConfig(batch_size=8, grad_accum=1, **common))
    rb = run(b, seqs, ce(labels), TrainConfig(batch_size=4, grad_accum=2, **common))
    assert ra.steps == rb.steps == 6 and rb.effective_batch_size == 8
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_uneven_accumulation_still_steps_at_epoch_end():
    seqs, labels = toy_data(12)  # 3 batches of 4, accumulation 2 → 2 optimizer steps per epoch
    res = run(BagNet(), seqs, ce(labels), TrainConfig(lr=0.01, epochs=2, batch_size=4, grad_accum=2))
    assert res.steps == res.total_steps == 4


@pytest.mark.parametrize("n, batch, accum", [(4, 2, 4), (12, 4, 2)])
def test_a_short_last_accumulation_steps_with_its_full_mean_gradient(monkeypatch, n, batch, accum):
    """Plain SGD shows the gradient's scale (AdamW would hide it): an epoch's last window of
    m < grad_accum micro-batches must step as one of grad_accum equal micro-batches, not m/grad_accum of it."""
    from fewtune.training import loop
    from fewtune.training.batches import accumulation_scale

    monkeypatch.setattr(loop, "make_optimizer", lambda groups, lr: torch.optim.SGD(groups, lr=lr))
    seqs, labels = toy_data(n)
    common = dict(lr=0.5, epochs=1, warmup_ratio=0.0, schedule="constant", group_by_length=False, max_grad_norm=None,
                  weight_decay=0.0)
    a, b = BagNet(), BagNet()
    ra = run(a, seqs, ce(labels), TrainConfig(batch_size=batch, grad_accum=accum, **common))
    # the reference: every window one optimizer step over its micro-batches' mean loss, by hand
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    micro = [perm[i : i + batch] for i in range(0, n, batch)]
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    for w in range(0, len(micro), accum):
        window = micro[w : w + accum]
        loss = sum(F.cross_entropy(b(*_pad([seqs[i] for i in mb])), labels[mb]) for mb in window) / len(window)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ra.steps == math.ceil(len(micro) / accum)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert [accumulation_scale(i, 5, 2) for i in range(5)] == [1.0, 1.0, 1.0, 1.0, 2.0]


def _pad(seqs):
    from fewtune.scoring.batching import pad_batch

    return pad_batch(seqs, PAD, CPU)


def test_training_is_deterministic_per_model_seed():
    seqs, labels = toy_data(16)
    cfg = TrainConfig(lr=0.05, epochs=2, batch_size=4)
    a, b, c = BagNet(), BagNet(), BagNet()
    run(a, seqs, ce(labels), cfg, seed=1)
    run(b, seqs, ce(labels), cfg, seed=1)
    run(c, seqs, ce(labels), cfg, seed=2)  # same init, different batch order
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_nan_loss_stops_with_the_step_number():
    seqs, labels = toy_data(16)
    calls = {"n": 0}

    def loss_fn(logits, batch):
        calls["n"] += 1
        loss = F.cross_entropy(logits, labels[batch.idx])
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(TrainingDiverged, match=r"loss became nan at optimizer step 3 \(epoch 1\)") as exc:
        run(BagNet(), seqs, loss_fn, TrainConfig(lr=0.01, epochs=2, batch_size=4))
    assert exc.value.hint


def test_inf_loss_is_caught_too():
    seqs, labels = toy_data(8)
    with pytest.raises(TrainingDiverged, match="inf"):
        run(BagNet(), seqs, lambda lg, b: lg.sum() * float("inf"), TrainConfig(lr=0.01, epochs=1, batch_size=4))


def test_learning_curve_callback_per_epoch():
    seqs, labels = toy_data(8)
    seen = []
    res = run(BagNet(), seqs, ce(labels), TrainConfig(lr=0.01, epochs=3, batch_size=4),
              on_epoch_end=lambda ep: seen.append(ep) or {"dev": {"accuracy": 0.5}})
    assert seen == [1.0, 2.0, 3.0]
    assert [p["epoch"] for p in res.curve] == [1.0, 2.0, 3.0]
    assert all("train_loss" in p and p["eval"]["dev"]["accuracy"] == 0.5 for p in res.curve)


def test_linear_and_constant_schedules_with_warmup():
    p = nn.Parameter(torch.zeros(1))

    def lrs(schedule: str, total: int) -> tuple[list[float], int]:
        opt = torch.optim.AdamW([p], lr=1.0)
        sched, warm = make_scheduler(opt, TrainConfig(lr=1.0, warmup_ratio=0.1, schedule=schedule), total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, warm

    lin, warm = lrs("linear", 40)
    assert warm == 4 and lin[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert lin[-1] == pytest.approx(1 / 36) and all(x >= y for x, y in zip(lin[4:], lin[5:]))
    const, warm = lrs("constant", 40)
    assert const[:4] == pytest.approx([0, 0.25, 0.5, 0.75]) and all(x == 1.0 for x in const[4:])
    _, warm = lrs("linear", 3)
    assert warm == 1  # ceil(0.1 * 3): the study's int() formula would give 0


def test_length_grouped_batches_cover_all_and_reshuffle():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    s = LengthGroupedBatches(lengths, batch_size=2, seed=0)
    e1, e2 = list(s), list(s)
    for epoch in (e1, e2):
        flat = sorted(i for b in epoch for i in b)
        assert flat == list(range(len(lengths)))
        assert all(len(b) == 2 for b in epoch[:-1]) and len(epoch[-1]) == 1
    assert e1 != e2  # a new order every epoch
    assert list(LengthGroupedBatches(lengths, 2, seed=0)) == e1  # deterministic per seed
    # with grouping, a batch's lengths come from one sorted window: within-batch spread is small
    wide = LengthGroupedBatches(list(range(64)), batch_size=4, seed=3)
    spread = max(max(b) - min(b) for b in wide)
    plain = LengthGroupedBatches(list(range(64)), batch_size=4, seed=3, group_by_length=False)
    assert spread < max(max(b) - min(b) for b in plain)


def test_weight_decay_skips_one_dimensional_parameters():
    lin = nn.Linear(3, 2)
    groups = _optimizer_groups([{"params": list(lin.parameters()), "lr": 0.5}], weight_decay=0.1)
    by_decay = {g["weight_decay"]: g for g in groups}
    assert by_decay[0.1]["params"][0] is lin.weight and by_decay[0.0]["params"][0] is lin.bias
    assert all(g["lr"] == 0.5 for g in groups)


def test_runs_with_different_precision_in_one_process():
    """accelerate keeps process-wide state; the loop resets it so runs can differ in precision."""
    seqs, labels = toy_data(8)
    for precision in ("bf16", "fp32", "bf16"):
        net = BagNet()
        res = train(net, seqs, ce(labels), [{"params": list(net.parameters())}],
                    TrainConfig(lr=0.01, epochs=1, batch_size=4, grad_accum=1 if precision == "fp32" else 2),
                    pad_id=PAD, precision=precision, model_seed=0, device=CPU)
        # 8 examples in batches of 4: 2 micro-batches, i.e. 2 optimizer steps, or 1 with accumulation 2
        assert res.steps == res.total_steps == (2 if precision == "fp32" else 1)


def test_losses_reach_the_host_once_per_epoch_not_per_micro_step(monkeypatch):
    """Per-step ``float(loss)``/``.item()`` stalls a GPU's queue; the loop copies the pending
    losses and gradient norms in one transfer per epoch (and every SYNC_EVERY steps)."""
    seqs, labels = toy_data(16)
    syncs = {"n": 0}
    for name in ("item", "tolist", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            syncs["n"] += self.is_floating_point()  # losses, norms (not the samplers' CPU index draws)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    res = run(BagNet(), seqs, ce(labels), TrainConfig(lr=0.05, epochs=3, batch_size=2, max_grad_norm=1.0))
    assert res.steps == 24 and len(res.loss_history) == 24 and len(res.epoch_losses) == 3
    assert syncs["n"] <= 3  # one per epoch; 48 before (a loss and a gradient norm per step)
