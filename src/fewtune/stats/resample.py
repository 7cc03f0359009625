"""Paired two-level bootstrap of a difference between methods: data seeds × eval examples.

Why two levels: a few-shot result varies with the few-shot sample (data seed) *and* with the eval
examples it is scored on. Every seed of a study is scored on the *same* eval examples, so an
interval over seeds alone leaves the eval-sampling error out (about ±0.04 at 128 examples), and
it does not shrink with more seeds. Each bootstrap replicate therefore resamples (1) the eval
examples of every eval set, once, applied to every run (the same resampled examples for both
methods: the comparison stays paired), and (2) the few-shot samples within each (model, task, n)
stratum.

Why "units": a unit is one few-shot sample, (model, task, n, data seed). A run scored on two eval
sets of one domain (cola-id and cola-glue-dev) is still one sample, so a unit's value for a domain
is the mean over that domain's eval sets — never two independent pairs (pseudo-replication).
Methods with several arms (LoRA ranks) are averaged over their arms within the unit.

Why intersections: when the compared methods skipped different examples (prompt too long), each
unit is scored on the examples that none of its runs skipped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fewtune.errors import DataError
from fewtune.stats.rows import EvalRow

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0
_CHUNK_CELLS = 4_000_000  # replicates × examples per weight chunk (memory bound for 30k-example sets)

Unit = tuple[str, str, int, int]  # (model, task, n, data seed)


@dataclass(frozen=True)
class Scores:
    """Per-example outcome of one run on one eval set (from its ``predictions.jsonl``)."""

    ids: np.ndarray  # example ids as str
    correct: np.ndarray  # bool
    skipped: np.ndarray  # bool


def read_predictions(path: Path) -> list[dict]:
    """The rows of a run's predictions.jsonl, refusing a damaged file: a line that does not parse
    (a file cut mid-line) names the file and line, rather than silently changing the statistics."""
    if not path.is_file():
        raise DataError(f"{path} is missing")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}, line {i}: not a complete JSON record (a truncated file?)") from None
    return out


def check_complete(predictions: Sequence[Mapping], metrics: Mapping | None, path: Path) -> None:
    """A file cut at a line boundary parses, but has fewer rows than metrics.json counts."""
    seen: dict[str, int] = defaultdict(int)
    for p in predictions:
        seen[str(p.get("eval_set"))] += 1
    for name, m in ((metrics or {}).get("eval") or {}).items():
        expected = int(m.get("n") or 0) + int(m.get("n_skipped") or 0)
        if seen[name] < expected:
            raise DataError(f"{path} has {seen[name]} {name} predictions but metrics.json counts {expected} (a truncated file?)")


def scores_from(predictions: Sequence[Mapping]) -> dict[str, Scores]:
    """``{eval set: Scores}`` from predictions.jsonl rows ({eval_set, id, gold, pred, skipped})."""
    cols: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for p in predictions:
        if "eval_set" in p and "id" in p:
            ids, correct, skipped = cols[str(p["eval_set"])]
            ids.append(str(p["id"]))
            correct.append(p.get("gold") is not None and p.get("gold") == p.get("pred"))
            skipped.append(bool(p.get("skipped")))
    return {es: Scores(np.array(i), np.array(c, dtype=bool), np.array(k, dtype=bool)) for es, (i, c, k) in cols.items()}


@dataclass(frozen=True)
class Term:
    """``weight`` × (method's accuracy in ``domain``) within a unit; with ``arm``, that one arm of
    the method (the Which-method section compares arms, the claims pool a method's arms)."""

    method: str
    domain: str
    weight: float = 1.0
    arm: str | None = None

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.method, self.arm, self.domain)

    def matches(self, r: EvalRow) -> bool:
        return r.method == self.method and r.domain == self.domain and (self.arm is None or r.arm == self.arm)


@dataclass
class _Block:
    """One (task, eval set): the example axis every unit of that task shares."""

    ids: list[str]
    pos: dict[str, int] = field(default_factory=dict)  # id → column
    num_a: list[np.ndarray] = field(default_factory=list)
    num_b: list[np.ndarray] = field(default_factory=list)
    den: list[np.ndarray] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    resampled: bool = True


@dataclass(frozen=True)
class PairedBootstrap:
    """A − B over units, with replicates of three kinds: both sources, seeds only, examples only."""

    units: tuple[Unit, ...]
    unit_a: np.ndarray  # observed per-unit values (for the seed-level paired t-test)
    unit_b: np.ndarray
    total: np.ndarray  # replicates of mean(A − B), seeds and eval examples resampled
    seed_only: np.ndarray
    eval_only: np.ndarray
    fixed_sets: tuple[str, ...]  # eval sets without per-example predictions: their sampling error is left out
    examples: int  # eval examples per unit after intersecting non-skipped examples (summed over sets, median unit)

    @property
    def diff(self) -> float:
        return float(np.mean(self.unit_a - self.unit_b)) if len(self.units) else math.nan

    @property
    def seeds(self) -> int:
        return len({u[3] for u in self.units})

    def ci(self, confidence: float) -> tuple[float, float]:
        """Percentile interval of the two-level replicates."""
        if not len(self.units):
            return math.nan, math.nan
        q = (1 - confidence) / 2
        lo, hi = np.quantile(self.total, [q, 1 - q])
        return float(lo), float(hi)

    def p_value(self) -> float:
        """Two-sided bootstrap p for 'no difference': twice the smaller tail at 0."""
        if not len(self.units):
            return math.nan
        tail = min(int(np.sum(self.total <= 0)), int(np.sum(self.total >= 0)))
        return min(1.0, 2 * (tail + 1) / (len(self.total) + 1))  # never 0: a finite bootstrap cannot show that

    def se(self, kind: str) -> float:
        """Bootstrap standard error from ``total``, ``seed_only`` or ``eval_only`` replicates."""
        arr = getattr(self, kind)
        return float(np.std(arr, ddof=1)) if len(arr) > 1 else math.nan


Cell = Mapping[tuple[str, str | None, str], list[EvalRow]]  # Term.key → its rows in one unit


def _units(rows: Sequence[EvalRow], terms: Sequence[Term]) -> dict[Unit, Cell]:
    """Units that have rows for every term (method or arm, domain) of ``terms``."""
    cells: dict[Unit, dict[tuple[str, str | None, str], list[EvalRow]]] = defaultdict(lambda: defaultdict(list))
    wanted = {t.key: t for t in terms}
    for r in rows:
        for key, t in wanted.items():
            if t.matches(r):
                cells[(r.model, r.task, r.n, r.seed)][key].append(r)
    return {u: c for u, c in cells.items() if all(c.get(w) for w in wanted)}


def _eval_sets(cell: Cell, domain: str) -> list[str]:
    """The domain's eval sets that every compared method was scored on in this unit."""
    sets = [{r.eval_set for r in rs} for (_, _, d), rs in cell.items() if d == domain]
    return sorted(set.intersection(*sets)) if sets else []


def _side(cell, terms: Sequence[Term], es: str, domain: str, n_sets: int, correct) -> np.ndarray:
    """Σ over a side's terms in ``domain`` of weight/(sets·arms) · per-example correctness."""
    out = np.zeros(())
    for t in terms:
        if t.domain == domain:
            runs = [r for r in cell[t.key] if r.eval_set == es]
            out = out + t.weight / n_sets / len(runs) * sum(correct(r) for r in runs)
    return np.asarray(out, dtype=np.float64)


def _blocks(cand, scores) -> dict[tuple[str, str], _Block]:
    """One block per (task, eval set); it is resampled only if every run in it has predictions."""
    blocks: dict[tuple[str, str], _Block] = {}
    for u, cell in cand.items():
        for r in (r for rs in cell.values() for r in rs):
            b = blocks.setdefault((u[1], r.eval_set), _Block([]))
            s = scores.get(r.run_id, {}).get(r.eval_set)
            if s is None:
                b.resampled = False
            else:
                b.ids.extend(s.ids.tolist())
    for b in blocks.values():
        b.ids = sorted(set(b.ids)) if b.resampled else ["<stored accuracy>"]
        b.pos = {i: k for k, i in enumerate(b.ids)}
    return blocks


def _design(rows, scores, side_a, side_b) -> tuple[list[Unit], dict[tuple[str, str], _Block], list[int]]:
    """The units with data for every term, and per block the units' numerators and masks."""
    terms = [*side_a, *side_b]
    domains = sorted({t.domain for t in terms})
    cand = _units(rows, terms)
    blocks = _blocks(cand, scores)
    kept: list[Unit] = []
    examples: list[int] = []
    for u, cell in sorted(cand.items(), key=lambda kv: tuple(map(str, kv[0]))):
        sets = {d: _eval_sets(cell, d) for d in domains}
        if not all(sets.values()):
            continue
        parts = [_unit_block(cell, blocks[(u[1], es)], scores, side_a, side_b, es, d, len(sets[d])) for d in domains for es in sets[d]]
        if any(p is None for p in parts):
            continue
        for es, na, nb, den in parts:
            b = blocks[(u[1], es)]
            b.units.append(len(kept))
            b.num_a.append(na)
            b.num_b.append(nb)
            b.den.append(den)
        kept.append(u)
        examples.append(int(sum(p[3].sum() for p in parts)))
    return kept, {k: b for k, b in blocks.items() if b.units}, examples


def _unit_block(cell, block: _Block, scores, side_a, side_b, es, domain, n_sets):
    """(eval set, numerator A, numerator B, mask) of one unit on one eval set, over the examples
    that none of the unit's runs skipped; None if no example is left."""
    runs = list({r.run_id: r for (_, _, d), rs in cell.items() if d == domain for r in rs if r.eval_set == es}.values())
    if not block.resampled:
        acc = lambda r: np.array([r.accuracy])  # noqa: E731
        return es, _side(cell, side_a, es, domain, n_sets, acc), _side(cell, side_b, es, domain, n_sets, acc), np.ones(1)
    pos = block.pos
    mask = np.ones(len(block.ids), dtype=bool)
    dense: dict[str, np.ndarray] = {}
    for r in runs:
        s = scores[r.run_id][es]
        at = np.fromiter((pos[i] for i in s.ids), dtype=np.int64, count=len(s.ids))
        present = np.zeros(len(block.ids), dtype=bool)
        present[at] = ~s.skipped
        mask &= present
        dense[r.run_id] = np.zeros(len(block.ids))
        dense[r.run_id][at] = s.correct & ~s.skipped
    if not mask.any():
        return None
    correct = lambda r: dense[r.run_id] * mask  # noqa: E731
    return es, _side(cell, side_a, es, domain, n_sets, correct), _side(cell, side_b, es, domain, n_sets, correct), mask.astype(np.float64)


def _block_values(na: np.ndarray, nb: np.ndarray, den: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-replicate values (rows of ``w``) of sides A and B for a block's units (rows of na/nb/den)."""
    d = w @ den.T
    a, b = w @ na.T, w @ nb.T
    empty = d <= 0  # every surviving example drawn zero times: keep the observed value
    if empty.any():
        d = np.where(empty, den.sum(axis=1), d)
        a = np.where(empty, na.sum(axis=1), a)
        b = np.where(empty, nb.sum(axis=1), b)
    return a / d, b / d


def _draw_weights(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k bootstrap resamples of n examples as counts per example (n draws with replacement each);
    bincount is ~2.5× faster than ``Generator.multinomial`` for 30k-example eval sets."""
    draws = rng.integers(0, n, size=(k, n))
    draws += np.arange(k)[:, None] * n  # one bincount for all k rows: row r counts in [r·n, (r+1)·n)
    return np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


def _eval_replicates(blocks, n_units: int, replicates: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit values of A and B per replicate (``rng`` None: one replicate, the observed values)."""
    reps = 1 if rng is None else replicates
    va, vb = np.zeros((reps, n_units)), np.zeros((reps, n_units))
    for b in blocks.values():
        n = len(b.ids)
        na, nb, den = np.vstack(b.num_a), np.vstack(b.num_b), np.vstack(b.den)
        for start in range(0, reps, max(1, _CHUNK_CELLS // n)):
            k = min(reps - start, max(1, _CHUNK_CELLS // n))
            w = np.ones((k, n)) if rng is None or not b.resampled else _draw_weights(rng, n, k)
            a, bb = _block_values(na, nb, den, w)
            va[start:start + k, b.units] += a
            vb[start:start + k, b.units] += bb
    return va, vb


def _seed_index(units: Sequence[Unit], replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates × units) indices: few-shot samples resampled within each (model, task, n)."""
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, u in enumerate(units):
        strata[u[:3]].append(i)
    cols = [np.asarray(ix)[rng.integers(0, len(ix), size=(replicates, len(ix)))] for ix in strata.values()]
    return np.concatenate(cols, axis=1)


def paired_bootstrap(rows: Sequence[EvalRow], scores: Mapping[str, Mapping[str, Scores]], side_a: Sequence[Term],
                     side_b: Sequence[Term], replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> PairedBootstrap:
    """Bootstrap of mean over units of (Σ side A terms − Σ side B terms); see the module doc."""
    units, blocks, examples = _design(rows, scores, side_a, side_b)
    fixed = tuple(sorted(es for (_, es), b in blocks.items() if not b.resampled))
    if not units:
        empty = np.zeros(0)
        return PairedBootstrap((), empty, empty, empty, empty, empty, fixed, 0)
    rng = np.random.default_rng(seed)
    oa, ob = _eval_replicates(blocks, len(units), replicates, None)
    va, vb = _eval_replicates(blocks, len(units), replicates, rng)
    idx = _seed_index(units, replicates, rng)
    obs, d = (oa - ob)[0], va - vb
    total = np.take_along_axis(d, idx, axis=1).mean(axis=1)
    return PairedBootstrap(tuple(units), oa[0], ob[0], total, obs[idx].mean(axis=1), d.mean(axis=1), fixed,
                           int(np.median(examples)))
