"""FlexAttention (torch.nn.attention.flex_attention), compiled with torch.compile.

The masking becomes a BlockMask built from one mask_mod (causal bottom-right aligned,
window, key_lengths, bool mask), so that key blocks nobody sees are skipped; a floating
mask becomes a score_mod. Block masks are cached, so a repeated call builds nothing.
Where inductor's decoding kernel (under 128 queries) could not hold a group's query rows,
the main kernel is forced (`kernel_options`).

On a CPU, inductor compiles FlexAttention to C++ (a C++ compiler must be present; about
5-15 s per new shape or mask structure on two cores) and only for inference: no backward,
no log-sum-exp. Those calls are refused there. Inside a model that torch.compile's inductor
compiles on a CPU, inductor's CPU FlexAttention fails on masks that run eagerly (torch 2.13):
key lengths give C++ that does not compile, and once dynamo makes a length dynamic a causal
or window mask (its offset, Skv - Sq) raises in lowering. Causal and bool masks at static
lengths (dynamic=False) compile.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch before 2.9: available() says so, and nothing below runs
    AuxRequest = None

from attnkit.backends.base import (
    GRID_ROWS,
    NO_FORWARD_AD,
    Backend,
    Result,
    in_batch_pieces,
    raise_recompile_limits,
)
from attnkit.call import AttentionCall
from attnkit.masks import HIDDEN_BELOW

# Each new (shape, dtype, mask structure) is a recompile; past dynamo's default limit of 8
# per function it would silently run FlexAttention eagerly, which is a dense math path.
RECOMPILE_LIMIT = 256
CACHED_BLOCK_MASKS = 32
CPU_MIN_HEAD_DIM = 32


@cache
def compiled_flex() -> Callable[..., Tensor | tuple[Tensor, object]]:
    raise_recompile_limits(RECOMPILE_LIMIT, 16 * RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


# Looked up once, at import: searching PATH on every call would cost more than the
# dispatch, and dynamo cannot trace the search (os.stat) inside a compiled model.
HAS_CXX = any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


def available(device: torch.device) -> str | None:
    if AuxRequest is None:
        # Older FlexAttention differs in more than its API: torch 2.5's create_block_mask
        # calls a mask_mod at indices past the lengths, and its CPU path does not compile.
        return (f"needs torch >= 2.9 (FlexAttention's API from then on, which this wrapper "
                f"was built and checked against), found {torch.__version__}")
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not HAS_CXX:
            return "compiling FlexAttention on a CPU needs a C++ compiler; none found"
        return None
    return f"compiled FlexAttention runs on cuda and cpu, got {device.type}"


def empty_refusal(seq_q: int, seq_kv: int) -> str | None:
    """Why compiled FlexAttention cannot run Sq or Skv of 0, or None: with no keys inductor
    found no kernel (NoValidChoicesError, H200, torch 2.11), and with no queries the CPU
    process died of SIGFPE (torch 2.13; run 52)."""
    if seq_q == 0 or seq_kv == 0:
        return f"compiled FlexAttention cannot run Sq = {seq_q}, Skv = {seq_kv} (an empty call)"
    return None


def supports(call: AttentionCall) -> str | None:
    if call.dropout_p:
        return "FlexAttention has no dropout"
    if call.dtype == torch.float64:
        return "compiled FlexAttention does not take float64"
    if call.heads_q > GRID_ROWS:
        return f"takes at most {GRID_ROWS} query heads, got {call.heads_q}"
    if call.carries_tangents:  # compiled FlexAttention dropped them silently (CPU, torch 2.13)
        return NO_FORWARD_AD
    empty = empty_refusal(call.seq_q, call.seq_kv)
    if empty:
        return empty
    if call.device.type == "cpu":
        if call.head_dim < CPU_MIN_HEAD_DIM or call.head_dim_v < CPU_MIN_HEAD_DIM:
            # Seen with torch 2.13: D=16 and D=8 at S=40 gave NaN or errors of 0.3.
            return (
                f"compiled FlexAttention on a CPU computes wrong results for head dims "
                f"below {CPU_MIN_HEAD_DIM}, got {call.head_dim}/{call.head_dim_v}"
            )
        if call.needs_grad:
            return "compiled FlexAttention on a CPU is inference only (no backward)"
        if call.return_lse:
            return "compiled FlexAttention on a CPU cannot return the log-sum-exp"
    return None


# key -> (block mask, the tensors its mask_mod reads). Holding the tensors keeps their
# memory from being reused by another tensor at the same address while the entry lives,
# so (data_ptr, shape, stride, _version) identifies their content; in-place writes bump
# _version and miss.
_BLOCK_MASKS: OrderedDict[tuple, tuple[BlockMask, tuple[Tensor, ...]]] = OrderedDict()
# The entries a CUDA graph capture used, for the life of the process: a graph reads their
# tensors by address on every replay, so the LRU above must not free them when it drops
# them (after CACHED_BLOCK_MASKS other masks the replays would read freed memory).
_CAPTURED_BLOCK_MASKS: dict[tuple, tuple[BlockMask, tuple[Tensor, ...]]] = {}


def _capturing(device: torch.device) -> bool:
    """Whether work on device is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tensor_key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version)


