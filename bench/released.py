"""The study's released pipeline (Srinivasan et al. 2024, "R" in study-spec.md), reproduced for
side-by-side timing: Hugging Face ``Trainer`` + ``AutoModelForSequenceClassification`` (a fresh
2-way ``score`` head on the last non-pad token), ``padding="max_length"`` to 128 with
truncation, fp32, per-device batch 32, AdamW lr 1e-5, weight decay 0, linear schedule with the
study's warmup formula, grad clip 1.0, seed 42, no evaluation or saving during training.

Only the model weights differ from R (the embedded SmolLM2-135M instead of OPT-125m, both
≈125-135M parameters), so that both pipelines time the same network. This module is for the
benchmarks only; fewtune itself never uses ``Trainer``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

MAX_LENGTH = 128
BATCH_SIZE = 32


class DictDataset(torch.utils.data.Dataset):
    """Pre-tokenized, pre-padded rows, as ``datasets.map(tokenize, batched=True)`` gives R."""

    def __init__(self, enc: dict[str, list], labels: Sequence[int] | None = None) -> None:
        self.enc = enc
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {k: torch.tensor(v[i]) for k, v in self.enc.items()}
        if self.labels is not None:
            row["labels"] = torch.tensor(self.labels[i])
        return row


def tokenize(tok, first: Sequence[str], second: Sequence[str] | None = None) -> dict[str, list]:
    """R's tokenization: ``tokenizer(sentence)`` or ``tokenizer(premise, hypothesis)``, padded to 128."""
    args = (list(first),) if second is None else (list(first), list(second))
    enc = tok(*args, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_seqcls(num_labels: int = 2, seed: int = 42, dev: torch.device | None = None):
    """AutoModelForSequenceClassification on the embedded weights, fp32, random head (seeded)."""
    from transformers import AutoModelForSequenceClassification

    from fewtune.models.loading import device, embedded_model_dir, load_tokenizer

    tok = load_tokenizer("embedded")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=num_labels,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(dev or device()), tok


def training_args(out_dir: str | Path, n_train: int, epochs: float = 1, **overrides):
    """R's TrainingArguments (study-spec §4), for ``n_train`` examples."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE, learning_rate=1e-5, weight_decay=0.0,
        warmup_steps=int(0.1 * (n_train // BATCH_SIZE) * 40), max_grad_norm=1.0, seed=42,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        fp16=False, bf16=False,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def trainer(model, args, train: DictDataset | None = None):
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=train)


def predict(model, data: DictDataset) -> torch.Tensor:
    """R's evaluation: ``Trainer.predict`` over the padded set (fp32, batch 32); logits [N, 2]."""
    with tempfile.TemporaryDirectory() as tmp:
        out = trainer(model, training_args(tmp, len(data))).predict(data)
    return torch.as_tensor(out.predictions)
