"""Validated run configuration.

Every knob of a run lives in ``RunConfig`` (pydantic, unknown keys rejected with the closest valid
name). A *resolved* config has every default filled in — the task's default pattern and eval sets,
the method's parameters — so that it alone reproduces the run, and its content hash identifies it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator

from fewtune.errors import ConfigError
from fewtune.registry import unknown_hint

M = TypeVar("M", bound=BaseModel)

EMBEDDED_MODEL = "embedded"
# Where results are *reported*, not what they are: left out of the run id and config.yaml.
NOT_RESULT_FIELDS = frozenset({"log_to", "log_dir"})


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Keys added after run ids were first published, left out of the dump (config.yaml, the run
    # id) while at the value that reproduces the behaviour from before they existed: the run ids
    # of existing studies stay valid when fewtune grows an option. Loading fills them back in.
    omit_when: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit_neutral(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for cls in type(self).__mro__:  # a params class inherits its bases' neutral values
                for key, neutral in vars(cls).get("omit_when", {}).items():
                    if key in data and data[key] == neutral:
                        del data[key]
        return data


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
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more time")

    omit_when: ClassVar[dict[str, Any]] = {"gradient_checkpointing": False}  # off: as before the key existed


class Selection(StrictModel):
    """Candidate values chosen per run by k-fold cross-validation *within the few-shot sample*
    (true few-shot model selection, Perez et al. 2021): the eval sets are never looked at.

    Written ``select: {train.lr: [1e-5, 1e-4]}`` (the candidates alone) or in full,
    ``select: {candidates: {train.lr: [...]}, folds: 4, metric: accuracy}``. A study does not
    sweep the candidates into separate runs (``sweeps = False``): they are one run's choice."""

    sweeps: ClassVar[bool] = False
    candidates: dict[str, list[Any]] = Field(description="dotted train./params. keys → values to try, in order")
    folds: int = Field(4, ge=2, description="k of the stratified k-fold split of the few-shot sample "
                                            "(fewer when a class has fewer examples; at least 2)")
    metric: Literal["accuracy", "mcc"] = "accuracy"

    @model_validator(mode="before")
    @classmethod
    def _bare_candidates(cls, data: Any) -> Any:
        if isinstance(data, dict) and "candidates" not in data:
            return {"candidates": data}
        return data


class RunIdentity(StrictModel):
    """What the result depends on besides the config (see ``fewtune.run.identity`` and
    docs/identity.md): filled in by ``resolve``, hashed with the config, stored in ``config.yaml``.
    Never set it by hand — ``resolve`` recomputes it."""

    # Before code_digest: the version and the git commit were hashed. Kept readable for the
    # config.yaml of old runs; new identities leave them out (metadata: metrics.json provenance).
    fewtune_version: str | None = None
    git_commit: str | None = None
    code_digest: str | None = Field(None, description="sha256 of the fewtune package's files (src/fewtune)")
    libraries: dict[str, str] = Field(default_factory=dict, description="versions of torch, transformers, peft, accelerate")
    task_digest: str | None = None
    model_digest: str | None = None
    device: str
    precision: str
    model_dtype: str = Field("fp32", description="the weights' dtype model_dtype resolved to on this device")
    threads: int | None = Field(None, description="torch CPU threads the run computed with (CPU runs only)")
    processes: int | None = Field(None, description="data-parallel processes, when more than one")

    omit_when: ClassVar[dict[str, Any]] = {"model_dtype": "fp32", "fewtune_version": None, "git_commit": None,
                                           "code_digest": None, "libraries": {}, "threads": None, "processes": None}


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
    eval_batch_size: int | Literal["auto"] = Field(
        "auto", description="examples per scoring batch; auto: 16 on CPU, 64 on CUDA (resolved into the config)")
    max_context: int = Field(2048, ge=16, description="longest prompt (tokens); longer eval examples are skipped")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where native (CUDA ≥ Ampere, AMX CPUs), else fp16 on CUDA, fp32 on CPU")
    model_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the weights' dtype; auto: fp32 on CPU and for methods that update the base weights, "
                            "bf16 on CUDA (native bf16) for zero-shot/icl/lora; resolved into identity.model_dtype")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto: transformers' choice (SDPA where the model supports it)")
    device_map: str | None = Field(
        None, description="accelerate device_map (e.g. 'auto') for methods that keep the base weights frozen")
    train: TrainConfig = Field(default_factory=TrainConfig)
    select: Selection | None = Field(None, description="choose train./params. values by k-fold CV on the few-shot sample")
    identity: RunIdentity | None = Field(None, description="filled in by resolve: version, data/model digests, device")
    log_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers to log to (not part of the run id)")
    log_dir: str | None = Field(None, description="trackers' local directory (default: <run dir>/trackers; not part of the run id)")

    def result_dump(self) -> dict[str, Any]:
        """The config as ``config.yaml`` holds it: everything the result depends on, without where
        it is reported (``NOT_RESULT_FIELDS``), so logging to a tracker never changes a run id."""
        return self.model_dump(mode="json", exclude=set(NOT_RESULT_FIELDS))

    # auto model_dtype is recorded resolved in identity.model_dtype; attention auto is transformers'
    # default, as before; no device_map is the one device, as before (see StrictModel.omit_when).
    omit_when: ClassVar[dict[str, Any]] = {"model_dtype": "auto", "attn_implementation": "auto", "device_map": None,
                                           "select": None}

    def content_hash(self) -> str:
        """Identity of the run: sha256 of the canonical JSON of the resolved config (identity block
        included), i.e. of exactly what ``config.yaml`` holds (``result_dump``)."""
        blob = json.dumps(self.result_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
