"""Saving after training, for the adapter methods other than LoRA (which has its own).

One mixin so that each method file states only its adapter: ``fit`` trains (``TrainableMethod``),
then, with ``params.save_dir``, writes the adapter and the head (``save``; BitFit overrides it; default
``lora.save_adapter``: peft's ``save_pretrained`` plus ``head.safetensors``/``head.json``).
"""

from __future__ import annotations

from pathlib import Path

from fewtune.methods.lora import save_adapter


class SavesAdapter:
    """Mixin for a ``TrainableMethod`` whose ``adapt_model`` sets ``self.peft_model``."""

    def fit(self, sample):
        summary = super().fit(sample)  # type: ignore[misc]
        save_dir = getattr(self.params, "save_dir", None)  # type: ignore[attr-defined]
        if save_dir:
            self.save(Path(save_dir))
            summary["saved_to"] = save_dir
        return summary

    def save(self, path: Path) -> None:
        head_kind = self.params.head if self.objective == "classifier" else None  # type: ignore[attr-defined]
        save_adapter(self.peft_model, self.head, path, head_kind)  # type: ignore[attr-defined]
