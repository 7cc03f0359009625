"""The shared-prefix attention: score many queries that share one prefix (the ICL
demonstrations) while the prefix runs through the model once.

The prefix runs once (batch 1) and its keys/values are kept. Batches of queries then run on
their own: each attention layer attends over the cached prefix keys/values *and* the causal query
keys, combined in one softmax. Only the query tokens pass through the projections and MLPs, which
at 16-shot MNLI (≈635 prefix tokens, ≈41 per query) is ≈17× less work. The prefix keys/values are
never copied per query: the attention over the prefix is one matrix product of all queries' rows
(batch folded into rows) with the single cached copy, so memory does not grow with batch × prefix
length. (The obvious route, expanding a DynamicCache to the batch, materialises batch × prefix
keys/values in every layer, ≈0.5 GB per batch of 16 at 16-shot MNLI in fp32, plus SDPA's
grouped-query repeat of them.)

The kernel plugs into transformers' attention dispatch (``AttentionInterface``) for the duration
of a call (``shared_prefix_mode``), and ``query_hidden`` checks that every layer went through it;
a model whose attention does not (custom code, sliding windows, attention sinks, soft-capping) or
that cannot return a plain cache raises ``PrefixCacheUnsupported``, and scoring falls back to the
naive path. Families known not to fit are declared in ``models.adapter`` and skip the attempt.

The prefix keys/values are kept in the compute dtype (autocast's, else the model's) from the
start, so no kernel casts them per batch or layer. Each batch of queries runs packed into one row
(no padding through the projections and MLPs); the attention unpacks it per query.

Three kernels compute the same attention (``KERNELS``; ``auto`` picks by device):
- ``split`` (CPU, the default there): two fused attentions (PyTorch's CPU flash kernel, which
  returns the log-sum-exp) — every query row of a head group against the one cached prefix
  (batch and grouped heads folded into rows: the prefix is never copied or repeated), and each
  query against its own causal tokens — merged by their log-sum-exps into the one softmax, in
  fp32. Within fp32 rounding of naive scoring; at 16-shot MNLI in bf16 ~4× faster than ``fp32``.
- ``fp32``: the prefix read once per batch, never copied, softmax statistics in fp32 — exact to
  ~1e-6 of naive scoring, but it materialises the fp32 scores of every head ([H, B·q, P]) and
  makes ~8 passes over them (memory-bound: most of the cached path's time on CPU before
  ``split``). The fallback where PyTorch lacks the CPU kernel.
- ``sdpa`` (CUDA): the prefix keys/values expanded to the batch and concatenated with the
  queries' own, then one ``scaled_dot_product_attention`` with a [prefix: all ; own: causal] mask,
  so PyTorch's fused (memory-efficient/flash) kernels run and no score matrix is materialised;
  the price is a B × P copy of the prefix keys/values per layer for the call.
``prefix_kernel("sdpa")`` forces one (tests, ``bench/bench_prefix_kernels.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ATTN_NAME = "fewtune_shared_prefix"
KERNELS = ("auto", "fp32", "sdpa", "split")


def _flash_cpu_op():
    """PyTorch's fused CPU attention, which (unlike the public SDPA) also returns the log-sum-exp;
    None where this torch lacks it (the ``fp32`` kernel is used instead)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu_op()


class PrefixCacheUnsupported(RuntimeError):
    """The model cannot use the shared-prefix attention; the caller falls back to naive scoring."""


@dataclass
class PrefixKV:
    """The prefix's keys and values per layer, ``[1, kv_heads, P, head_dim]`` each (post-RoPE)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    last_hidden: torch.Tensor  # [d]: the prefix's last hidden state (scores an empty query)


@dataclass
class _Packing:
    """Where each query's tokens sit in the packed row: ``index`` ``[B, qmax]`` (pads repeat the
    query's last token) and ``valid`` ``[B, qmax]`` (real tokens), row-major in packing order."""

    index: torch.Tensor
    valid: torch.Tensor


class _Active(threading.local):
    prefix: PrefixKV | None = None
    packing: _Packing | None = None
    calls: int = 0
    kernel: str = "auto"


