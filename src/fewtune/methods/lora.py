"""LoRA: low-rank adapters (peft) on the attention projections, base weights frozen.

The study (released ``peft_LoRA_on_cola``): ``LoraConfig(r ∈ {1,2,4,8,64}, lora_alpha=8,
lora_dropout=0.1, bias="none", task_type="SEQ_CLS")`` on OPT-125m — peft's default target
modules for OPT (``q_proj``, ``v_proj``) — with the ``score`` head trained alongside
(``modules_to_save``), at lr 1e-5 for 40 epochs. Same defaults here; the head is our own head
module trained alongside the adapter and saved with it. ``objective=lm`` trains the adapter
under the PBFT objective instead (LM head frozen). Target modules default to peft's own mapping
for the model type (``q_proj``/``v_proj`` for Llama and OPT, ``query_key_value`` for GPT-NeoX).

``rslora=true``: rank-stabilised LoRA (Kalajdzievski 2023, peft ``use_rslora``) scales the update
by alpha/sqrt(r) instead of alpha/r, so higher ranks are not damped; ``dora`` (``dora.py``) is
this method with peft's ``use_dora``.

Learning rate: the run's ``train.lr``. The study's 1e-5 barely moves a LoRA adapter (whose B
matrix starts at zero); llmft's LoRA runs used 2e-4 — pass ``--set train.lr=2e-4`` for that.

Note that llmft's own "LoRA" is a different module (down → ReLU → dropout → up, with biases,
optionally a trainable scale); this is standard peft LoRA, as the study used.

``save_adapter(dir)`` writes the peft adapter plus ``head.safetensors``/``head.json``;
``load_adapter(base_model, dir)`` restores both, and predictions match the trained model's
(tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from fewtune.errors import ConfigError
from fewtune.methods._trainable import ObjectiveParams, TrainableMethod
from fewtune.methods.base import register
from fewtune.models.adapter import adapter_for
from fewtune.scoring.heads import make_head
from fewtune.training.packed_layers import seed_lora_dropout


class LoRAOptions(ObjectiveParams):
    r: int = Field(8, ge=1, le=1024, description="adapter rank (study: 1, 2, 4, 8, 64)")
    alpha: float = Field(8, gt=0, description="lora_alpha; the update is scaled by alpha / r (study: 8)")
    dropout: float = Field(0.1, ge=0, lt=1, description="lora_dropout (study: 0.1)")
    target_modules: list[str] | None = Field(None, description="module names to adapt (default: peft's mapping, e.g. q_proj, v_proj)")
    rslora: bool = Field(False, description="rank-stabilised LoRA (Kalajdzievski 2023): scale alpha/sqrt(r) instead of alpha/r")
    save_dir: str | None = Field(None, description="write the trained adapter (and head) here after training")

    omit_when: ClassVar[dict[str, Any]] = {"rslora": False}  # off: LoRA run ids from before the option


def default_targets(model: nn.Module) -> list[str]:
    """peft's default LoRA target modules for this architecture (``ModelAdapter.lora_targets``)."""
    return adapter_for(model).lora_targets()


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str] | None,
               seed: int, **extra) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapter's parameters train.

    The adapter's A matrices are drawn from the global torch RNG, seeded here by ``seed`` (the
    run's model seed), B starts at zero: the wrapped model initially computes exactly what the
    base model does. ``extra``: further ``LoraConfig`` options (``use_rslora``, ``use_dora``)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or default_targets(model)
    torch.manual_seed(seed)
    try:
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", **extra)
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"cannot apply LoRA: {str(e).splitlines()[0]}", "check params.target_modules against the model's module names") from None


@register
class LoRA(TrainableMethod):
    name = "lora"
    summary = "peft LoRA adapters (default q_proj/v_proj) + trained classification head (or the PBFT objective)"
    Params = LoRAOptions
    trains_base_weights = False

    def adapt_model(self) -> None:
        p = self.params
        # peft injects the adapter layers into the base model in place, so everything that runs
        # ``ctx.lm.model`` (the backbone of our nets, ``score_prompts``) runs the adapted model.
        self.peft_model = apply_lora(self.ctx.lm.model, r=p.r, alpha=p.alpha, dropout=p.dropout,
                                     target_modules=p.target_modules, seed=self.ctx.cfg.model_seed, **self.lora_options())
        self._info.update(target_modules=sorted(self.peft_model.peft_config["default"].target_modules), r=p.r, alpha=p.alpha,
                          **self.lora_options())
        # The run's own dropout generator (LoRA and DoRA), as inside a pack (``training.packed``):
        # a run's masks do not depend on whether it trains alone or packed. Gradient
        # checkpointing replays it on recomputation (``dropout_generators``).
        gen = seed_lora_dropout(self.peft_model, self.ctx.cfg.model_seed, self.ctx.device)
        self.dropout_generators = [gen] if gen is not None else []

    def lora_options(self) -> dict:
        """Extra ``LoraConfig`` options of this variant (DoRA adds ``use_dora``)."""
        return {"use_rslora": self.params.rslora}

    def fit(self, sample):
        summary = super().fit(sample)
        if self.params.save_dir:
            self.save_adapter(Path(self.params.save_dir))
            summary["saved_to"] = self.params.save_dir
        return summary

    def extra_summary(self) -> dict:
        return {"lora_r": self.params.r, "lora_alpha": self.params.alpha,
                "lr_note": "study: lr 1e-5 for LoRA; llmft used 2e-4"}

    def save_adapter(self, path: Path) -> None:
        save_adapter(self.peft_model, self.head, path, self.params.head if self.objective == "classifier" else None)


def save_adapter(peft_model: nn.Module, head: nn.Module | None, path: Path, head_kind: str | None) -> None:
    """The peft adapter (``adapter_config.json``, ``adapter_model.safetensors``) and, for the
    classifier objective, the head's weights and shape."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(path))
    if head is not None:
        save_head(head, path, head_kind)


def save_head(head: nn.Module, path: Path, head_kind: str | None) -> None:
    """``head.safetensors`` (weights) and ``head.json`` (kind and shape) in ``path``."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path / "head.safetensors"))
    out = head.out
    info = {"kind": head_kind, "hidden": out.in_features, "num_labels": out.out_features,
            "dropout": float(getattr(getattr(head, "dropout", None), "p", 0.0))}
    (path / "head.json").write_text(json.dumps(info))


def load_head(path: Path, device: torch.device) -> nn.Module | None:
    """The head saved by ``save_head`` in ``path`` (eval mode), or None if there is none."""
    from safetensors.torch import load_file

    if not (path / "head.json").exists():
        return None
    info = json.loads((path / "head.json").read_text())
    head = make_head(info["kind"], info["hidden"], info["num_labels"], seed=0, dropout=info["dropout"])
    head.load_state_dict(load_file(str(path / "head.safetensors")))
    return head.to(device).eval()


def load_adapter(base_model: nn.Module, path: Path) -> tuple[nn.Module, nn.Module | None]:
    """Re-attach a saved adapter to a freshly loaded base model; returns (peft model, head or None)."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise ConfigError(f"no peft adapter in {path}", "pass the directory given as params.save_dir")
    model = PeftModel.from_pretrained(base_model, str(path))
    model.eval()
    return model, load_head(path, next(base_model.parameters()).device)