def block_mask(call: AttentionCall) -> BlockMask | None:
    """The BlockMask of causal/window/key_lengths/bool mask, cached; None when all visible."""
    bool_mask = call.attn_mask
    if bool_mask is not None and bool_mask.dtype != torch.bool:
        bool_mask = None  # a floating mask is the score_mod's
    if not (call.causal or call.window is not None or call.key_lengths is not None):
        if bool_mask is None:
            return None
    per_batch = call.key_lengths is not None or (bool_mask is not None and bool_mask.shape[0] > 1)
    per_head = bool_mask is not None and bool_mask.shape[1] > 1
    b = call.batch if per_batch else None
    h = call.heads_q if per_head else None
    # Inside a graph torch.compile traces, the block mask is built in the graph: the cache
    # key's data_ptr has no value there (dynamo raised on it).
    traced = torch.compiler.is_compiling()
    key = None if traced else (
        call.device, b, h, call.seq_q, call.seq_kv, call.causal, call.window,
        _tensor_key(call.key_lengths), _tensor_key(bool_mask),
    )
    hit = None if traced else _BLOCK_MASKS.get(key) or _CAPTURED_BLOCK_MASKS.get(key)
    if hit is not None:
        if key in _BLOCK_MASKS:
            _BLOCK_MASKS.move_to_end(key)
        if _capturing(call.device):
            _CAPTURED_BLOCK_MASKS[key] = hit
        return hit[0]

    left, right = call.window or (None, None)
    if call.causal:
        right = 0 if right is None else min(right, 0)
    off, left, right = (_closable(n, call) for n in (call.diagonal_offset, left, right))
    lengths = call.key_lengths
    full = None if bool_mask is None else bool_mask.expand(call.batch, call.heads_q, -1, -1)
    rows_1 = bool_mask is not None and bool_mask.shape[2] == 1
    cols_1 = bool_mask is not None and bool_mask.shape[3] == 1

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # The same definition as attnkit.masks.visibility, one (b, h, q, k) at a time.
        visible = kv_idx >= 0
        if right is not None:
            visible = visible & (kv_idx <= q_idx + off + right)
        if left is not None:
            visible = visible & (kv_idx >= q_idx + off - left)
        if lengths is not None:
            visible = visible & (kv_idx < lengths[b])
        if full is not None:
            visible = visible & full[b, h, 0 if rows_1 else q_idx, 0 if cols_1 else kv_idx]
        return visible

    result = create_block_mask(mask_mod, b, h, call.seq_q, call.seq_kv, device=call.device)
    if not traced:
        entry = (result, tuple(t for t in (lengths, bool_mask) if t is not None))
        _BLOCK_MASKS[key] = entry
        if _capturing(call.device):
            _CAPTURED_BLOCK_MASKS[key] = entry
        if len(_BLOCK_MASKS) > CACHED_BLOCK_MASKS:
            _BLOCK_MASKS.popitem(last=False)
    return result