@contextmanager
def prefix_kernel(kernel: str) -> Iterator[None]:
    """Use ``kernel`` (one of ``KERNELS``) for shared-prefix attention while inside."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown prefix kernel '{kernel}' (expected one of {KERNELS})")
    before, _ACTIVE.kernel = _ACTIVE.kernel, kernel
    try:
        yield
    finally:
        _ACTIVE.kernel = before


_ACTIVE = _Active()
_REGISTERED = False


def _unsupported_kwargs(kw: dict) -> list[str]:
    """Attention features our shared-prefix kernel does not implement (fall back instead)."""
    return [k for k in ("sliding_window", "softcap", "s_aux", "position_bias", "sinks") if kw.get(k) is not None]


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a batch of queries over [shared prefix ; own causal tokens], one softmax.

    ``query`` is ``[B, H, q, d]``, ``key``/``value`` ``[B, Hkv, q, d]`` (the query tokens only: no
    cache is passed to the model). The prefix keys/values are ``[1, Hkv, P, d]``, already in the
    compute dtype (``encode_prefix``). The kernel (``KERNELS``, module doc) computes it; grouped-
    query heads are handled by viewing the query heads as ``[Hkv, g]`` rather than repeating the
    prefix. Returns ``[B, q, H, d]`` like transformers' attention functions.
    """
    prefix = _ACTIVE.prefix
    layer = getattr(module, "layer_idx", None)
    if prefix is None or layer is None or not 0 <= layer < len(prefix.keys):
        raise PrefixCacheUnsupported("attention module without a layer index matching the prefix cache")
    bad = _unsupported_kwargs(kwargs)
    if bad or (dropout and module.training):
        raise PrefixCacheUnsupported(f"attention uses {', '.join(bad) or 'dropout'}")
    pk, pv = prefix.keys[layer], prefix.values[layer]
    _, h, q, d = query.shape
    hkv = key.shape[1]
    if h % hkv or pk.shape[1] != hkv or pk.shape[-1] != d or value.shape[-1] != pv.shape[-1]:
        raise PrefixCacheUnsupported("prefix cache shape does not match the attention heads")
    scale = scaling if scaling is not None else d**-0.5
    _ACTIVE.calls += 1
    pack = _ACTIVE.packing
    if pack is not None:  # the queries come packed in one row: attend per query, padded
        query, key, value = (t[0][:, pack.index].transpose(0, 1) for t in (query, key, value))
        q, attention_mask = query.shape[2], None  # the model's mask is the packed one; ours is causal per query
    own = attention_mask[..., -q:] if attention_mask is not None else None  # [b|1, 1, q, q]: padding + causal
    kernel = _ACTIVE.kernel if _ACTIVE.kernel != "auto" else _auto_kernel(query)
    if kernel == "split" and (query.device.type != "cpu" or _FLASH_CPU is None):
        kernel = "sdpa"  # the log-sum-exp kernel is PyTorch's CPU one
    if kernel == "split":
        out = _split_attention(query, key, value, pk, pv, own, scale)
    elif kernel == "sdpa":
        out = _sdpa_attention(query, key, value, pk, pv, _own_mask(own, q, query.device), scale)
    else:
        out = _fp32_attention(query, key, value, pk, pv, own, scale)
    return (out if pack is None else out[pack.valid].unsqueeze(0)), None


