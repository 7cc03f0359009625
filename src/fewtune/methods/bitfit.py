"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the backbone (+ the head).

Llama/Gemma-family models have no biases at all, so "biases only" would train nothing there.
Then (``add_biases=true``, default) every bias-free ``nn.Linear`` inside the decoder layers — the
attention projections (q/k/v/o) and the MLP projections (gate/up/down) — gets a bias vector
initialised to zero (the model's function is unchanged at step 0) and those train. Models that
have biases (OPT, GPT-2, GPT-NeoX) train their own, LayerNorm biases included, as in the paper.
``norms=true`` also trains the normalisation gains (RMSNorm/LayerNorm weights).

What trained is recorded in ``method_info`` (modules, with layer indices folded into ``*``;
``added`` marks the zero-initialised biases) and in the training summary (trainable parameters,
of which added). ``save_dir`` writes the trained backbone tensors, the names of the modules that
got biases and the head; ``load_bitfit`` re-applies them to a freshly loaded model (tested: same
predictions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from fewtune.errors import ConfigError
from fewtune.methods._peft_saving import SavesAdapter
from fewtune.methods._trainable import ObjectiveParams, TrainableMethod
from fewtune.methods.base import register
from fewtune.methods.lora import load_head, save_head
from fewtune.models.adapter import ModelAdapter
from fewtune.models.loading import backbone_and_head


class BitFitParams(ObjectiveParams):
    add_biases: bool = Field(True, description="give bias-free linear projections in the decoder layers a zero-initialised bias (Llama/Gemma have none)")
    norms: bool = Field(False, description="also train the normalisation gains (RMSNorm/LayerNorm weights)")
    save_dir: str | None = Field(None, description="write the trained biases (and head) here after training")


def add_zero_biases(layers: nn.Module, prefix: str = "") -> list[str]:
    """Give every bias-free ``nn.Linear`` under ``layers`` a zero bias; returns their names."""
    added = []
    for name, mod in layers.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=w.dtype, device=w.device))
            added.append(prefix + name)
    return added


def bitfit_parameters(body: nn.Module, norms: bool) -> dict[str, nn.Parameter]:
    """The backbone parameters BitFit trains: every bias, and with ``norms`` the norm gains."""
    chosen = {n: p for n, p in body.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if norms:
        for mname, mod in body.named_modules():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                chosen[f"{mname}.weight" if mname else "weight"] = mod.weight
    return chosen


def fold_layers(names: list[str], added: set[str]) -> list[str]:
    """``layers.3.mlp.up_proj.bias`` → ``layers.*.mlp.up_proj.bias``, deduplicated, added marked."""
    out = {re.sub(r"\.\d+\.", ".*.", n) + (" (added)" if n.rsplit(".", 1)[0] in added else "") for n in names}
    return sorted(out)


@register
class BitFit(SavesAdapter, TrainableMethod):
    name = "bitfit"
    summary = "BitFit: bias terms only (+ head); zero-initialised biases added where the model has none (Llama); optional norm gains"
    Params = BitFitParams

    def adapt_model(self) -> None:
        model = self.ctx.lm.model
        body, _ = backbone_and_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        added: list[str] = []
        if self.params.add_biases:
            layers = ModelAdapter.decoder_layers(model)
            prefix = next(n for n, m in body.named_modules() if m is layers) + "."
            added = add_zero_biases(layers, prefix)
        self.trained = bitfit_parameters(body, self.params.norms)
        if not self.trained:
            raise ConfigError("bitfit: the model has no bias terms to train",
                              "set params.add_biases=true (or params.norms=true)")
        for p in self.trained.values():
            p.requires_grad_(True)
        self.added = added
        self._info.update(trained_modules=fold_layers(list(self.trained), set(added)), added_biases=len(added),
                          norms=self.params.norms)

    def base_tensors(self) -> list[nn.Parameter]:
        """The backbone tensors this run trains in place (a pack copies them: ``training.packed``)."""
        return list(self.trained.values())

    def restore_base(self) -> None:
        """The base as loaded again, the added biases removed: in a pack each member trains its
        own copies, and the next member's ``adapt_model`` must find the base its lone run finds."""
        mods = dict(backbone_and_head(self.ctx.lm.model)[0].named_modules())
        for name in self.added:
            mods[name].bias = None

    def extra_summary(self) -> dict:
        added = set(self.added)
        n_added = sum(p.numel() for n, p in self.trained.items() if n.rsplit(".", 1)[0] in added)
        return {"backbone_trainable_params": sum(p.numel() for p in self.trained.values()),
                "added_bias_params": n_added}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.trained.items()}, str(path / "bitfit.safetensors"))
        (path / "bitfit.json").write_text(json.dumps({"added_biases": self.added}))
        if self.head is not None:
            save_head(self.head, path, self.params.head)


def load_bitfit(base_model: nn.Module, path: Path) -> tuple[nn.Module, nn.Module | None]:
    """Re-apply saved BitFit tensors (adding the biases the run added) to a freshly loaded model."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "bitfit.json").exists():
        raise ConfigError(f"no BitFit weights in {path}", "pass the directory given as params.save_dir")
    body, _ = backbone_and_head(base_model)
    mods = dict(body.named_modules())
    for name in json.loads((path / "bitfit.json").read_text())["added_biases"]:
        add_zero_biases(mods[name], name)
    missing = body.load_state_dict(load_file(str(path / "bitfit.safetensors")), strict=False).unexpected_keys
    if missing:
        raise ConfigError(f"saved BitFit tensors do not fit this model: {missing[:3]}", "load the model the run trained")
    base_model.eval()
    return base_model, load_head(path, next(base_model.parameters()).device)