def _closable(n: int | None, call: AttentionCall) -> int | Tensor | None:
    """n as a mask_mod may close over it. Inside a graph torch.compile traces on a GPU, a
    0-d tensor: n may be a symbolic int there (a length dynamo made dynamic), which
    inductor's FlexAttention lowering cannot take (PyTorch 2.11 on an H200:
    "'ShapeAsConstantBuffer' object has no attribute 'dtype'"), and dynamo gives no way
    to tell (isinstance(n, torch.SymInt) is False while tracing). Its CPU lowering takes
    neither a symbolic int nor such a tensor (torch 2.13), so n stays an int there."""
    if n is None or call.device.type != "cuda" or not torch.compiler.is_compiling():
        return n
    return torch.full((), n, dtype=torch.int64, device=call.device)


def score_mod(call: AttentionCall) -> Callable[..., Tensor] | None:
    """Adds the floating attn_mask to each scaled score, an entry below
    masks.HIDDEN_BELOW as -inf; None without one."""
    if call.attn_mask is None or call.attn_mask.dtype == torch.bool:
        return None
    # The threshold is applied in the kernel, entry by entry: a pass over the mask first
    # would copy a broadcast (expanded) mask whole.
    bias = call.attn_mask.expand(call.batch, call.heads_q, call.seq_q, call.seq_kv)

    def add_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        entry = bias[b, h, q_idx, kv_idx]
        return torch.where(entry < HIDDEN_BELOW, float("-inf"), score + entry)

    return add_bias


def kernel_options(call: AttentionCall, mask: BlockMask | None) -> dict[str, bool] | None:
    """FlexAttention's kernel options for `call` under `mask`: None (its own choice), or
    its main kernel forced where its decoding kernel would have no config to compile."""
    # Under 128 queries inductor lowers grouped heads to its decoding kernel, which puts a
    # kv head's Sq * group query rows in one block of next_pow2(Sq * group) rows and drops
    # every config whose block does not divide the BlockMask's query block: past it,
    # compiling raises NoValidChoicesError (seen with PyTorch 2.11 on an H200, 100 queries,
    # group 2, causal). The main kernel takes any such call.
    if mask is None or call.seq_q * call.group <= mask.BLOCK_SIZE[0]:
        return None
    return {"FORCE_USE_FLEX_ATTENTION": True}


def run(call: AttentionCall) -> Result:
    if call.batch * call.heads_kv > GRID_ROWS:
        # Inductor's kernels lay the batch along a grid's second dimension, and its
        # decoding kernel (batch, kv head) rows: past GRID_ROWS, CUDA refused the launch
        # ("CUDA driver error: invalid argument", PyTorch 2.11, batch 65538, one head).
        return in_batch_pieces(call, GRID_ROWS // call.heads_kv, run)
    flex = compiled_flex()
    q, k, v = call.q, call.k, call.v
    if not call.needs_grad:
        # Under no_grad, inputs that require grad (a model's leaves, evaluated) would still
        # make compiled FlexAttention on a CPU raise that it has no backward.
        q, k, v = q.detach(), k.detach(), v.detach()
    mask = block_mask(call)
    kwargs = dict(
        score_mod=score_mod(call),
        block_mask=mask,
        scale=call.scale,
        enable_gqa=call.grouped,
        kernel_options=kernel_options(call, mask),
    )
    if not call.return_lse:
        return flex(q, k, v, **kwargs), None
    # flex_attention returns the log-sum-exp in natural log (it converts its base-2 stats),
    # -inf on rows that see no key: the contract's convention.
    out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse.to(torch.float32)


BACKEND = Backend(
    name="flex",
    summary="torch.compile'd FlexAttention with a cached BlockMask (CPU: inference only)",
    available=available,
    supports=supports,
    run=run,
)
