"""torch.nn.functional.scaled_dot_product_attention: PyTorch's choice, and each of its
kernels pinned with torch.nn.attention.sdpa_kernel.

This module defines a family, so it exports `BACKENDS` (a list) rather than one `BACKEND`.

Mapping the contract onto SDPA:
- A scale <= 0 goes in as -q and -scale (exact), or as q * 0 and 1: PyTorch's flash
  kernels multiply the scale into their -inf scores, masked or padding a key block, and
  a scale below 0 turns them into +inf: the CPU kernel gave NaN in every row with a
  hidden key (torch 2.13), the CUDA flash and cuDNN kernels NaN in every causal row
  (torch 2.11, H200), and the CUDA flash kernel inf without any mask where Skv was not
  a multiple of its key block (Skv 100 and 192, H200, run 55).
- causal alone with Sq == Skv -> is_causal=True. SDPA's is_causal is aligned to the top
  left, so causal with Sq != Skv (or with any other masking) takes another way (below).
- causal alone with one query row -> no mask: aligned to the bottom right, it sees every key
  (AttentionCall.has_mask is False). Causal alone with 1 < Sq < Skv -> the flash kernel's
  own causal, which is aligned to the bottom right, through the aten op
  under SDPA (torch.ops.aten._scaled_dot_product_flash_attention; PyTorch's
  torch.nn.attention.bias.causal_lower_right does the same): no mask tensor, backward and
  native grouped heads included. SDPA itself keeps flash off causal calls with Sq != Skv
  because its is_causal means the top left there. Where the flash kernel cannot run the call
  (float32, a head dim not a multiple of 8 or above 256, another kernel pinned, flash
  turned off in torch.backends.cuda for plain sdpa), or inside
  torch.compile (whose trace cannot ask the kernel's check), the band goes as a bool mask
  instead, with no dead-row handling (below): every row sees at least its own key.
- masking without a floating mask -> a bool attn_mask from masks.visibility; with one ->
  the additive masks.score_bias, whose entries below masks.HIDDEN_BELOW count as hidden
  keys in the dead-row check below, cast to the input dtype after that check (clamped to
  float16's range for float16 inputs).
- Hq != Hkv -> enable_gqa=True; a pinned kernel that rejects it gets k/v repeated instead.
- A row that sees no key: the mask is opened on that row (so no kernel ever sees a fully
  masked row, whose handling differs between kernels and versions) and its output is
  zeroed afterwards, which also zeroes the gradient flowing into it. torch.where, not
  masked_fill, does both: masked_fill copies its input to a contiguous (B, H, S, D) tensor
  first, so the kernel's (B, S, H, D) output then took a second copy for a module's
  output projection (bert preset on an H200, run 53: 30 us of extra elementwise kernels
  a forward, 0.108 -> 0.090 ms with the change). where keeps the output's layout while
  the dead rows do not vary over heads (padding masks, key_lengths, causal, (B, 1, Sq,
  Skv) masks); where they do (a per-head mask), their layout leads and the output comes
  back contiguous, as masked_fill's did.
- return_lse is refused: SDPA does not return the log-sum-exp.
- A batch past 65535 (GRID_ROWS) runs in pieces of at most that many on CUDA, where the
  flash and cuDNN kernels failed (run_plan).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.backends.base import (
    GRID_ROWS,
    NO_FORWARD_AD,
    Backend,
    Result,
    always_available,
    cuda_only,
    in_batch_pieces,
)
from attnkit.call import AttentionCall
from attnkit.masks import HIDDEN_BELOW, expand_kv, score_bias, visibility

NO_LSE = "scaled_dot_product_attention does not return the log-sum-exp (return_lse=True)"
# pytorch/pytorch#196678: with an explicit attn_mask, cuDNN's backward scores the padded
# half of a last 128-key tile 0, and where a row's log-sum-exp is below -88.7 (a row whose
# keys a -10000 padding mask hides all, or large negative logits) exp() of that overflows
# and dq is NaN. Measured on an H200 (torch 2.11, cuDNN 9.19, run 53: 882 calls, head dims
# 32 to 256, bf16 and fp16, Skv 17..1088, bool and additive masks): NaN at every
# Skv % 128 == 64 with such rows, and at no other Skv. Which rows those are depends on
# the values, so every masked call with gradients and Skv % 128 == 64 keeps off cuDNN;
# plain "sdpa" leaves it out of its choice there. (Run 1 saw cuDNN's masked backward
# wrong on an H100 at a shape it did not record, with fully hidden rows then passed to
# the kernel: they are opened now.)
CUDNN_MASKED_GRAD = (
    "cuDNN's backward with an explicit attn_mask gives NaN dq when Skv % 128 == 64 "
    "(pytorch/pytorch#196678); run it without gradients or pick another kernel"
)
_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Arguments:
    """What one SDPA call receives, and which rows to zero afterwards."""

    k: Tensor
    v: Tensor
    attn_mask: Tensor | None  # bool or additive, (B|1, Hq|1, Sq, Skv)
    is_causal: bool
    enable_gqa: bool
    dead: Tensor | None  # bool (B|1, Hq|1, Sq, 1): rows that see no key
    # Causal aligned to the bottom right with no mask tensor: only the flash op runs it.
    bottom_right: bool = False


def arguments(call: AttentionCall, native_gqa: bool = True) -> Arguments:
    """The SDPA arguments for `call`; k/v are repeated to Hq heads unless native_gqa."""
    k, v = (call.k, call.v) if native_gqa else expand_kv(call)
    gqa = native_gqa and call.grouped
    if not call.has_mask:
        # A decoding step (causal, one query row) is here too: an all-True mask would keep
        # SDPA off its flash kernel and cost the dead-row check and a pass over the output.
        return Arguments(k, v, None, False, gqa, None)
    if call.causal_alone and call.seq_q == call.seq_kv:
        return Arguments(k, v, None, True, gqa, None)
    if call.causal_alone and call.seq_q <= call.seq_kv:
        # Aligned to the bottom right, every query sees at least its own key: no row is
        # dead, so there is nothing to open or zero.
        return Arguments(k, v, visibility(call), False, gqa, None)
    # Dead rows as one tensor, used twice (here and on the output): each small op is a
    # kernel launch, and at module sizes launches are what the GPU waits on.
    if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        # Entries below HIDDEN_BELOW stay as they are (no pass to make them -inf): the
        # rows they hide whole are dead here, and elsewhere they weigh 0. Both are decided
        # on the caller's values, before the cast to q's dtype, in which a float32 -1e9
        # would be float16's -inf.
        mask = score_bias(call, call.attn_mask.dtype, lowest_as_inf=False)
        dead = (mask < HIDDEN_BELOW).all(dim=-1, keepdim=True)
        mask = torch.where(dead, 0.0, mask)
        if mask.dtype != call.dtype:
            if torch.finfo(call.dtype).min >= HIDDEN_BELOW:
                # float16: an entry it cannot hold goes in as its lowest value, which
                # against any key the row sees weighs 0 all the same, and a row such
                # entries hide whole keeps its scores, as the oracle does.
                mask = mask.clamp_min(torch.finfo(call.dtype).min)
            mask = mask.to(call.dtype)
    else:
        mask = visibility(call)
        dead = mask.any(dim=-1, keepdim=True).logical_not_()
        mask = mask | dead
    return Arguments(k, v, mask, False, gqa, dead)


def positive_scale(call: AttentionCall) -> tuple[Tensor, float]:
    """q and a scale above 0 that give `call`'s scores (module docstring): -q and -scale
    for a scale below 0, which is exact, and q * 0 and 1 for a scale of 0."""
    if call.scale > 0:
        return call.q, call.scale
    if call.scale < 0:
        return -call.q, -call.scale
    return call.q * 0.0, 1.0


def bottom_right(call: AttentionCall, pinned: bool) -> Arguments | None:
    """Arguments for the flash op's own causal, aligned to the bottom right, where `call` is
    causal alone with 1 < Sq < Skv and the flash kernel can run it; else None. Unless
    pinned, a flash kernel the caller turned off in torch.backends.cuda stays off."""
    if not (call.causal_alone and 1 < call.seq_q < call.seq_kv):
        return None
    # CUDA's flash kernel only: ROCm's is another, and CPU's flash op aligns to the top left.
    # The op does not pad head dims as SDPA does, and its kernel's check cannot be traced.
    if (call.device.type != "cuda" or torch.version.hip is not None or call.carries_tangents
            or call.head_dim % 8 or call.head_dim_v != call.head_dim
            or call.dtype not in _RULES[SDPBackend.FLASH_ATTENTION.name][0]
            or torch.compiler.is_compiling()
            or not (pinned or torch.backends.cuda.flash_sdp_enabled())):
        return None
    args = Arguments(call.k, call.v, None, False, call.grouped, None, bottom_right=True)
    return args if kernel_accepts(SDPBackend.FLASH_ATTENTION, call, args) else None


def cudnn_masked_grad_fails_at(seq_kv: int) -> bool:
    """Whether cuDNN's masked backward can give NaN at this key length (CUDNN_MASKED_GRAD;
    benchmarks/cudnn_masked_backward.py checks it on a GPU)."""
    return seq_kv % 128 == 64


def cudnn_masked_grad(call: AttentionCall, args: Arguments) -> bool:
    """Whether cuDNN would run the backward of a masked call at a key length where it can
    give NaN (CUDNN_MASKED_GRAD)."""
    return (args.attn_mask is not None and call.needs_grad
            and cudnn_masked_grad_fails_at(call.seq_kv))


def plan(kernel: SDPBackend | None, call: AttentionCall) -> tuple[Arguments | None, str | None]:
    """(arguments, None) for running `call` on SDPA's `kernel` (None: PyTorch chooses), or
    (None, why not)."""
    if call.return_lse:
        return None, NO_LSE
    if kernel in (None, SDPBackend.FLASH_ATTENTION):
        flash = bottom_right(call, pinned=kernel is not None)
        if flash is not None:
            return flash, None
    args = arguments(call, native_gqa=True)
    if kernel is None or kernel == SDPBackend.MATH:
        return args, None
    if call.device.type != "cuda":
        return None, f"{kernel.name} needs a CUDA device, got {call.device.type}"
    dtypes, mask_rule = _RULES[kernel.name]
    if call.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        return None, f"{kernel.name} needs {names}, got {str(call.dtype).removeprefix('torch.')}"
    if mask_rule and args.attn_mask is not None:
        return None, f"{kernel.name} {mask_rule}"
    if kernel == SDPBackend.CUDNN_ATTENTION and cudnn_masked_grad(call, args):
        return None, CUDNN_MASKED_GRAD
    if torch.compiler.is_compiling():
        # dynamo cannot trace the kernel's own check (SDPAParams is a pybind object: a graph
        # break, or an error under fullgraph; run 51). In a traced graph the rules above
        # decide, k/v go repeated to Hq heads, which every kernel takes, and SDPA itself
        # raises if the kernel cannot run the call.
        return (arguments(call, native_gqa=False) if call.grouped else args), None
    if kernel_accepts(kernel, call, args):
        return args, None
    if call.grouped:
        # Some kernels reject enable_gqa but take k/v repeated to Hq heads.
        repeated = Arguments(args.k, args.v, args.attn_mask, args.is_causal, False, args.dead)
        if kernel_accepts(kernel, call, repeated):
            return arguments(call, native_gqa=False), None
    return None, kernel_refusal(kernel, call, args)


# Rules that hold on every GPU, checked first so that the common refusals read plainly.
# Keyed by the kernel's name: dynamo's guard on a dict entry keyed by an SDPBackend raised
# InternalTorchDynamoError (its source text holds the enum's repr; torch 2.11 and 2.13).
_RULES: dict[str, tuple[tuple[torch.dtype, ...], str | None]] = {
    SDPBackend.FLASH_ATTENTION.name: (
        (torch.float16, torch.bfloat16),
        "takes no attn_mask: only no masking, or causal alone with Sq <= Skv (with a head "
        "dim that is a multiple of 8 where 1 < Sq < Skv; not inside torch.compile there)",
    ),
    SDPBackend.EFFICIENT_ATTENTION.name: ((torch.float16, torch.bfloat16, torch.float32), None),
    SDPBackend.CUDNN_ATTENTION.name: ((torch.float16, torch.bfloat16), None),
}

# The kernels' own checks in this torch build; with debug=True they warn their reasons.
_CHECKS = {
    SDPBackend.FLASH_ATTENTION.name: torch.backends.cuda.can_use_flash_attention,
    SDPBackend.EFFICIENT_ATTENTION.name: torch.backends.cuda.can_use_efficient_attention,
    SDPBackend.CUDNN_ATTENTION.name: torch.backends.cuda.can_use_cudnn_attention,
}


def _check_params(call: AttentionCall, args: Arguments) -> torch.backends.cuda.SDPAParams:
    k, v = args.k, args.v
    if k.shape[1] != call.heads_q and not args.enable_gqa:
        # The check reads only shapes, dtypes and strides: stand in for k/v repeated to Hq
        # heads with zero-stride views instead of copying them.
        rows = (call.batch, call.heads_q, call.seq_kv)
        k = k.as_strided((*rows, call.head_dim), (0, 0, 0, 1))
        v = v.as_strided((*rows, call.head_dim_v), (0, 0, 0, 1))
    return torch.backends.cuda.SDPAParams(
        call.q, k, v, args.attn_mask, call.dropout_p, args.is_causal, args.enable_gqa
    )


def kernel_accepts(kernel: SDPBackend, call: AttentionCall, args: Arguments) -> bool:
    """Whether `kernel`'s own check accepts these arguments (quietly)."""
    return bool(_CHECKS[kernel.name](_check_params(call, args), debug=False))