def _auto_kernel(query: torch.Tensor) -> str:
    """``sdpa`` on CUDA, ``split`` on CPU where PyTorch has its fused CPU kernel, else ``fp32``."""
    if query.is_cuda:
        return "sdpa"
    return "split" if query.device.type == "cpu" and _FLASH_CPU is not None else "fp32"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on for ``t``'s device (as transformers'
    own SDPA path, whose inputs autocast casts), else ``t``'s own. After RoPE under autocast the
    queries/keys are fp32 and the values bf16; the fused kernels need one dtype."""
    dev = t.device.type
    try:
        on, dt = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        dt = torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()
    return dt if on and t.is_floating_point() else t.dtype


def _fp32_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                    own: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The unfused kernel: fp32 scores of every head against the prefix, one softmax (module doc)."""
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g, p, dv = h // hkv, pk.shape[2], value.shape[-1]
    dt = compute_dtype(query)  # the cached prefix is already in it
    qg = query.to(dt).reshape(b, hkv, g, q, d)
    rows = qg.transpose(0, 1).reshape(hkv, b * g * q, d)  # batch folded into rows
    s_pre = torch.matmul(rows, pk[0].transpose(1, 2)).float().mul_(scale).view(hkv, b, g, q, p)
    s_own = torch.matmul(qg, key.to(dt).unsqueeze(2).transpose(-1, -2)).float().mul_(scale).transpose(0, 1)  # [hkv,b,g,q,q]
    if own is None:
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril_()
        s_own = s_own.masked_fill(~causal, float("-inf"))
    else:
        m = own.transpose(0, 1).unsqueeze(2)  # [1, b|1, 1, q, q]
        s_own = s_own.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s_own + m.float()
    top = torch.maximum(s_pre.amax(-1), s_own.amax(-1)).unsqueeze(-1)
    e_pre = (s_pre - top).exp_()
    e_own = (s_own - top).exp_()
    denom = e_pre.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    p_pre = e_pre.div_(denom).to(pv.dtype)
    p_own = e_own.div_(denom).to(value.dtype)
    out = torch.matmul(p_pre.view(hkv, b * g * q, p), pv[0]).view(hkv, b, g, q, dv)
    out = out + torch.matmul(p_own, value.transpose(0, 1).unsqueeze(2))
    return out.permute(1, 3, 0, 2, 4).reshape(b, q, h, dv)


def _split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                     own: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Two fused attentions merged by their log-sum-exp (module doc): all queries' rows of a head
    group against the one cached prefix (batch and grouped heads folded into rows, so the prefix
    is neither copied nor repeated), and each query against its own causal tokens. Each returns
    its normalised output and log-sum-exp; the weights ``exp(lse_part - lse_total)`` combine
    them into the single softmax over [prefix ; own], in fp32."""
    dt = compute_dtype(query)
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    query, key, value = query.to(dt), key.to(dt), value.to(dt)
    rows = query.reshape(b, hkv, g * q, d).transpose(0, 1).reshape(1, hkv, b * g * q, d)
    o_pre, l_pre = _FLASH_CPU(rows, pk.to(dt), pv.to(dt), 0.0, False, scale=scale)[:2]
    if g > 1:
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    if own is None:
        o_own, l_own = _FLASH_CPU(query, key, value, 0.0, True, scale=scale)[:2]
    else:
        bias = torch.zeros(own.shape, dtype=dt, device=own.device).masked_fill_(~_own_mask(own, q, own.device), float("-inf"))
        o_own, l_own = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=bias.expand(b, 1, q, q), scale=scale)[:2]
    dv = value.shape[-1]
    o_pre = o_pre.reshape(hkv, b, g * q, dv).transpose(0, 1).reshape(b, h, q, dv)
    l_pre = l_pre.reshape(hkv, b, g * q).transpose(0, 1).reshape(b, h, q)
    w_own = torch.sigmoid(l_own - l_pre).unsqueeze(-1)  # exp(l_own) / (exp(l_pre) + exp(l_own))
    out = o_pre.float().lerp_(o_own.float(), w_own)
    return out.to(dt).transpose(1, 2)


def _own_mask(own: torch.Tensor | None, q: int, dev: torch.device) -> torch.Tensor:
    """The queries' own [b|1, 1, q, q] boolean mask (True: attend): the model's, else causal."""
    if own is None:
        return torch.ones(q, q, dtype=torch.bool, device=dev).tril_()[None, None]
    return own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2


def _sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                    own: torch.Tensor, scale: float) -> torch.Tensor:
    """[prefix ; own] attention through ``scaled_dot_product_attention`` (see the module doc)."""
    b, h, q, _ = query.shape
    hkv, p = key.shape[1], pk.shape[2]
    dt = compute_dtype(query)
    query = query.to(dt)
    k = torch.cat([pk.to(dt).expand(b, -1, -1, -1), key.to(dt)], dim=2)
    v = torch.cat([pv.to(dt).expand(b, -1, -1, -1), value.to(dt)], dim=2)
    if h != hkv:  # grouped-query heads (enable_gqa needs torch >= 2.5; repeat works everywhere)
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    own = own.expand(b, 1, q, q)
    mask = torch.cat([own.new_ones(b, 1, q, p), own], dim=-1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _register() -> None:
    """Make our attention function known to transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as e:
        raise PrefixCacheUnsupported(_old_transformers(e)) from None

    AttentionInterface.register(_ATTN_NAME, shared_prefix_attention)
    # The model's mask builder looks masks up by implementation name; sdpa's boolean masks (or
    # None for plain causal) are what our kernel reads.
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, sdpa_mask)
    _REGISTERED = True


