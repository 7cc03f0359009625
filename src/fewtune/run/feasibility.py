"""Can each planned run work at all? Checked by ``fewtune study --dry-run`` before hours of compute.

A run is *infeasible* when it is certain to fail or to measure nothing: a verbalizer word that is
not one token, a few-shot sample the pool cannot provide, ICL demonstrations (or a distillation
teacher's prompt) longer than the context, or an eval set whose every prompt is too long. Eval
prompts that are only partly too long are *warnings* (they are skipped and counted at run time).

Cheap by construction: only the tokenizer is loaded, never weights; the model's window comes from
its config. The prompts are built by the methods' own code (``ICL.prompts``, the trainable
methods' ``input_text``, distillation's ``demonstrations_for``/``teacher_prompt``) and measured by
``scoring.encode_prompts`` — the function that decides skipping at run time — so the check cannot
drift from what the run does. Tokenized query lists are memoised: most runs of a grid share eval
sets, and only the ICL demonstrations differ per seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewtune.errors import ContextLengthError, FewtuneError
from fewtune.methods import METHODS, RunContext
from fewtune.methods._trainable import TrainableMethod
from fewtune.methods.distill import Distill
from fewtune.methods.icl import ICL
from fewtune.models import embedded
from fewtune.models.loading import LoadedModel, embedded_model_dir, load_tokenizer
from fewtune.models.tiny import family_of, is_tiny, tiny_config
from fewtune.run.evaluation import EvalData, load_eval_sets
from fewtune.run.selection import MIN_FOLD_EXAMPLES, fold_size_warning
from fewtune.scoring.batching import encode_prompts
from fewtune.tasks import get_task, load_train
from fewtune.tasks.base import Example
from fewtune.tasks.prompts import verbalizer_token_ids
from fewtune.tasks.sampling import few_shot_sample

MAX_TEACHER_BUILD = 2000  # distillation teacher prompts built (pool=train can be the whole train set)
TEACHER_EXTREMES = 16  # of those, the longest and the shortest (by characters) are tokenized


@dataclass
class Finding:
    """One problem of one run: what is wrong and how to fix it."""

    run_id: str
    label: str
    problem: str
    fix: str = ""


@dataclass
class Feasibility:
    errors: list[Finding] = field(default_factory=list)  # the run cannot work
    warnings: list[Finding] = field(default_factory=list)  # it works, on fewer examples
    runs: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


class _MemoTokenizer:
    """A tokenizer whose batch calls are memoised per (texts, add_special_tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.memo: dict[tuple[bool, tuple[str, ...]], list[list[int]]] = {}

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return self.tokenizer(text, add_special_tokens=add_special_tokens)
        key = (add_special_tokens, tuple(text))
        if key not in self.memo:
            self.memo[key] = self.tokenizer(list(text), add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": self.memo[key]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def model_window(spec: str, tokenizer: Any) -> int | None:
    """The model's positions (``max_position_embeddings``) from its config, without weights."""
    if is_tiny(spec):
        return tiny_config(tokenizer, family_of(spec)).max_position_embeddings
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(embedded_model_dir(spec) if embedded.lookup(spec) else spec)
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)


class _Env:
    """What runs share: tokenizers, windows, train pools, samples and eval sets (loaded once)."""

    def __init__(self, data_dir: Path | None) -> None:
        self.data_dir = data_dir
        self._memo: dict[tuple, Any] = {}

    def get(self, key: tuple, make) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def tokenizer(self, model: str) -> _MemoTokenizer:
        return self.get(("tok", model), lambda: _MemoTokenizer(load_tokenizer(model)))

    def window(self, model: str) -> int | None:
        return self.get(("window", model), lambda: model_window(model, self.tokenizer(model).tokenizer))


def check_study(planned: Sequence[Any], data_dir: Path | None = None) -> Feasibility:
    """Check every planned run (``study.PlannedRun``); see the module docstring."""
    t0 = time.time()
    env, out = _Env(data_dir), Feasibility(runs=len(planned))
    for p in planned:
        errors, warnings = check_run(p.config, env)
        out.errors += [Finding(p.run_id, p.label(), *e) for e in errors]
        out.warnings += [Finding(p.run_id, p.label(), *w) for w in warnings]
    out.seconds = time.time() - t0
    return out


Problems = list[tuple[str, str]]  # (problem, fix)


def check_run(cfg: Any, env: _Env) -> tuple[Problems, Problems]:
    """Errors and warnings of one resolved run config."""
    errors: Problems = []
    warnings: Problems = []
    task = get_task(cfg.task)
    pattern = task.pattern(cfg.pattern)
    tok = env.tokenizer(cfg.model)
    window = env.window(cfg.model)
    limit = min(cfg.max_context, window) if window else cfg.max_context
    if window and cfg.max_context > window:
        warnings.append((f"max_context={cfg.max_context} exceeds the model's window of {window} positions; the run uses {window}",
                         f"set max_context ≤ {window}"))
    try:
        verbalizer = verbalizer_token_ids(tok.tokenizer, pattern.verbalizer)
        pool = env.get(("pool", cfg.task), lambda: load_train(task, env.data_dir))
        sample = env.get(("sample", cfg.task, cfg.n, cfg.seed, cfg.n_is_total), lambda: few_shot_sample(
            pool, cfg.n, cfg.seed, task.num_labels, per_class=not cfg.n_is_total).examples)
    except FewtuneError as e:
        return [(e.message, e.hint or "")], warnings
    lm = LoadedModel(model=None, tokenizer=tok, name=cfg.model, spec=cfg.model, max_positions=window)  # type: ignore[arg-type]
    ctx = RunContext(cfg.model_copy(update={"max_context": limit}), task, pattern, lm, verbalizer, "fp32",
                     torch.device("cpu"), None, train_pool=pool, data_dir=env.data_dir)  # type: ignore[arg-type]
    method_cls = METHODS.get(cfg.method)
    method = method_cls(ctx, method_cls.Params.model_validate(cfg.params))
    evals = env.get(("evals", cfg.task, tuple(cfg.eval_sets or ()), cfg.eval_limit, cfg.eval_seed),
                    lambda: load_eval_sets(task, cfg, env.data_dir))
    if isinstance(method, Distill):
        _check_teacher(method, sample, limit, window, errors, warnings)
    small_folds = fold_size_warning(cfg, sample)
    if small_folds:
        warnings.append((small_folds, f"raise n (≥ {MIN_FOLD_EXAMPLES} held-out examples per fold), use fewer folds, or drop select:"))
    prefix = _eval_prompts(method, sample, [])[0]  # the per-run part (ICL's demonstrations)
    for ev in evals:
        # Queries depend on the eval set and the method's text, not on the seed: built once.
        key = ("eval", ev.name, cfg.task, cfg.model, cfg.pattern, cfg.eval_limit, cfg.eval_seed, cfg.method,
               json.dumps(cfg.params, sort_keys=True))
        queries = env.get(key, lambda ev=ev: _eval_prompts(method, sample, ev.examples)[1])
        e, w = env.get((*key, prefix, limit), lambda ev=ev, q=queries: _check_eval(method, prefix, q, ev, tok, limit, window))
        errors += e
        warnings += w
    return errors, warnings


def _eval_prompts(method: Any, sample: list[Example], examples: list[Example]) -> tuple[str, list[str]]:
    """(prefix, queries) of the eval prompts, from the method's own code."""
    if isinstance(method, ICL):
        method.fit(sample)  # picks the demonstrations; no model involved
        return method.prompts(examples)
    if isinstance(method, TrainableMethod):
        return "", [method.input_text(e) for e in examples]
    return "", method.ctx.queries(examples)


def _check_eval(method: Any, prefix: str, queries: list[str], ev: EvalData, tok: Any, limit: int,
                window: int | None) -> tuple[Problems, Problems]:
    try:
        enc = encode_prompts(tok, queries, prefix, limit)
    except ContextLengthError as e:
        return [(f"eval set {ev.name}: {e.message}", _fix_long_prefix(tok, prefix, queries, limit, window, method))], []
    skipped = int(enc.skipped.sum())
    if not skipped:
        return [], []
    longest = len(enc.prefix_ids) + max(len(q) for q in tok(queries, add_special_tokens=not enc.prefix_ids)["input_ids"])
    what = f"eval set {ev.name}: {skipped} of {len(queries)} prompts are longer than the context ({limit} tokens; longest {longest})"
    fix = f"set max_context ≥ {longest}" if not window or longest <= window else "use fewer demonstrations (params.k)"
    return ([(what + ": nothing to evaluate", fix)], []) if skipped == len(queries) else ([], [(what + "; they are skipped", fix)])


def _fix_long_prefix(tok: Any, prefix: str, queries: list[str], limit: int, window: int | None, method: Any) -> str:
    """How to make a too-long demonstration prefix fit: a larger context if the model has one,
    else fewer demonstrations (estimated from the mean demonstration length)."""
    p = len(tok(prefix, add_special_tokens=True)["input_ids"])
    q = max((len(ids) for ids in tok(queries, add_special_tokens=False)["input_ids"]), default=0)
    if window and p + q <= window:
        return f"set max_context ≥ {p + q} (the model's window is {window})"
    k = len(getattr(method, "demos", [])) or getattr(method.params, "k", None) or 1
    fit = max(0, int((min(limit, window or limit) - q) / (p / k)))
    return f"use at most params.k={fit} demonstrations (each ≈{p // k} tokens), or a model with a longer window"


def _check_teacher(method: Distill, sample: list[Example], limit: int, window: int | None,
                   errors: Problems, warnings: Problems) -> None:
    """The distillation teacher's prompts (instruction + demonstrations + query), built by the
    method itself; a prefix longer than the context fails the run, like ICL's."""
    examples = method.training_examples(sample)
    prompts = [method.teacher_prompt(method.demonstrations_for(i, ex), ex) for i, ex in enumerate(examples[:MAX_TEACHER_BUILD])]
    # Each few-shot example has its own (leave-one-out) prefix, and tokenizing them all costs
    # more than the rest of a dry run: measure the longest and the shortest by characters.
    by_chars = sorted(prompts, key=lambda pq: len(pq[0]) + len(pq[1]))
    checked = by_chars if len(by_chars) <= 2 * TEACHER_EXTREMES else by_chars[:TEACHER_EXTREMES] + by_chars[-TEACHER_EXTREMES:]
    tok = method.ctx.lm.tokenizer
    skipped = []
    for prefix, query in checked:
        try:
            skipped.append(bool(encode_prompts(tok, [query], prefix, limit).skipped[0]))
        except ContextLengthError as e:
            errors.append((f"distillation teacher: {e.message}", _fix_long_prefix(tok, prefix, [query], limit, window, method)))
            return
    if all(skipped):
        errors.append((f"distillation teacher: its {'shortest ' if len(checked) < len(prompts) else ''}prompts are longer than "
                       f"the context ({limit} tokens)", "use fewer teacher demonstrations (params.k) or a larger max_context"))
    elif any(skipped):
        warnings.append((f"distillation teacher: at least {sum(skipped)} of {len(examples)} prompts are longer than the context "
                         f"({limit} tokens); those examples train on the CE term only", "use fewer teacher demonstrations (params.k)"))


def report_lines(f: Feasibility, max_items: int = 30) -> list[str]:
    """Human-readable findings, errors first, at most ``max_items`` of each kind."""
    lines = []
    for kind, items in (("infeasible", f.errors), ("warning", f.warnings)):
        for x in items[:max_items]:
            lines.append(f"{kind}: {x.run_id}  {x.label}: {x.problem}" + (f" → fix: {x.fix}" if x.fix else ""))
        if len(items) > max_items:
            lines.append(f"... and {len(items) - max_items} more {kind} findings")
    bad = len({x.run_id for x in f.errors})
    lines.append(f"feasibility: {f.runs - bad} of {f.runs} runs feasible, {len(f.warnings)} warnings ({f.seconds:.1f} s)")
    return lines