def kernel_refusal(kernel: SDPBackend, call: AttentionCall, args: Arguments) -> str | None:
    """The reasons `kernel`'s own check gives for refusing these arguments (asked after
    kernel_accepts said no), or None where it accepts them after all."""
    params = _check_params(call, args)
    cpp: list[str] = []
    with warnings.catch_warnings(record=True) as caught, _cpp_warnings(cpp):
        warnings.simplefilter("always")
        ok = _CHECKS[kernel.name](params, debug=True)
    if ok:
        return None
    reasons = "; ".join(dict.fromkeys([*(str(w.message).strip() for w in caught), *cpp]))
    return reasons or f"{kernel.name} rejects this call"


# A C++ warning as c10 prints it: "[W1130 13:05:31.58 sdp_utils.cpp:555] Warning: cudnn SDPA
# does not support key/value sequence length 1. (function operator())"
_CPP_WARNING = re.compile(r"^\[W[^]]*\] Warning: (.*?)(?: \(function .*\))?$")
_STDERR = threading.Lock()


@contextlib.contextmanager
def _cpp_warnings(into: list[str]) -> Iterator[None]:
    """Collects into `into` the C++ warnings that the block writes to the process's stderr
    (file descriptor 2), and writes the other lines back. The kernels' checks give their
    reasons as such warnings, not as Python ones (torch 2.11 on an H200: run 56's random
    calls logged them on stderr, and every refusal by a kernel's own check read only
    "rejects this call"), and a check that warns once would stay silent the next time, so
    warn-always is on inside the block."""
    with _STDERR, tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to capture: the reasons go unread
            yield
            return
        always = torch.is_warn_always_enabled()
        torch.set_warn_always(True)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:  # even if the block raised: other threads' lines are written back
            os.dup2(saved, 2)
            os.close(saved)
            torch.set_warn_always(always)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                found = _CPP_WARNING.match(line)
                if found:
                    into.append(found.group(1).strip())
                elif line:
                    os.write(2, (line + "\n").encode())