def _old_transformers(err: ImportError) -> str:
    """An installed transformers older than pyproject's bound (4.56) lacks the attention/mask
    registries or per-layer caches the prefix cache plugs into: score naively and say why."""
    import transformers

    return f"transformers {transformers.__version__} lacks what the prefix cache needs ({err}); upgrade to >= 4.56"


def _cache_layers_kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys/values per layer of a transformers cache, if it is a plain full-attention one."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError as e:
        raise PrefixCacheUnsupported(_old_transformers(e)) from None

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        raise PrefixCacheUnsupported(f"the model's cache ({type(cache).__name__}) is not a plain full-attention DynamicCache")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def encode_prefix(body: torch.nn.Module, prefix_ids: Sequence[int], dev: torch.device) -> PrefixKV:
    """Run the prefix once (batch 1) and keep its keys/values."""
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=dev)
    try:
        out = body(input_ids=ids, use_cache=True)
    except (TypeError, ValueError) as e:  # a model that does not take use_cache
        raise PrefixCacheUnsupported(f"the model cannot return a KV cache ({e})") from None
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise PrefixCacheUnsupported("the model returned no KV cache")
    keys, values = _cache_layers_kv(cache)
    dt = compute_dtype(keys[0])  # cast once here, not per batch and layer
    keys, values = [k.to(dt) for k in keys], [v.to(dt) for v in values]
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return PrefixKV(keys, values, len(prefix_ids), h[0, -1])


@contextmanager
def shared_prefix_mode(body: torch.nn.Module, prefix: PrefixKV) -> Iterator[None]:
    """Route the model's attention through ``shared_prefix_attention`` while inside."""
    _register()
    config = body.config
    previous = config._attn_implementation
    _ACTIVE.prefix = prefix
    config._attn_implementation = _ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.prefix = None


def query_hidden(body: torch.nn.Module, prefix: PrefixKV, queries: Sequence[Sequence[int]],
                 dev: torch.device) -> torch.Tensor:
    """Last-token hidden states ``[B, d]`` of queries (token ids) that continue the cached prefix.

    The queries run packed into one row, without padding: the projections, MLPs and norms see
    only real tokens (padding a length-sorted batch of 16 to its longest query ran ~25 % more
    tokens at 16-shot MNLI). Each attention layer unpacks its queries/keys/values to a padded
    ``[B, H, qmax, d]`` batch, attends per query (causal over its own tokens, plus the prefix)
    and packs the result back (``_Packing``). Positions are explicit (prefix length + offset) so
    position-embedding models (RoPE, learned) agree with the naive path. An empty query scores
    the token after the prefix: the prefix's own last hidden state.
    """
    lens = torch.tensor([len(s) for s in queries], dtype=torch.long)
    rows = prefix.last_hidden.expand(len(queries), -1)
    if int(lens.sum()) == 0:
        return rows
    ends = lens.cumsum(0)
    width = int(lens.max())
    offset = torch.arange(width)
    valid = offset < lens.unsqueeze(1)
    index = torch.minimum(ends.unsqueeze(1) - lens.unsqueeze(1) + offset, (ends - 1).clamp(min=0).unsqueeze(1))
    ids = torch.tensor([[t for s in queries for t in s]], dtype=torch.long, device=dev)
    pos = (prefix.length + torch.cat([torch.arange(n) for n in lens.tolist()])).unsqueeze(0).to(dev)
    _ACTIVE.calls, _ACTIVE.packing = 0, _Packing(index.to(dev), valid.to(dev))
    try:
        out = body(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        _ACTIVE.packing = None
    if _ACTIVE.calls != len(prefix.keys):
        raise PrefixCacheUnsupported(
            f"only {_ACTIVE.calls} of {len(prefix.keys)} attention layers went through transformers' attention interface"
        )
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    last = h[0, (ends - 1).clamp(min=0).to(dev)]
    return torch.where((lens > 0).to(dev).unsqueeze(1), last, rows.to(last.dtype))
