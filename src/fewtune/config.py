"""Validated run configuration.

Every knob of a run lives in ``RunConfig`` (pydantic, unknown keys rejected with the closest valid
name). A *resolved* config has every default filled in — the task's default pattern and eval sets,
the method's parameters — so that it alone reproduces the run, and its content hash identifies it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .registry import unknown_hint

M = TypeVar("M", bound=BaseModel)

EMBEDDED_MODEL = "embedded"


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def validate(model_cls: type[M], data: dict[str, Any] | None, where: str = "config") -> M:
    """Build ``model_cls`` from ``data``; turn pydantic's errors into one clear ConfigError."""
    try:
        return model_cls.model_validate(data or {})
    except ValidationError as e:
        raise config_error_from(e, model_cls, where) from None


def config_error_from(e: ValidationError, model_cls: type[BaseModel], where: str) -> ConfigError:
    lines, hints = [], []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            fields = _fields_at(model_cls, err["loc"][:-1])
            lines.append(f"unknown key '{loc}' in {where}")
            hints.append(unknown_hint(key, fields))
        else:
            lines.append(f"{where}: '{loc}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError("; ".join(lines), "; ".join(hints) or None)


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return list(getattr(cls, "model_fields", {}))


class TrainConfig(StrictModel):
    """The shared training loop's hyper-parameters; defaults follow the study (Srinivasan et al.)."""

    lr: float = Field(1e-5, gt=0)
    epochs: float = Field(40, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int = Field(128, ge=8)
    group_by_length: bool = True
    eval_every_epoch: bool = False


class RunIdentity(StrictModel):
    """What the result depends on besides the config (see ``fewtune.identity``): filled in by
    ``resolve``, hashed with the config, stored in ``config.yaml``. Never set it by hand —
    ``resolve`` recomputes it."""

    fewtune_version: str
    git_commit: str | None = None
    task_digest: str | None = None
    model_digest: str | None = None
    device: str
    precision: str


class RunConfig(StrictModel):
    """One experiment: a model adapted by one method on one few-shot sample of one task."""

    task: str = "cola"
    method: str = "icl"
    params: dict[str, Any] = Field(default_factory=dict, description="method-specific parameters")
    model: str = EMBEDDED_MODEL
    pattern: str | None = None
    n: int = Field(16, ge=1, description="few-shot examples per class (or in total with n_is_total)")
    n_is_total: bool = False
    seed: int = Field(0, ge=0, description="data seed: which few-shot sample, demonstration order")
    model_seed: int = Field(0, ge=0, description="seed for head initialisation, dropout, batch order")
    eval_sets: list[str] | None = None
    eval_limit: int | None = Field(None, ge=1, description="stratified, seeded subsample size per eval set")
    eval_seed: int = 0
    eval_batch_size: int = Field(16, ge=1)
    max_context: int = Field(2048, ge=16, description="longest prompt (tokens); longer eval examples are skipped")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    train: TrainConfig = Field(default_factory=TrainConfig)
    identity: RunIdentity | None = Field(None, description="filled in by resolve: version, data/model digests, device")

    def content_hash(self) -> str:
        """Identity of the run: sha256 of the canonical JSON of the resolved config (identity block
        included), i.e. of exactly what ``config.yaml`` holds."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