def planned(kernel: SDPBackend | None, call: AttentionCall) -> tuple[Arguments | None, str | None]:
    """plan(kernel, call), made once per call and kernel: attention() asks a pinned
    backend's `supports` and then runs it, and both need the explicit mask and PyTorch's
    kernel check."""
    key = ("sdpa plan", kernel)
    if key not in call.memo:
        call.memo[key] = plan(kernel, call)
    return call.memo[key]  # type: ignore[return-value]


def run_plan(kernel: SDPBackend | None, call: AttentionCall) -> Result:
    if call.batch > GRID_ROWS and call.device.type == "cuda":
        # The flash and cuDNN kernels lay the batch along a grid dimension: past GRID_ROWS,
        # cuDNN's graph failed to execute (from batch 65536) and the flash kernel to launch
        # ("invalid argument", batch 65537), forward and backward (H200, torch 2.11, run
        # 55: benchmarks/results/h200-logs/cudnn-batch-run55.log). Batch * heads of
        # 131072 ran. The efficient kernel ran any batch, but the pieces keep each kernel.
        return in_batch_pieces(call, GRID_ROWS, partial(run_plan, kernel))
    args, reason = planned(kernel, call)
    if args is None:
        raise AssertionError(f"sdpa run on a call it refuses: {reason}")
    q, scale = positive_scale(call)
    if args.bottom_right:
        # The op's is_causal is aligned to the bottom right, and it takes grouped k/v as
        # they are. Its output is (B, Hq, Sq, Dv) over SDPA's (B, Sq, Hq, Dv) layout.
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, args.k, args.v, call.dropout_p, is_causal=True, scale=scale
        )[0]
        return out, None
    sdpa = partial(
        F.scaled_dot_product_attention,
        q,
        args.k,
        args.v,
        attn_mask=args.attn_mask,
        dropout_p=call.dropout_p,
        is_causal=args.is_causal,
        scale=scale,
        enable_gqa=args.enable_gqa,
    )
    if kernel is None and call.carries_tangents:
        with sdpa_kernel(SDPBackend.MATH):  # the one kernel with a forward-mode derivative
            out = sdpa()
    elif kernel is None and cudnn_masked_grad(call, args):
        with sdpa_kernel(_NOT_CUDNN):
            out = sdpa()
    elif kernel is None:
        out = sdpa()  # (B, Hq, Sq, Dv)
    else:
        with sdpa_kernel(kernel):
            out = sdpa()
    if args.dead is not None:
        out = torch.where(args.dead, 0.0, out)  # not masked_fill (module docstring)
    return out, None


def refusal(kernel: SDPBackend | None, call: AttentionCall) -> str | None:
    if kernel is None or kernel == SDPBackend.MATH:
        return NO_LSE if call.return_lse else None
    if call.carries_tangents:  # PyTorch's fused kernels raise NotImplementedError there
        return NO_FORWARD_AD
    # A fused kernel's check needs the real arguments, mask included: `planned` keeps
    # them for run() on the same call.
    return planned(kernel, call)[1]


def chosen_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernel plain SDPA picks on `device` for an unmasked (1, 8, 1024, 64) call, or
    None where this torch cannot say (the chooser is private API)."""
    try:
        q = torch.zeros((1, 8, 1024, 64), device=device, dtype=dtype)
        return SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None


def backend(name: str, kernel: SDPBackend | None, summary: str) -> Backend:
    return Backend(
        name=name,
        summary=summary,
        available=always_available if kernel in (None, SDPBackend.MATH) else cuda_only,
        supports=partial(refusal, kernel),
        run=partial(run_plan, kernel),
    )


BACKENDS = [
    backend("sdpa", None, "F.scaled_dot_product_attention, PyTorch picks the kernel"),
    backend("sdpa_flash", SDPBackend.FLASH_ATTENTION, "SDPA pinned to FlashAttention-2 (CUDA)"),
    backend(
        "sdpa_efficient",
        SDPBackend.EFFICIENT_ATTENTION,
        "SDPA pinned to the memory-efficient (xFormers) kernel (CUDA)",
    ),
    backend("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, "SDPA pinned to cuDNN attention (CUDA)"),
    backend("sdpa_math", SDPBackend.MATH, "SDPA pinned to its math (unfused) path; any device"),
]
