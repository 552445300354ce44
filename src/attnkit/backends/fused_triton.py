"""`triton`: fused FlashAttention-2 style forward and backward kernels written in Triton.

Forward: one program per (query block, batch * query head) walks the key blocks it can
see with an online softmax, so nothing of size Sq x Skv is ever stored. A call with too
few query rows to occupy the GPU (decoding against a cache) splits the keys into ranges,
each with its own programs, and merges their partial outs by their score maxima and sums
of exponentials (`_kv_splits`). With
fewer query rows than a tile holds and grouped heads, one program takes the rows of
every query head of a kv group instead, so that each K/V tile is loaded once for the
group (`_packs_group`).
Backward: one program per (query block, batch * query head) accumulates dQ, and first
stores its rows' delta = rowsum(dO * O); then one program per (key block, batch * kv
head) accumulates dK, dV over the query blocks of every query head of its group
(deterministic, no atomics). On Hopper and newer, the forward can load its K/V tiles
through TMA descriptors, where their layout allows and the autotuner finds it faster
(long sequences). On Hopper, long calls with heads of 40 to 256 (multiples of 8, on tiles
of 64, 128 or 256 columns: `_tile_head_dim`) take a forward written in Gluon instead
(`hopper_forward`: the softmax overlaps the matmuls; `_uses_hopper_forward` says which
calls), and backward kernels written in Gluon (`hopper_backward`, the same layout:
`_uses_hopper_backward`).

Visibility is `attnkit.masks` re-stated in index arithmetic: query i (position
i + off, off = Skv - Sq) sees key j when j < kv_len, and i + off - left <= j <= i + off
+ right (causal makes right = min(right, 0)); a bool mask hides, a floating mask is
added. Key blocks that no query of a block can see are outside the loop bounds; key
blocks that every query of a block sees skip the index arithmetic.

Host side: after a key's first launch the autotuner's pick is remembered (`_CHOSEN`), and
after a specialization's first launch its compiled kernel is launched directly
(`_launch_jitted`), so repeated calls skip Triton's per-launch argument handling; the
scalars and flags of a call signature are worked out once (`_meta`). The autotuner's
candidates are narrowed per head dim where an H100 sweep found some of them losing
(`_SWEPT`, on sm_90 GPUs only); of the tiles that each hold a whole problem, only the
smallest is kept (`_one_tile`), so that tiny shapes compile one config, not every one.
A round of candidates is built at once, on threads, before the autotuner times them one
by one, and a round of one candidate is not timed (`_timed`); so are the builds' C
launchers, which Triton 3.6 compiles at a kernel's first launch (`_build_launchers`). A
first forward that a backward will follow builds the backward's kernels with its own
(`_backward_builds`, from launches foreseen with stand-in tensors: `_stand_in_backward`),
and a first backward whose two kernels each have one candidate builds both at once
(`_build_lone_rounds`).

Triton is optional: without it `import attnkit` still works and this backend reports
itself unavailable.
"""

import concurrent.futures
import dataclasses
import functools
import inspect
import math
import os
import re
import threading
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.backends import dropout_mask, hopper_backward, hopper_forward
from attnkit.backends.base import (
    GRID_ROWS,
    NO_FORWARD_AD,
    Backend,
    Result,
    forbid_second_derivative,
    in_batch_pieces,
)
from attnkit.call import AttentionCall

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below still parse; available() says triton is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# ---------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages), re-tuned per head dim,
# causal-or-not, dropout-or-not, power-of-two sequence bucket and amount of work
# (ROWS_BUCKET: without it a choice made on a small shape, kept in Triton's on-disk cache,
# served large ones too). Dropout's Philox work changes which tile wins, and a tile picked
# without it need not even build with it (ptxas 12.8, Triton 3.6, crashed on D=64 TMA
# forward tiles with dropout until dropout_mask.seed_value read the seed once per
# program, run 33; the autotuner would skip such a tile, a pick launched directly would
# raise).
# Each list holds the configs that won somewhere in the H100 sweep
# (benchmarks/triton_configs.py, results in benchmarks/NOTES.md). BLOCK_M tiles queries
# and BLOCK_N keys in every kernel; dK/dV keeps a key tile and streams query tiles, dQ
# the other way round, so they want different shapes. The forward also tries
# _FWD_TMA_CONFIGS with its K/V tiles loaded through TMA, where the tensors allow it
# (TMA_OK): on the H100 that won at long sequences and lost at short ones. dQ streams
# K/V tiles too, but through TMA under Triton 3.6 it compiled or ran pathologically
# slowly (NOTES, run 7), so it keeps pointer loads.
# Under the interpreter one small fixed config runs instead (tuning there is slow and
# means nothing).
# ---------------------------------------------------------------------------------------
_FWD_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
_FWD_TMA_CONFIGS = [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)]
_DKDV_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 3)]
_DQ_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 4)]
_TUNE_KEY = ["HEAD_D", "HEAD_DV", "WINDOWED", "DROPOUT", "SEQ_BUCKET", "ROWS_BUCKET"]
_KEYS_BITS = 15  # SEQ_BUCKET = (query bucket << _KEYS_BITS) + key bucket (_seq_bucket)
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}


def _seq_bucket(queries: int, keys: int) -> int:
    """(query bucket, key bucket) -> SEQ_BUCKET, one of the autotuner's key arguments."""
    return (queries << _KEYS_BITS) + keys


def _length_bucket(queries: int, keys: int) -> int:
    """SEQ_BUCKET of a launch over `queries` rows and `keys` keys: each a power of two,
    capped at 16k (_work_out_meta says why)."""
    return _seq_bucket(min(_pow2(queries), 2**14), min(_pow2(keys), 2**14))


def _split_bucket(seq_bucket: int) -> tuple[int, int]:
    """SEQ_BUCKET -> (query bucket, key bucket)."""
    return seq_bucket >> _KEYS_BITS, seq_bucket & ((1 << _KEYS_BITS) - 1)


# Configs taken out by head dim where the H100 sweep (benchmarks/triton_configs.py, NOTES
# run 10) found them losing and the autotuner still picked them now and then: its timings
# of candidates a few % apart move with the GPU's clock. Heads of 97..128: the whole
# backward ran 3-9% faster with dQ (128, 64, 8, 3) than (64, 64, 4, 2) at 4k, 16k and 8k
# causal; dK/dV (64, 64, 4, 2) was 4-10% faster than (64, 128, 8, 3) without a window and
# 9% slower with one. The forward's (128, 64, 4, 3) and (64, 128, 4, 3) through TMA won
# at D=64 from S=2k on (full and causal) and lost by 10-20% at D=128, so they are offered
# to heads of <= 64 with at least 2k keys only (fewer candidates, shorter cold starts).
# Each entry: (head dim, windowed, keys) -> the tiles taken out.
_SWEPT = {
    "fwd": lambda d, windowed, keys: ([(128, 64, 4, 3), (64, 128, 4, 3)]
                                      if d > 64 or keys < 2048 else []),
    "dq": lambda d, windowed, keys: ([(64, 64, 4, 2), (128, 32, 4, 4)]
                                     if 96 < d <= 128 else []),
    "dkdv": lambda d, windowed, keys: ([] if not 96 < d <= 128 else
                                       [(32, 64, 4, 2), (64, 64, 4, 2)] if windowed else
                                       [(32, 64, 4, 2), (64, 128, 8, 3)]),
}


# The sweep behind _SWEPT ran on an H100; other GPUs autotune over every tile, and the
# autotuner passes over those that do not fit. On sm_86 and sm_89 (99 KB of shared memory
# a block) the one tile _SWEPT leaves D=97..128 dQ, (128, 64, 8, 3), needs 128 KB, and
# the one it leaves windowed dK/dV, (64, 128, 8, 3), 129 KB (`benchmarks/
# triton_registers.py --arch 86 --head-dim 128`, Triton 3.6): their backward would fail.
_SWEPT_ON = (9, 0)


def _swept_here(device: torch.device) -> bool:
    """Whether `device` is a GPU of the kind _SWEPT was measured on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == _SWEPT_ON


def _tiles(config) -> tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


def _prune(configs, named_args, kernel: str | None = None, jitted=None, **kwargs):
    """The candidates for these arguments: TMA ones only where TMA_OK, the measured
    winners of _SWEPT for `kernel` (the losers, by head dim, taken out; not with
    dropout, and only on the kind of GPU the sweep ran on: Q's device), small tiles
    for heads wider than 128 (one alone for a forward of few rows: _WIDE_DECODE_ROWS;
    else beside dQ's own tile and the forward's), and of the tiles that hold the whole
    problem, the smallest alone (_one_tile). With `jitted` (the kernel), they are left
    for _timed to build at once if the autotuner goes on to time them."""
    args = {**named_args, **kwargs}
    kept = _one_tile(_by_head(configs, args, kernel), args)
    if kernel == "fwd":
        kept = _shortest_tiles(kept, args)
    _AHEAD.pending = None if jitted is None else (jitted, named_args, kwargs, kept)
    return kept


def _by_head(configs, args: dict, kernel: str | None):
    if not args.get("TMA_OK", False):
        configs = [c for c in configs if not c.kwargs.get("TMA", False)]
    head = max(args["HEAD_D"], args["HEAD_DV"])
    if head <= _WIDE_HEAD:
        # The sweep ran without dropout, whose random bits push dK/dV (64, 64, 4, 2) at
        # D=128 to 136 bytes of spills where (32, 64, 4, 2) spills 16 (benchmarks/
        # triton_registers.py --dropout, run 35): with dropout the autotuner keeps every
        # tile.
        q = args.get("Q")
        if (kernel is None or args.get("DROPOUT", False) or not isinstance(q, Tensor)
                or not _swept_here(q.device)):
            return configs
        _, keys = _split_bucket(args["SEQ_BUCKET"])
        losers = _SWEPT[kernel](head, bool(args["WINDOWED"]), keys)
        kept = [c for c in configs if _tiles(c) not in losers]
        return kept or configs
    # Wider heads leave shared memory for shallow pipelines only: small tiles, and one
    # 8-warp tile each for dQ and the forward.
    pointers = {"TMA": False} if "TMA" in configs[0].kwargs else {}
    if kernel == "fwd" and _program_rows(args) <= _WIDE_DECODE_ROWS:
        return _tile_configs([_WIDE_DECODE_TILE], pointers)
    own = {"dq": [_WIDE_DQ_TILE], "fwd": [_WIDE_FWD_TILE]}.get(kernel, [])
    # The forward's configs name TMA: its own tile loads through TMA wherever allowed.
    tma = {"TMA": bool(args.get("TMA_OK"))} if pointers else {}
    return _tile_configs(_WIDE_TILES, pointers) + _tile_configs(own, tma)


def _tile_configs(tiles: list[tuple[int, int, int, int]], meta: dict) -> list:
    """triton.Configs of (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles, with meta."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **meta}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# Heads wider than this take tiles of their own (_by_head), and `auto`'s rule for one-row
# steps (_leads_a_wide_step).
_WIDE_HEAD = 128

# The forward's one tile for heads wider than 128 where a program has at most this many
# query rows (decoding, packed or not): (16, 32, 4, 3), 168 registers and 73 KB of shared
# memory on sm_90 (Triton 3.6), three programs a multiprocessor, where _by_head's pair
# spends 220-255 registers (and spills) on rows that are mostly empty. On an H200 at
# D=256 (16/8 and 32/16 heads, 4k-32k keys, one query or 16), at _kv_splits' count, it ran
# in 0.50-0.95x the time of the autotuner's pick from the pair (b8 h16/8 against 8k keys
# 216.6 -> 129.1 us, b1 51.1 -> 25.6) and within 2% of the fastest of seven tiles on
# each of seven shapes (NOTES run 58, benchmarks/results/h200-logs/decode-tiles-run58.log).
_WIDE_DECODE_ROWS = 32
_WIDE_DECODE_TILE = (16, 32, 4, 3)
# The tiles every kernel tries for heads wider than 128, but the forward of few rows.
# In dK/dV, whose matmuls run over its key tile's rows, 32 keys build to mma.sync, not
# wgmma (a warpgroup's needs 64 rows); its tiles of 64 keys, which do build to wgmma,
# spill and ran at 0.43-0.94x the backward's rate on an H200 at D=256, (64, 64, 8, 2)
# the nearest (NOTES run 59, h200-logs/wide-bwd2-run59.log). On Hopper, D=256 runs dK/dV
# on hopper_backward.wide_dkdv_kernel instead (_HOPPER_DKDV_REACH), whose two warpgroups
# hold dK and dV apart.
_WIDE_TILES = [(64, 32, 4, 2), (32, 32, 4, 1)]

# The dQ kernel for heads wider than 128 also tries (128, 32, 8, 2): two warpgroups of 64
# rows, 220-255 registers (by the call's features; a few bytes of spills with key
# lengths, a mask and dropout at once) and 192-196 KB of shared memory on sm_90, one
# program a multiprocessor.
# On an H200 at D=256 (b2 h16 4k causal and full, b8 1k, b1 8k causal) the backward ran
# in 0.88-0.93x the time it took with the pair's (64, 32, 4, 2), which spills 32 bytes
# (NOTES run 58, h200-logs/wide-prefill-run58.log). None of the dK/dV kernel's 8-warp
# tiles beat the pair there, nor did the forward's that run 58 tried (_WIDE_FWD_TILE,
# below, was not among them). On Hopper, D=256 calls from 256 queries and keys take
# hopper_backward's dQ kernel instead (_HOPPER_DQ_REACH).
_WIDE_DQ_TILE = (128, 32, 8, 2)

# The forward for heads wider than 128 also tries (128, 64, 8, 2), two warpgroups of 64
# rows, 197 KB of shared memory on sm_90 (Triton 3.6), one program a multiprocessor;
# K and V through TMA where the tensors allow it (TMA_OK), which leaves it 227-232
# registers and no spills without a mask tensor or dropout (16-208 bytes of spills with
# them), against 255 registers by pointers.
# On an H200 (D=256: b2 h16 4k causal and full, b2 h16/4 4k causal, b8 1k, b1 8k causal;
# D=192: b2 4k) it ran at 1.14-1.32x the pair's (64, 32, 4, 2) rate, 484-516 TFLOP/s
# against 386-414 from 4k at D=256, and by pointers at 0.97-1.01x its rate through TMA
# (NOTES run 59, h200-logs/wide-tma-run59.log and wide-tma-after-run59.log). On Hopper,
# D=256 calls from 256 queries and keys take the Gluon forward instead (_HOPPER_ROUTES).
_WIDE_FWD_TILE = (128, 64, 8, 2)


def _one_tile(configs, args: dict):
    """configs less those of the tiles that hold the whole (query bucket x key bucket)
    problem, but the smallest of them. Each of those runs one program per (batch, head)
    and one step of its loop, so the smallest does the least of the same work (fewest
    warps, stages and no TMA as ties go); the rest would each cost the autotuner a
    compile, about a second, on shapes (17 x 17) that run in microseconds. Tiles that
    split the problem stay: more programs may finish sooner."""
    queries, keys = _program_rows(args), _split_bucket(args["SEQ_BUCKET"])[1]
    whole = [c for c in configs
             if c.kwargs["BLOCK_M"] >= queries and c.kwargs["BLOCK_N"] >= keys]
    if len(whole) < 2:
        return configs
    smallest = min(whole, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                         c.kwargs.get("TMA", False), c.num_warps,
                                         c.num_stages))
    dropped = {id(c) for c in whole if c is not smallest}
    return [c for c in configs if id(c) not in dropped]


def _program_rows(args: dict) -> int:
    """The query rows one forward program's tile runs over, as the tuning key buckets them:
    the query bucket, which _forward takes of Sq x group where it packs a group's heads."""
    queries, _ = _split_bucket(args["SEQ_BUCKET"])
    return queries


def _shortest_tiles(configs, args: dict):
    """The forward's candidates less those whose BLOCK_M is taller than the shortest that
    holds a program's rows (_program_rows): a taller tile runs the same rows and leaves
    the rest idle. On an H200, decoding steps (4 to 64 packed rows against 4k-16k keys)
    ran (64, 64, 4, 3) in 0.77-0.88x the time of (128, 128, 8, 3) at the same key ranges,
    and the autotuner, timing candidates ~10 us long, picked the taller tile in some
    processes and not in others (run 56). Heads wider than 128 lose nothing here: _by_head
    gives them one 16-row tile for up to _WIDE_DECODE_ROWS rows, and past that its pair,
    no taller than 64, beside the forward's own of 128 rows, which this leaves out up to
    64 rows."""
    rows = _program_rows(args)
    holding = [c.kwargs["BLOCK_M"] for c in configs if c.kwargs["BLOCK_M"] >= rows]
    if not holding:
        return configs
    shortest = min(holding)
    return [c for c in configs if c.kwargs["BLOCK_M"] <= shortest]


# The autotuner builds its candidates one at a time, as it times each, and a build takes
# about a second, most of it outside the GIL (ptxas and LLVM: 9 builds took 9.7 s in one
# thread and 5.7 s in two on a 2-core machine, Triton 3.6). So when it starts timing a
# round of candidates, _timed first builds them all at once, on threads, through Triton's
# AsyncCompileMode. _prune, which the autotuner calls just before a round (and also when
# the round's result is on disk, when no timing follows), leaves the round's candidates
# here, per thread.
_AHEAD = threading.local()
_AHEAD_THREADS = 8


def _timed(kernel_call, quantiles):
    """The autotuner's timing of one candidate (Triton's benchmarker); the first timing
    of a round builds the round's candidates at once first (_build_ahead), with the
    builds that ride along with it (_launch's riders, worked out here: a round served
    from disk is not timed and needs none). A round of one candidate is not timed: there
    is nothing to choose, and the autotuner's launch that follows builds it (here too,
    where riders come with it, so that they build at the same time)."""
    pending, _AHEAD.pending = getattr(_AHEAD, "pending", None), None
    riders, _AHEAD.riders = getattr(_AHEAD, "riders", None), None
    if pending is not None:
        jitted, named_args, kwargs, configs = pending
        riders = riders() if riders is not None else []
        if len(configs) > 1 or riders:
            _build_ahead(_candidate_builds(jitted, named_args, kwargs, configs) + riders)
        if len(configs) == 1:  # Triton times even a lone candidate, ~125 ms of reps
            return [0.0] * len(quantiles)
    rep = _timing_ms(_run_ms(kernel_call))
    return triton.runtime.driver.active.get_benchmarker()(
        kernel_call, quantiles=quantiles, warmup=rep / 4, rep=rep)


# Triton's benchmarker warms up for 25 ms and then times for 100 ms, whatever one run
# costs: ~125 ms a candidate, thousands of runs where a small call's candidate runs in
# microseconds (its launches then take longer than its kernel: host-bound): on an H200 the
# six candidates of a 100 x 100 call's first backward took 0.65-0.78 s with nothing to
# build, 0.05 s timed as here (first_calls.py, NOTES run 47). A candidate is timed for about
# _TIMED_RUNS runs instead, within [_TIMING_MS_MIN, 100] ms, which leaves a run of 5 ms
# or more its 100 ms, as before.
_TIMED_RUNS = 20
_TIMING_MS_MIN = 5.0


def _timing_ms(run_ms: float) -> float:
    """How long to time a candidate one run of which took run_ms (warm-up: a quarter)."""
    return min(100.0, max(_TIMING_MS_MIN, _TIMED_RUNS * run_ms))


def _run_ms(kernel_call) -> float:
    """One warm run of kernel_call, milliseconds by CUDA events (after one untimed run)."""
    kernel_call()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    kernel_call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _build_ahead(builds: list[tuple]) -> None:
    """Builds each (kernel, a launch's arguments, its keywords: the grid, then the
    constexprs and options in the order the launch gives them) on threads, into the
    kernel's own cache, where the launches then find them (Triton's in-memory cache keys a
    kernel by the text of its options, order and all). A build that fails is left out
    here: the launch builds it again and meets the error itself (the autotuner passes over
    the config, a Gluon kernel falls back to Triton's) as it always did."""
    threads = min(len(builds), os.cpu_count() or 1, _AHEAD_THREADS)
    if threads < 2 or not hasattr(triton, "AsyncCompileMode"):
        return
    try:
        with (concurrent.futures.ThreadPoolExecutor(threads) as pool,
              triton.AsyncCompileMode(pool, ignore_errors=True)):
            built = []
            for jitted, args, keywords in builds:
                built.append(jitted.warmup(*args, **keywords))
    except Exception as exc:  # noqa: BLE001 - the launches build them one by one instead
        warnings.warn(f"attnkit: building kernels at once failed ({exc}); they are built "
                      "one by one as they launch", RuntimeWarning, stacklevel=2)
        return
    _build_launchers(built, threads)


def _build_launchers(built: list, threads: int) -> None:
    """Builds on threads the launchers of the kernels that _build_ahead built (what
    warmup returned: compiled kernels, or AsyncCompileMode's futures of them, built), one
    per kernel and argument types. Triton 3.6 writes each launcher in C for its kernel's
    argument types and compiles it with the system's C compiler at the kernel's first
    launch, in the launching thread: one after the other, about a second each, on the
    H200's host (NOTES, run 46). Built here, they go into Triton's cache, from which the
    launches load them. A launcher that fails to build here is left to the launch;
    Triton 3.9's launchers compile nothing, and building one here costs next to nothing."""
    kernels = {}
    for kernel in built:
        kernel = getattr(kernel, "kernel", kernel)  # an AsyncCompileMode future's, if built
        signature = getattr(getattr(kernel, "src", None), "signature", None)
        if signature is not None and hasattr(kernel, "metadata"):
            kernels.setdefault((kernel.src.fn, repr(signature)), kernel)
    make = kernels and getattr(triton.runtime.driver.active, "launcher_cls", None)
    if not make:
        return

    def build(kernel) -> None:
        try:
            make(kernel.src, kernel.metadata)
        except Exception:  # noqa: BLE001, S110 - the kernel's first launch builds it again
            pass

    with concurrent.futures.ThreadPoolExecutor(min(threads, len(kernels))) as pool:
        list(pool.map(build, kernels.values()))


def _candidate_builds(jitted, named_args: dict, kwargs: dict, configs) -> list[tuple]:
    """The builds (as _build_ahead takes them) of an autotuned kernel's candidates
    `configs`, for a launch with these arguments and keywords (the autotuner's, with
    its grid), with the keywords in the order the autotuner's launches give them."""
    flags = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    return [(jitted, tuple(named_args.values()),
             {"grid": kwargs.get("grid", (1,)), **flags, **config.all_kwargs()})
            for config in configs]


def _untuned_builds(*launches: tuple, lone_only: bool) -> list[tuple]:
    """The builds (as _build_ahead takes them) of the candidates that _prune leaves each
    autotuned launch (kernel, grid, args, flags, tune_key) not tuned yet; lone_only: of
    those launches left one candidate only."""
    builds = []
    for kernel, grid, args, flags, tune_key in launches:
        if not isinstance(kernel, triton.runtime.Autotuner) or (kernel, tune_key) in _CHOSEN:
            continue
        named = dict(zip(kernel.arg_names, args, strict=False))  # arg_names has constexprs too
        kept = kernel.early_config_prune(kernel.configs, named, grid=grid, warmup=False,
                                         **flags)
        if len(kept) == 1 or not lone_only:
            builds += _candidate_builds(kernel.fn, named, {"grid": grid, **flags}, kept)
    _AHEAD.pending = None  # what _prune left is for no round
    return builds


def _build_lone_rounds(*launches: tuple) -> None:
    """For autotuned launches (kernel, grid, args, flags, tune_key) about to run one after
    the other: those not tuned yet that have one candidate left (_prune; tiny shapes) are
    built at once (_build_ahead), where each of their rounds would build its one in turn.
    Rounds of several candidates are left to build theirs at once themselves (_timed)."""
    _build_ahead(_untuned_builds(*launches, lone_only=True))


def _tuned(kernel: str, configs, key=_TUNE_KEY, tma_configs=None):
    """Autotune over configs; with tma_configs (the forward), those with TMA = True and
    configs with TMA = False. kernel names the kernel in _SWEPT."""
    if triton is None or _INTERPRET:
        return lambda fn: fn
    variants = [(configs, {})] if tma_configs is None else [
        (configs, {"TMA": False}), (tma_configs, {"TMA": True})]
    # Triton >= 3.2 can keep each key's tuning result in its on-disk cache, so a second
    # process skips the benchmarking and starts with the chosen config.
    on_disk = {"cache_results": True} if _accepts(triton.autotune, "cache_results") else {}
    ahead = _accepts(triton.autotune, "do_bench")

    def tune(jitted):
        return triton.autotune(
            [config for tiles, meta in variants for config in _tile_configs(tiles, meta)],
            key=key,
            prune_configs_by={"early_config_prune": functools.partial(
                _prune, kernel=kernel, jitted=jitted if ahead else None)},
            **({"do_bench": _timed} if ahead else {}),
            **on_disk,
        )(jitted)

    return tune


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def _kernel(fn):
    """triton.jit for the three launched kernels. The dropout seed is drawn anew for every
    call, and Triton specializes an int on its value (1, multiples of 16): one call in
    sixteen would compile the kernels again, seconds of stall, for no gain."""
    return fn if triton is None else triton.jit(fn, do_not_specialize=["seed"])


# ---------------------------------------------------------------------------------------
# Shared pieces: which program takes which tile, which (query, key) pairs are visible, and
# the user mask.
# qi and kj are index tensors that broadcast against each other ((M, 1) and (1, N), or
# transposed), so the same helpers serve the forward and both backward orientations.
# ---------------------------------------------------------------------------------------
@_jit
def _program_tile(HEAVIEST_LAST: tl.constexpr, HEAD_GROUP: tl.constexpr):
    """(tile along the sequence, row group: (batch, head)) of this program, on a grid of
    (tiles, row groups[, splits]). Under a causal mask a head's tiles differ in work by up
    to its number of tiles; started head by head, the last head's heaviest tile starts
    near the end and the GPU finishes on it alone (6-7% of a causal 4k backward, by a
    simulation of the schedule, NOTES run 21). So the programs go HEAD_GROUP heads at a
    time, and within a group every head's heaviest tile first: the last group's light
    tiles are the tail. Without a causal mask the tiles are alike and HEAD_GROUP is 1,
    head by head, so that the programs running at once share fewer heads' K/V (or Q/dO)
    in L2."""
    n_tiles = tl.num_programs(0)
    if HEAD_GROUP == 1:
        tile = tl.program_id(0)
        head = tl.program_id(1)
    else:
        pid = tl.program_id(1) * n_tiles + tl.program_id(0)  # the order programs start in
        first = pid // (HEAD_GROUP * n_tiles) * HEAD_GROUP
        heads = tl.minimum(tl.num_programs(1) - first, HEAD_GROUP)
        within = pid - first * n_tiles
        tile = within // heads
        head = first + within % heads
    if HEAVIEST_LAST:
        tile = n_tiles - 1 - tile
    return tile, head


@_jit
def _visible(qi, kj, kv_len, off, left, right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    vis = kj < kv_len
    if HAS_RIGHT:
        vis = vis & (kj <= qi + off + right)
    if HAS_LEFT:
        vis = vis & (kj >= qi + off - left)
    return vis


@_jit
def _key_range(m0, m_last, kv_len, off, left, right, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key bounds lo <= full_lo <= full_hi <= hi for query rows m0..m_last: some row sees
    each key of [lo, hi), every row sees every key of the whole blocks in [full_lo,
    full_hi), whose loop skips the index checks. lo, full_lo and full_hi are multiples
    of BLOCK_N, so that key blocks stay aligned across the three loops."""
    lo = 0
    hi = kv_len
    full_lo = 0
    full_hi = kv_len
    if HAS_LEFT:
        lo = (tl.maximum(m0 + off - left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(m_last + off - left, 0)
        full_lo = tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    if HAS_RIGHT:
        hi = tl.minimum(m_last + off + right + 1, kv_len)
        full_hi = tl.maximum(tl.minimum(m0 + off + right + 1, kv_len), 0)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N * BLOCK_N, hi), full_lo)
    return lo, full_lo, full_hi, hi


@_jit
def _query_range(n0, n_last, Sq, kv_len, off, left, right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """_key_range turned round for the dK/dV kernel's key block n0..n_last (key j is seen
    by rows j - off - right .. j - off + left): query bounds lo <= full_lo <= full_hi
    <= hi, where every row of the whole blocks in [full_lo, full_hi) sees every key of
    the block."""
    lo = 0
    hi = Sq
    full_lo = 0
    full_hi = Sq
    if HAS_RIGHT:
        lo = (tl.maximum(n0 - off - right, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - off - right, 0)
        full_lo = tl.maximum((full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    if HAS_LEFT:
        hi = tl.minimum(n_last - off + left + 1, Sq)
        full_hi = tl.maximum(n0 - off + left + 1, 0) // BLOCK_M * BLOCK_M
    if n0 >= kv_len:
        hi = 0
    if n0 + BLOCK_N > kv_len:  # the block holds keys past kv_len: no query sees them all
        full_hi = 0
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@_jit
def _segment(part: tl.constexpr, lo, full_lo, full_hi, hi):
    """Bounds of segment `part` of a range split by _key_range or _query_range: 0 and 2
    are the ragged edges, 1 the whole blocks that need no index checks."""
    if part == 0:
        bounds = lo, full_lo
    elif part == 1:
        bounds = full_lo, full_hi
    else:
        bounds = full_hi, hi
    return bounds


@_jit
def _split_range(lo, full_lo, full_hi, hi, s0, s1):
    """_key_range's bounds cut to the split [s0, s1) of the keys. s0 and s1 are multiples
    of BLOCK_N, so no key block crosses into a neighbouring split, and the three segments
    keep their order and alignment: lo, full_lo and full_hi stay multiples of BLOCK_N (or
    equal hi), and the whole blocks stay within the whole blocks of the uncut range."""
    hi = tl.minimum(hi, s1)
    lo = tl.minimum(tl.maximum(lo, s0), hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@_jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a tile, masking only what may be out of range: a mask along the head dim that
    is all true when BLOCK_D == D would still cost the 16-byte vector loads."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@_jit
def _apply_mask(s, mask_base, qi, kj, stride_mm, stride_mn, Sq, Skv,
                MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr):
    """s (log2 units) with the user mask: bool hides (-inf), floating is added (x log2 e)."""
    if MASK_ROWS:
        ptrs = mask_base + qi * stride_mm + kj * stride_mn
        inb = (qi < Sq) & (kj < Skv)
    else:  # (B|1, Hq|1, 1, Skv): one row of the mask per key block, broadcast over queries
        ptrs = mask_base + kj * stride_mn
        inb = kj < Skv
    if MASK_KIND == 1:
        allowed = tl.load(ptrs, mask=inb, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    else:
        bias = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        # An entry below masks.HIDDEN_BELOW (-3.4e38 / log2 e) overflows to -inf here, which
        # is how the contract's threshold was chosen: no pass over the mask is needed.
        s = s + bias * 1.4426950408889634
    return s


@_jit
def _hide(s, mask_base, qi, kj, kv_len, off, left, right, stride_mm, stride_mn, Sq, Skv,
          MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
          MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Scores s (log2 units) with what each (qi, kj) pair may not see hidden: the index
    checks when MASKED, then the user mask."""
    if MASKED:
        s = tl.where(_visible(qi, kj, kv_len, off, left, right, HAS_LEFT, HAS_RIGHT),
                     s, float("-inf"))
    if MASK_KIND != 0:
        s = _apply_mask(s, mask_base, qi, kj, stride_mm, stride_mn, Sq, Skv, MASK_KIND,
                        MASK_ROWS)
    return s


@_jit
def _row_lse(lse_ptrs, row_ok):
    """The backward's per-row lse in log2 units. Dead rows (lse = -inf) and rows past Sq
    get +inf, which makes their p exactly 0."""
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@_jit
def _kv_sources(K, V, b, kvh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                Skv, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr):
    """The (batch, kv head)'s K and V: base pointers, or with TMA (Skv, D) tensor
    descriptors, whose loads fill what lies past Skv or D with zeros. The host checked
    what TMA needs (_tma_layout): unit stride along D, 16-byte alignment."""
    k_src = K + b * stride_kb + kvh * stride_kh
    v_src = V + b * stride_vb + kvh * stride_vh
    if TMA:
        k_src = tl.make_tensor_descriptor(k_src, [Skv, HEAD_D], [stride_kn, 1],
                                          [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_src, [Skv, HEAD_DV], [stride_vn, 1],
                                          [BLOCK_N, BLOCK_DV])
    return k_src, v_src


@_jit
def _kv_tiles(k_src, v_src, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_kd,
              stride_vn, stride_vd, Skv, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr):
    """The (BLOCK_N, D) tiles of K and V for keys offs_n = start_n + arange(BLOCK_N),
    from _kv_sources; MASKED: the block may reach past Skv."""
    if TMA:
        k = k_src.load([start_n, 0])
        v = v_src.load([start_n, 0])
    else:
        col_ok = offs_n[:, None] < Skv
        k = _load_tile(k_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       col_ok, offs_d[None, :] < HEAD_D, MASKED, HEAD_D != BLOCK_D)
        v = _load_tile(v_src + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                       col_ok, offs_dv[None, :] < HEAD_DV, MASKED, HEAD_DV != BLOCK_DV)
    return k, v


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@_jit
def _fwd_blocks(acc, m_i, l_i, q, k_src, v_src, mask_base, m0, qi, offs_d, offs_dv,
                start, end, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_mm, stride_mn, Sq, Skv, kv_len, off, left, right, qk_scale,
                seed, bh, drop_p,
                BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
                NEG_SCALE: tl.constexpr, TMA: tl.constexpr, PACKED: tl.constexpr):
    """Fold key blocks [start, end) into the running (acc, m_i, l_i); MASKED = index checks.
    k_src, v_src: from _kv_sources; qi: each row's query index, m0 the first's (the rows
    run on from it unless PACKED); mask_base and bh: scalars, or (BLOCK_M, 1) when the rows
    belong to several heads (PACKED)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(k_src, v_src, start_n, offs_n, offs_d, offs_dv, stride_kn,
                         stride_kd, stride_vn, stride_vd, Skv, HEAD_D, HEAD_DV, BLOCK_D,
                         BLOCK_DV, MASKED, TMA)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N), raw scores
        if MASKED or MASK_KIND != 0:
            s = _hide(qk * qk_scale, mask_base, qi[:, None], offs_n[None, :], kv_len,
                      off, left, right, stride_mm, stride_mn, Sq, Skv,
                      MASKED, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS)  # log2 units
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only hidden keys keeps max -inf; shifting by 0 keeps
            # exp at 0.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
        else:
            # Every key of the block is visible, so the row max is finite, and scaling
            # after the max lets scale and shift share one multiply-add per score.
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = m_new
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            if PACKED:
                keep = dropout_mask.keep_rows(seed, bh, qi, start_n, Sq, Skv, drop_p, BLOCK_N)
            else:
                keep = dropout_mask.keep(seed, bh, m0, qi.shape[0], start_n, Sq, Skv,
                                         drop_p, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@_tuned("fwd", _FWD_CONFIGS, _TUNE_KEY + ["TMA_OK", "SPLIT", "PACKED"], _FWD_TMA_CONFIGS)
@_kernel
def _fwd_kernel(Q, K, V, Out, LSE, MASK, LENGTHS,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                stride_mb, stride_mh, stride_mm, stride_mn,
                Hq, group, Sq, Skv, left, right, qk_scale, seed, drop_p,
                kv_split, stride_os, SEQ_BUCKET, ROWS_BUCKET,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WINDOWED: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr,
                DROPOUT: tl.constexpr, NEG_SCALE: tl.constexpr, HEAD_GROUP: tl.constexpr,
                TMA_OK: tl.constexpr, SPLIT: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """SPLIT: program_id(2) takes keys [pid * kv_split, (pid + 1) * kv_split) alone and
    writes its partial out (float32) at Out + pid * stride_os, and its rows' score max and
    sum of exponentials into LSE as _merge_kernel's MAX_SUM_P lays them out. PACKED:
    program_id(1) is (batch, kv head), and a tile's rows run over the group's query heads
    and their Sq queries, head-major, so that K/V tiles are loaded once for the whole group
    (calls with few query rows)."""
    tl.static_assert(TMA_OK or not TMA, "TMA loads where the host did not allow them")
    seed = dropout_mask.seed_value(seed, DROPOUT)
    # later query blocks see more keys under a causal mask: _program_tile starts them first
    pid_m, bh = _program_tile(HAS_RIGHT, HEAD_GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the program's rows of (b, h), or (b, kvh)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if PACKED:
        heads_kv = Hq // group
        b = (bh // heads_kv).to(tl.int64)
        kvh = (bh % heads_kv).to(tl.int64)
        row_span = group * Sq  # rows per program_id(1), and per (b, kvh) in LSE
        row_ok = rows < row_span
        # Rows past the group's last are clamped to it, so that every address they form
        # (Q, the mask) stays inside its tensor; they are never stored.
        row = tl.minimum(rows, row_span - 1)
        qi = row % Sq
        h = kvh * group + (row // Sq)[:, None]  # (BLOCK_M, 1): each row's query head
        m0 = tl.min(qi, 0)
        m_last = tl.max(qi, 0)
    else:
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        kvh = h // group  # grouped heads read their shared K/V head in place
        row_span = Sq
        row_ok = rows < Sq
        qi = rows
        m0 = pid_m * BLOCK_M
        m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    off = Skv - Sq
    kv_len = Skv
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), Skv)

    q_ptrs = Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qm \
        + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, row_ok[:, None], offs_d[None, :] < HEAD_D, not PACKED,
                   HEAD_D != BLOCK_D)
    k_src, v_src = _kv_sources(K, V, b, kvh, stride_kb, stride_kh, stride_kn, stride_vb,
                               stride_vh, stride_vn, Skv, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                               BLOCK_DV, TMA)
    mask_base = MASK + b * stride_mb + h * stride_mh
    bh_q = b * Hq + h  # (batch, query head), which the dropout stream is keyed on

    lo, full_lo, full_hi, hi = _key_range(m0, m_last, kv_len, off, left, right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    if SPLIT:
        split = tl.program_id(2)
        lo, full_lo, full_hi, hi = _split_range(lo, full_lo, full_hi, hi, split * kv_split,
                                                (split + 1) * kv_split)
        Out += split.to(tl.int64) * stride_os

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Three segments of the key range: index checks only on the ragged edges.
    for part in tl.static_range(3):
        start, end = _segment(part, lo, full_lo, full_hi, hi)
        acc, m_i, l_i = _fwd_blocks(
            acc, m_i, l_i, q, k_src, v_src, mask_base, m0, qi, offs_d, offs_dv,
            start, end, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mm, stride_mn, Sq, Skv, kv_len, off, left, right, qk_scale, seed, bh_q,
            drop_p, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, part != 1,
            HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS, DROPOUT, NEG_SCALE, TMA, PACKED)

    # A row that saw no key: l = 0, out = 0, lse = -inf.
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out / (1.0 - drop_p)
    o_ptrs = Out + b * stride_ob + h * stride_oh + qi[:, None] * stride_om \
        + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    first_row = bh.to(tl.int64) * row_span  # of this program's rows, among LSE's rows
    if SPLIT:
        # The max and the sum go to the merge apart: at a score max near -1e31 (a huge
        # finite mask) their float32 lse would no longer tell 512 keys from 488 (run 55).
        # Side by side, one store here and one load there: in two arrays the decoding
        # steps took 0.6 us longer (5%) on an H200 (run 56).
        first_row += split.to(tl.int64) * tl.num_programs(1) * row_span
        pair = tl.join(tl.where(dead, float("-inf"), m_i * 0.6931471805599453), l_i)
        tl.store(LSE + (first_row + rows[:, None]) * 2 + tl.arange(0, 2)[None, :], pair,
                 mask=row_ok[:, None])
    else:
        lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i)))
                       * 0.6931471805599453)
        tl.store(LSE + first_row + rows, lse, mask=row_ok)


@_jit
def _merge_kernel(OUT_P, MAX_SUM_P, Out, LSE, splits, Hq, Sq,
                  stride_ob, stride_oh, stride_om, stride_od,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query row's results of the key splits merged into its out and lse. OUT_P:
    contiguous (splits, B, Hq, Sq, Dv) float32, each split's normalized out_s; MAX_SUM_P:
    contiguous (splits, B * Hq * Sq, 2) float32, each split's score max m_s (natural log
    units, -inf where it saw no key) beside its sum of exp(s - m_s), l_s. With w_s =
    exp(m_s - max m) * l_s: out = sum w_s * out_s / sum w_s, lse = max m + log(sum w_s).
    A row that no split saw keeps out 0, lse -inf."""
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Sq + m
    rows = tl.num_programs(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < splits
    pair = tl.load(MAX_SUM_P + (offs_s[:, None] * rows + row) * 2 + tl.arange(0, 2)[None, :],
                   mask=split_ok[:, None], other=0.0)
    max_s, sum_s = tl.split(pair)
    max_s = tl.where(split_ok, max_s, float("-inf"))
    top = tl.max(max_s, 0)
    seen = top != float("-inf")
    # 0 for a split that saw no key
    weights = tl.exp(max_s - tl.where(seen, top, 0.0)) * sum_s
    total = tl.where(seen, tl.sum(weights, 0), 1.0)
    parts = tl.load(OUT_P + (offs_s[:, None] * rows + row) * HEAD_DV + offs_dv[None, :],
                    mask=split_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / total
    bh = row // Sq
    m = row % Sq
    tl.store(Out + (bh // Hq) * stride_ob + (bh % Hq) * stride_oh + m * stride_om
             + offs_dv * stride_od, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DV)
    tl.store(LSE + row, tl.where(seen, top + tl.log(total), float("-inf")))


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@_jit
def _dkdv_blocks(dk, dv, k, v, q_first, do_first, lse_first, delta_first, mask_first,
                 n0, offs_n, offs_d, offs_dv, start, end, heads, bh_first,
                 stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                 stride_mh, stride_mm, stride_mn,
                 Sq, Skv, kv_len, off, left, right, qk_scale, seed, drop_p,
                 BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
                 GROUPED: tl.constexpr):
    """Add query blocks [start, end) of `heads` query heads (from the *_first ones on) into
    the key block's (dk, dv). One flat loop over (head, query block) pairs: a head loop
    around the block loops costs registers (sm_90, D=128: spills, benchmarks/NOTES.md).
    GROUPED = False promises heads == 1, which saves the loop its index division."""
    blocks = (end - start + BLOCK_M - 1) // BLOCK_M
    # At least 1 as a divisor: the software pipeline computes the first step's addresses
    # before it knows the loop is empty, and a division by zero there gave a wild pointer
    # (an illegal address under compute-sanitizer on the H100, NOTES run 8).
    divisor = tl.maximum(blocks, 1)
    for step in range(0, heads * blocks):
        if GROUPED:
            g = step // divisor
            start_m = start + (step - g * divisor) * BLOCK_M
            g = g.to(tl.int64)
        else:
            g = 0
            start_m = start + step * BLOCK_M
        q_base = q_first + g * stride_qh
        do_base = do_first + g * stride_doh
        lse_base = lse_first + g * Sq
        delta_base = delta_first + g * Sq
        mask_base = mask_first + g * stride_mh
        bh = bh_first + g
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       row_ok[:, None], offs_d[None, :] < HEAD_D, True, HEAD_D != BLOCK_D)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom
                        + offs_dv[None, :] * stride_dod, row_ok[:, None],
                        offs_dv[None, :] < HEAD_DV, True, HEAD_DV != BLOCK_DV)
        lse = _row_lse(lse_base + offs_m, row_ok)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # (BLOCK_N, BLOCK_M): scores transposed
        st = _hide(tl.dot(k, tl.trans(q)) * qk_scale, mask_base, offs_m[None, :],
                   offs_n[:, None], kv_len, off, left, right, stride_mm, stride_mn, Sq, Skv,
                   MASKED, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS)
        pt = tl.exp2(st - lse[None, :])
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = dropout_mask.keep_keys_first(seed, bh, start_m, BLOCK_M, n0, Sq, Skv,
                                                drop_p, offs_n.shape[0])
            inv = 1.0 / (1.0 - drop_p)
            dv = tl.dot(tl.where(keep, pt * inv, 0.0).to(do.dtype), do, dv)
            dpt = tl.where(keep, dpt * inv, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@_tuned("dkdv", _DKDV_CONFIGS)
@_kernel
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, LENGTHS,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     stride_mb, stride_mh, stride_mm, stride_mn,
                     Hq, Hkv, group, Sq, Skv, left, right, qk_scale, scale, seed, drop_p,
                     SEQ_BUCKET, ROWS_BUCKET,
                     HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WINDOWED: tl.constexpr,
                     HAS_LENGTHS: tl.constexpr, MASK_KIND: tl.constexpr,
                     MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr, NEG_SCALE: tl.constexpr,
                     HEAD_GROUP: tl.constexpr, GROUPED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bkv = _program_tile(False, HEAD_GROUP)  # earlier key blocks see more queries
    seed = dropout_mask.seed_value(seed, DROPOUT)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    off = Skv - Sq
    kv_len = Skv
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), Skv)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, offs_n[:, None] < Skv,
                   offs_d[None, :] < HEAD_D, True, HEAD_D != BLOCK_D)
    v = _load_tile(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn
                   + offs_dv[None, :] * stride_vd, offs_n[:, None] < Skv,
                   offs_dv[None, :] < HEAD_DV, True, HEAD_DV != BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    n_last = tl.minimum(n0 + BLOCK_N, Skv) - 1
    lo, full_lo, full_hi, hi = _query_range(n0, n_last, Sq, kv_len, off, left, right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    h = kvh * group  # the group's first query head; the group is summed here, no atomics
    bh = b * Hq + h
    for part in tl.static_range(3):  # as in the forward: checks on the edges only
        start, end = _segment(part, lo, full_lo, full_hi, hi)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob
            + h * stride_doh, LSE + bh * Sq, DELTA + bh * Sq, MASK + b * stride_mb
            + h * stride_mh, n0, offs_n, offs_d, offs_dv, start, end, group, bh,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            stride_mh, stride_mm, stride_mn, Sq, Skv, kv_len, off, left, right, qk_scale,
            seed, drop_p, BLOCK_M, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, part != 1,
            HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS, DROPOUT, GROUPED)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Skv) & (offs_d[None, :] < HEAD_D))
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=(offs_n[:, None] < Skv) & (offs_dv[None, :] < HEAD_DV))


@_jit
def _dq_blocks(dq, q, do, lse, delta, k_src, v_src, mask_base, m0, offs_m, offs_d, offs_dv,
               start, end, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               Sq, Skv, kv_len, off, left, right, qk_scale, seed, bh, drop_p,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr):
    """Add key blocks [start, end) into the query block's dq (k_src, v_src: _kv_sources,
    pointers: through TMA this kernel stalled on the H100, NOTES run 7)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(k_src, v_src, start_n, offs_n, offs_d, offs_dv, stride_kn,
                         stride_kd, stride_vn, stride_vd, Skv, HEAD_D, HEAD_DV, BLOCK_D,
                         BLOCK_DV, MASKED, False)
        s = _hide(tl.dot(q, tl.trans(k)) * qk_scale, mask_base, offs_m[:, None],
                  offs_n[None, :], kv_len, off, left, right, stride_mm, stride_mn, Sq, Skv,
                  MASKED, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = dropout_mask.keep(seed, bh, m0, offs_m.shape[0], start_n, Sq, Skv,
                                     drop_p, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - drop_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@_tuned("dq", _DQ_CONFIGS)
@_kernel
def _bwd_dq_kernel(Q, K, V, Out, DO, LSE, DELTA, DQ, MASK, LENGTHS,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   Hq, group, Sq, Skv, left, right, qk_scale, scale, seed, drop_p,
                   SEQ_BUCKET, ROWS_BUCKET,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WINDOWED: tl.constexpr,
                   HAS_LENGTHS: tl.constexpr, MASK_KIND: tl.constexpr,
                   MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr, NEG_SCALE: tl.constexpr,
                   HEAD_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = _program_tile(HAS_RIGHT, HEAD_GROUP)  # as in the forward
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // group
    off = Skv - Sq
    seed = dropout_mask.seed_value(seed, DROPOUT)
    kv_len = Skv
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), Skv)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, row_ok[:, None], offs_d[None, :] < HEAD_D,
                   True, HEAD_D != BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_dv[None, :] * stride_dod, row_ok[:, None],
                    offs_dv[None, :] < HEAD_DV, True, HEAD_DV != BLOCK_DV)
    o = _load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                   + offs_dv[None, :] * stride_od, row_ok[:, None],
                   offs_dv[None, :] < HEAD_DV, True, HEAD_DV != BLOCK_DV)
    # delta here rather than in a pass of its own: one launch fewer per backward (host
    # time dominates small calls), and the dK/dV kernel, launched next, reads it.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, delta, mask=row_ok)
    lse = _row_lse(LSE + bh.to(tl.int64) * Sq + offs_m, row_ok)
    k_src, v_src = _kv_sources(K, V, b, kvh, stride_kb, stride_kh, stride_kn, stride_vb,
                               stride_vh, stride_vn, Skv, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                               BLOCK_DV, False)
    mask_base = MASK + b * stride_mb + h * stride_mh

    m0 = pid_m * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    lo, full_lo, full_hi, hi = _key_range(m0, m_last, kv_len, off, left, right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in tl.static_range(3):  # as in the forward: checks on the edges only
        start, end = _segment(part, lo, full_lo, full_hi, hi)
        dq = _dq_blocks(
            dq, q, do, lse, delta, k_src, v_src, mask_base, m0, offs_m, offs_d, offs_dv,
            start, end, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            Sq, Skv, kv_len, off, left, right, qk_scale, seed, bh, drop_p,
            BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, part != 1,
            HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROWS, DROPOUT)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D))


# ---------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------
def _empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32, uninitialised."""
    B, Hq, Sq, _ = q.shape
    # out is laid out (B, Sq, Hq, Dv) and returned as its (B, Hq, Sq, Dv) view, so the
    # module's transpose back to (B, S, H*D) for the output projection is a view too, not
    # a copy. The fake kernel allocates through here as well: compiled graphs must see
    # the strides the kernel really writes.
    out = q.new_empty((B, Sq, Hq, v.shape[3])).transpose(1, 2)
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


def _empty_grads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: contiguous, shaped like q, k, v; shared with the fake kernel."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# Host-side integer helpers: triton.next_power_of_2 and triton.cdiv go through Triton's
# constexpr-function wrapper, about 10 us a call, and every launch needs several.
def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: Tensor) -> tuple[int, ...]:
    # Size-1 dims get stride 0, which is what broadcasting them means.
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride(), strict=True))


# _meta's work depends on the call's sizes and options only, which repeat from call to
# call; looking it up by them costs a third of working it out (CPU machine, host_stub.py:
# 1.6 against 5.3 us), and _meta runs twice per forward+backward.
_META: dict[tuple, tuple] = {}
_META_MAX = 1024


# How many heads' programs are ordered together, heaviest tile first, under a causal
# mask (_program_tile): 4 and 8 came out alike in the simulation, 8 was measured.
_HEAD_GROUP = 8


def _meta(call: AttentionCall, seed: int | Tensor) -> tuple[tuple, dict]:
    """Scalar arguments and constexpr flags shared by the three main kernels; the flags
    are the caller's own copy to add to."""
    mask = call.attn_mask
    key = (call.q.shape, call.k.shape[2], call.v.shape[3], call.causal, call.window,
           None if mask is None else (mask.dtype, mask.shape[2]), call.key_lengths is None,
           call.dropout_p, call.scale)
    known = _META.get(key)
    if known is None:
        if len(_META) >= _META_MAX:
            _META.clear()
        known = _META[key] = _work_out_meta(call)
    (left, right, qk_scale, drop_p, *buckets), flags = known
    return (left, right, qk_scale, seed, drop_p, *buckets), dict(flags)


def kernel_flags(head_dim: int, head_dim_v: int, *, has_left: bool, has_right: bool,
                 has_lengths: bool, mask_kind: int = 0, mask_rows: bool = False,
                 dropout: bool = False, neg_scale: bool = False) -> dict:
    """The constexpr flags that the three main kernels share, for a call with these
    features (mask_kind: 0 none, 1 bool, 2 additive); benchmarks/triton_registers.py and
    the sm_90 compile test build theirs here too, so that they compile what runs."""
    return dict(
        HEAD_D=head_dim, HEAD_DV=head_dim_v,
        BLOCK_D=max(16, _pow2(head_dim)), BLOCK_DV=max(16, _pow2(head_dim_v)),
        HAS_LEFT=has_left, HAS_RIGHT=has_right, WINDOWED=has_left or has_right,
        HAS_LENGTHS=has_lengths, MASK_KIND=mask_kind, MASK_ROWS=mask_rows,
        DROPOUT=dropout, NEG_SCALE=neg_scale,
        HEAD_GROUP=_HEAD_GROUP if has_right else 1,
    )


def _work_out_meta(call: AttentionCall) -> tuple[tuple, dict]:
    """_meta's scalars (without the seed) and flags for `call`."""
    left, right = call.window or (None, None)
    if call.causal:
        right = 0 if right is None else min(right, 0)
    mask = call.attn_mask
    flags = kernel_flags(
        call.head_dim, call.head_dim_v, has_left=left is not None,
        has_right=right is not None, has_lengths=call.key_lengths is not None,
        mask_kind=0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        mask_rows=mask is not None and mask.shape[2] != 1, dropout=call.dropout_p > 0.0,
        neg_scale=call.scale < 0)
    if _INTERPRET:
        flags.update(_INTERPRET_META)
    # Tuning is redone per power-of-two (query, key) length bucket, capped at 16k so the
    # longest inputs share one (a cap at 4k let 4k's pick serve 16k, where larger tiles
    # and TMA win: NOTES, run 7), and per power of two of query rows in all (B * Hq *
    # Sq, 16k to 512k), which is how many programs there are to keep the GPU's
    # multiprocessors busy.
    seq_bucket = _length_bucket(call.seq_q, call.seq_kv)
    rows = call.q.shape[0] * call.heads_q * call.seq_q
    rows_bucket = min(max(_pow2(rows), 2**14), 2**19)
    scalars = (left or 0, right or 0, call.scale * hopper_forward.LOG2E, call.dropout_p,
               seq_bucket, rows_bucket)
    return scalars, flags


def _tune_key(flags: dict, buckets: list[int], seed: int | Tensor, *tensors: Tensor) -> tuple:
    """What the autotuner's key is made of (_TUNE_KEY, whether the seed comes in a tensor,
    and the dtypes of the tensors): a pick made with the seed by value must not serve a
    kernel that loads it, which is another build (and may not build at all)."""
    return (flags["HEAD_D"], flags["HEAD_DV"], flags["WINDOWED"], flags["DROPOUT"], *buckets,
            isinstance(seed, Tensor), *(t.dtype for t in tensors))


def _mask_args(call: AttentionCall) -> tuple[Tensor, tuple[int, ...]]:
    mask = call.attn_mask
    if mask is None:
        return call.q, (0, 0, 0, 0)  # never read: MASK_KIND = 0
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a dtype every Triton version loads
    return mask, _strides(mask)


def arg_types(fn, mask_kind: int) -> dict[str, str]:
    """Triton types of a kernel's arguments (bfloat16 tensors; mask_kind as MASK_KIND), by
    the names the kernels use: the signature for compiling one ahead of time, with no GPU
    (tests/test_triton_compile.py, benchmarks/triton_registers.py)."""
    tensors = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "LENGTHS": "*i64", "OUT_P": "*fp32",
                "MAX_SUM_P": "*fp32", "seed": "*i64",  # run's seed: a 0-d tensor the kernels read
                "MASK": "*u8" if mask_kind == 1 else "*bf16"}  # bool: as _mask_args views it
    sig = {}
    for name, param in zip(fn.arg_names, fn.params, strict=True):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in tensors:
            sig[name] = "*bf16"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ("qk_scale", "scale", "drop_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def autotuned_configs() -> dict[str, dict[str, str]]:
    """What the autotuner chose so far in this process, per kernel and tuning key."""
    kernels = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    return {name: {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
            for name, kernel in kernels.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages): a launch with its tile config given instead of
# autotuned, for benchmarks/triton_configs.py, which times each candidate on its own.
TileConfig = tuple[int, int, int, int]


# The autotuner's pick per (kernel, tuning key): its meta-parameters (tiles, and for the
# forward TMA) and its launch options. Triton's Autotuner rebuilds its key from all ~60
# arguments on every launch; after the first launch of a key this looks the config up
# from a tuple and launches the kernel itself. The options are kept as the autotuner
# passed them (num_warps, num_ctas, num_stages, ...; _tuned_options): Triton's in-memory
# kernel cache keys a launch by the text of its options, so one left out or reordered
# misses the kernel the autotuner built, and the launch loads it again from the disk
# cache (10-40 ms a kernel on the H200, run 45).
_CHOSEN: dict[tuple, tuple[dict, dict]] = {}


def _tuned_options(config) -> dict:
    """A triton.Config's launch options (all but its meta-parameters), in the order and
    with the values that the autotuner launches it with."""
    return {k: v for k, v in config.all_kwargs().items() if k not in config.kwargs}


def _launch(kernel, grid, args: tuple, flags: dict, tune_key: tuple,
            config: TileConfig | None = None,
            riders: Callable[[], list[tuple]] | None = None) -> None:
    """kernel[grid](*args, **flags) with `config`, or else with the autotuner's pick for
    `tune_key` (which must determine the autotuner's own key: its key arguments and the
    dtypes of the tensors). riders: where the autotuner has a round to time for this
    launch, what returns the builds (as _build_ahead takes them) to make at the same
    time; called by that round's first timing (_timed), if there is one."""
    tuner = isinstance(kernel, triton.runtime.Autotuner)  # not under the interpreter
    if config is not None:
        block_m, block_n, warps, stages = config
        chosen = {"BLOCK_M": block_m, "BLOCK_N": block_n}, {"num_warps": warps,
                                                            "num_stages": stages}
    else:
        chosen = _CHOSEN.get((kernel, tune_key)) if tuner else None
    if chosen is None:
        _AHEAD.riders = riders if tuner else None
        try:
            kernel[grid](*args, **flags)
        finally:  # a round served from disk leaves its candidates, with the call's tensors
            _AHEAD.pending = _AHEAD.riders = None
        if tuner:
            best = kernel.best_config
            _CHOSEN[(kernel, tune_key)] = (best.kwargs, _tuned_options(best))
        return
    meta, options = chosen
    _launch_jitted(kernel.fn if tuner else kernel, grid, args, {**flags, **meta}, options)


# Triton's own launch path (JITFunction.run) binds and specializes every argument, about
# 40 here, in Python on each launch: ~100 us of host time per launch under the profiler
# on the H100 host (NOTES, run 6), more than the GPU time of a small call. So after a
# launch _COMPILED keeps the compiled kernel under everything Triton specialized it on,
# and a later launch with the same specialization goes to it directly: CompiledKernel
# [grid](*args), which from Triton 3.3 on takes the constexpr arguments too, in order.
def _triton_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


_FAST_LAUNCH = triton is not None and not _INTERPRET and _triton_at_least(3, 3)
# Host TMA descriptor classes that launches pass (Gluon's), which _specialization keys by
# box rather than by value.
_DESCRIPTORS = () if hopper_forward.gluon is None else (hopper_forward.TensorDescriptor,)
_COMPILED: dict[tuple, tuple] = {}
_COMPILED_MAX = 4096  # distinct specializations kept; past that, Triton's path serves


def _specialization(args: tuple) -> tuple:
    """At least what Triton specializes a launch on, per non-constexpr argument: a
    tensor's dtype and 16-byte alignment; an int's width and whether it is 1 or a
    multiple of 16; a host TMA descriptor's dtype, box and layout (not its shape or
    strides, which the launcher passes as values); anything else by type (floats are not
    specialized) and value."""
    key = []
    for a in args:  # type() is, not isinstance: isinstance(a, Tensor) costs ~0.1 us
        kind = type(a)
        if kind is int:
            wide = 0 if -2**31 <= a < 2**31 else 64
            key.append(wide + (1 if a == 1 else 16 if a % 16 == 0 else 0))
        elif kind is float:
            key.append(float)
        elif kind in _DESCRIPTORS:
            key.append((kind, a.base.dtype, tuple(a.block_shape), getattr(a, "layout", None),
                        a.padding))
        elif isinstance(a, Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((kind, a))
    return tuple(key)


def _constexpr_tail(jitted, n_args: int, constexprs: dict) -> tuple | None:
    """The values of the kernel's parameters after its first n_args, all constexpr, as
    CompiledKernel[grid] takes them; None where one is not a constexpr or has no value."""
    tail = []
    for param in jitted.params[n_args:]:
        value = constexprs.get(param.name, getattr(param, "default", inspect.Parameter.empty))
        if not param.is_constexpr or value is inspect.Parameter.empty:
            return None
        tail.append(value)
    return tuple(tail)


def _launch_key(jitted, args: tuple, constexprs: dict, options: dict) -> tuple:
    """What _COMPILED keeps a compiled kernel under: the kernel, its constexprs and
    options, the device and _specialization of the arguments."""
    return (jitted, frozenset(constexprs.items()), frozenset(options.items()),
            torch.cuda.current_device(), _specialization(args))


def _launch_jitted(jitted, grid, args: tuple, constexprs: dict, options: dict,
                   riders: Callable[[], list[tuple]] | None = None) -> None:
    """jitted[grid](*args, **constexprs, **options) (grid: a tuple of block counts, or a
    function of the constexprs to one; options: num_warps, num_stages, maxnreg), straight
    to the compiled kernel where this specialization was launched before (_FAST_LAUNCH).
    Triton and Gluon kernels alike. riders: where this is the specialization's first
    launch, the builds (as _build_ahead takes them) to make at the same time as its own."""
    if not _FAST_LAUNCH:
        jitted[grid](*args, **constexprs, **options)
        return
    key = _launch_key(jitted, args, constexprs, options)
    entry = _COMPILED.get(key)
    if entry is not None:
        compiled, tail = entry
        blocks = grid(constexprs) if callable(grid) else grid
        compiled[(*blocks, 1, 1)[:3]](*args, *tail)  # it takes three grid dimensions
        return
    if riders is not None and len(_COMPILED) < _COMPILED_MAX:  # else every launch lands here
        _build_ahead([_jitted_build(jitted, grid, args, constexprs, options), *riders()])
    compiled = jitted[grid](*args, **constexprs, **options)
    tail = _constexpr_tail(jitted, len(args), constexprs)
    if compiled is not None and tail is not None and len(_COMPILED) < _COMPILED_MAX:
        _COMPILED[key] = compiled, tail


def _jitted_build(jitted, grid, args: tuple, constexprs: dict, options: dict) -> tuple:
    """_launch_jitted's launch as _build_ahead builds it."""
    return jitted, args, {"grid": grid, **constexprs, **options}


def _unlaunched_builds(launches: list[tuple]) -> list[tuple]:
    """The builds (as _build_ahead takes them) of those _launch_jitted launches (jitted,
    grid, args, constexprs, options) whose specialization it has not launched yet."""
    return [_jitted_build(*launch) for launch in launches
            if _launch_key(launch[0], *launch[2:]) not in _COMPILED]


def _tma_layout(t: Tensor) -> bool:
    """Whether TMA can load tiles of the (B, H, S, D) tensor t: unit stride along D, and
    16-byte aligned (batch, head) bases and rows."""
    # unrolled: a generator over the strides costs ~1 us a tensor, and a Gluon training
    # step checks eleven (host_stub.py)
    stride_b, stride_h, stride_s, stride_d = t.stride()
    size = t.element_size()
    return (stride_d == 1 and t.data_ptr() % 16 == 0 and stride_b * size % 16 == 0
            and stride_h * size % 16 == 0 and stride_s * size % 16 == 0)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """A Triton that builds TMA descriptors and a Hopper or newer GPU, not the interpreter;
    looked up once per device, not on every call."""
    return (hasattr(tl, "make_tensor_descriptor") and not _INTERPRET
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_ready(*tensors: Tensor) -> bool:
    """TMA for these tensors: _has_tma on their device, and _tma_layout."""
    return _has_tma(tensors[0].device) and all(_tma_layout(t) for t in tensors)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # Triton's allocator state, to tell whether one is set (private: may move)
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator
except ImportError:
    _allocator = None


def _ensure_allocator() -> None:
    """Kernels that build TMA descriptors on the GPU need Triton's scratch allocator, which
    is per thread (a ContextVar) and unset by default; a user's own stays in place."""
    if _allocator is None or isinstance(_allocator.get(), _NullAllocator):
        triton.set_allocator(_scratch)


def _on_call_device(fn: Callable) -> Callable:
    """fn(call, ...) run with the call's GPU as the current device. Triton launches on the
    current device's stream, whatever device the arguments are on (and the launch cache's
    key and hopper_forward.tile_counter go by it too), so a call on cuda:1 made while
    cuda:0 is current would run its kernels on the wrong GPU without this guard."""
    @functools.wraps(fn)
    def on_call_device(call: AttentionCall, *args, **kwargs):
        device = call.device
        if device.type != "cuda" or device.index == torch.cuda.current_device():
            return fn(call, *args, **kwargs)
        with torch.cuda.device(device):
            return fn(call, *args, **kwargs)
    return on_call_device


@_on_call_device
def _forward(call: AttentionCall, seed: int | Tensor, config: TileConfig | None = None,
             tma: bool | None = None, splits: int | None = None,
             packed: bool | None = None, grads_follow: bool = False
             ) -> tuple[Tensor, Tensor]:
    """out, lse. The autotuner decides whether K and V tiles load through TMA (where
    _tma_ready); with a tile config given, tma decides (None: wherever _tma_ready).
    splits: how many key ranges the forward runs apart and then merges (None: _kv_splits;
    the count is rounded so that each range is a multiple of _SPLIT_ALIGN keys).
    packed: whether a kv group's query heads share a tile (None: _packs_group). seed:
    dropout's, an int or an int64 tensor on the call's device that the kernels read.
    grads_follow: a backward of this call is to come, so a first forward builds the
    backward's kernels alongside its own (_backward_builds: _launch's riders for the Triton
    forward, _launch_jitted's for the Gluon one)."""
    q, k, v = call.q, call.k, call.v
    B, Hq, Sq, _ = q.shape
    Skv, Dv = call.seq_kv, call.head_dim_v
    out, lse = _empty_outputs(q, v)
    riders = functools.partial(_backward_builds, call, seed, out, lse) if grads_follow else None
    packed = _packs_group(call) if packed is None else packed
    splits, kv_split = _key_ranges(Skv, splits or _kv_splits(call, packed), config)
    if (config is None and tma is None and splits == 1 and _uses_hopper_forward(call)
            and _ran_on_gluon("_HOPPER_FORWARD", "forward", lambda: hopper_forward.launch(
                q, k, v, out, lse, call.key_lengths, call.causal, call.scale,
                _hopper_config(call), _hopper_head_group(call),
                launcher=_launch_jitted if riders is None else functools.partial(
                    _launch_jitted, riders=riders)))):
        return out, lse
    (left, right, qk_scale, seed, drop_p, *buckets), flags = _meta(call, seed)
    if packed:  # tuned by a program's rows, the group's heads' (_program_rows, _prune)
        buckets[0] = _length_bucket(Sq * call.group, Skv)
    mask, mask_strides = _mask_args(call)
    lengths = call.key_lengths if call.key_lengths is not None else lse
    flags["TMA_OK"] = _tma_ready(k, v) if tma is None else tma
    if config is not None or not isinstance(_fwd_kernel, triton.runtime.Autotuner):
        flags["TMA"] = flags["TMA_OK"]
    elif tma is not None:
        raise ValueError("tma is chosen by the autotuner unless a tile config is given")
    if flags["TMA_OK"]:
        _ensure_allocator()
    flags["PACKED"] = packed
    row_groups, rows = _query_rows(call, packed)
    flags["SPLIT"] = splits > 1
    written, written_lse, split_stride = out, lse, 0
    if splits > 1:  # partial results per key range, float32, merged below
        parts = q.new_empty((splits, B, Hq, Sq, Dv), dtype=torch.float32)
        written, split_stride = parts[0], parts.stride(0)
        written_lse = q.new_empty((splits, B * Hq * Sq, 2), dtype=torch.float32)

    def grid(meta):
        return (_cdiv(rows, meta["BLOCK_M"]), row_groups, splits)

    _launch(_fwd_kernel, grid, (
        q, k, v, written, written_lse, mask, lengths,
        *q.stride(), *k.stride(), *v.stride(), *written.stride(), *mask_strides,
        Hq, call.group, Sq, Skv, left, right, qk_scale, seed, drop_p,
        kv_split, split_stride, *buckets,
    ), flags, (*_tune_key(flags, buckets, seed, q, mask, lengths), flags["TMA_OK"],
               flags["SPLIT"], packed), config, riders=riders)
    if splits > 1:
        _launch_jitted(_merge_kernel, lambda meta: (B * Hq * Sq,), (
            parts, written_lse, out, lse, splits, Hq, Sq, *out.stride(),
        ), {"HEAD_DV": Dv, "BLOCK_DV": flags["BLOCK_DV"], "BLOCK_S": _pow2(splits)},
            {"num_warps": 4, "num_stages": 1})
    return out, lse


# Long sequences on Hopper take the Gluon forward (hopper_forward: the softmax overlaps the
# matmuls, which the Triton language cannot say) where it covers the call and was measured
# faster: on an H200, persistent and with out stored by TMA, 1.10-1.17x this file's
# forward at D=128 and S >= 2k, causal or not, 1.08-1.24x at 1k, and at 512 1.28x
# without causal and 1.05x causal (run 29; 1.00x in run 18); at
# D=64 1.09-1.13x without causal from 2k (0.98x at 1k), and where every key is seen, with
# no index checks built and a third K/V slot, 1.16x at 1k and 1.15-1.19x at 2k-8k (run
# 27); causal at D=64, with each warpgroup walking its own rows' key blocks, 1.03-1.04x at
# 2k-4k and 1.11x at 8k (0.84x at 1k) (NOTES, runs 16-18); at 16k, with the causal tiles
# in groups of heads, 1.01x, where the 128-key blocks routed there since run 18 ran 0.99x
# (run 23); at D=64 from 1280-1536 queries and keys since run 42 (_HOPPER_ROUTES); at
# D=256, on 64-key blocks (64, 2, 2, 0), 1.12-1.13x at 4k, 1.16x causal at 1k, 1.15-1.18x
# at 256-512 but 1.02x at 256 causal, against this file's forward on its own wide tile
# (_WIDE_FWD_TILE), where run 59's 32-key blocks (32, 3, 2, 0) ran 1.00-1.15x (run 60).
# _HOPPER_FORWARD switches it off (A/B, kernel_variants.py).
_HOPPER_FORWARD = True
# The Gluon forward's causal tiles go out in groups of heads, heaviest first, as this
# file's kernels' do: on an H200 1.03x at D=128 4k, 1.02x at 8k, 1.00x at D=64, 1.18x
# with few heads (B=3, H=5) against head by head (NOTES run 22). A separate switch from
# _HEAD_GROUP so that kernel_variants.py can time the forward's order alone.
_HOPPER_FORWARD_HEAD_GROUP = _HEAD_GROUP


def _hopper_head_group(call: AttentionCall) -> int:
    """The Gluon forward's head group for the call (hopper_forward.launch's head_group)."""
    return _HOPPER_FORWARD_HEAD_GROUP if call.causal else 1


# The shortest (Sq, Skv) from which a Gluon kernel is routed: a call takes it where its
# Sq and its Skv each reach their own. Skv sets how many key blocks a tile walks, Sq how
# many tiles there are and how full the last one is, so they are kept apart: on an H200
# the Gluon forward at D=128 ran 1.17-1.27x the Triton forward at Sq = 256-512 against
# Skv = 1024, 1.01-1.07x against 2k-16k keys, but against 8k keys 0.96-1.00x at Sq = 128
# and 0.77-0.81x at 64 (one 128-row tile, mostly empty); at Sq = Skv = 512, 1.28x without
# causal and 1.05x causal, where run 18 had measured 1.00x (NOTES run 29).
Reach = tuple[int, int]

# hopper_forward.launch's config (hopper_forward.Config's fields) per (head dim, causal):
# the first (reach, config) pair whose reach the call has. D=128 causal against fewer
# than 2k keys takes 64-key blocks (four K/V slots, two Q buffers): on an H200 1.05x the
# 128-key blocks at 1k, 1.09x with key lengths, 0.99-1.00x at 2k and 0.96-0.97x at 4k
# (run 28); at Sq = 1k against 16k keys the 128-key blocks ran 1.04x the 64-key ones
# (run 29), so the choice goes by Skv. At D=64, since a part-full last tile's empty
# warpgroups walk no keys (run 42), the Gluon forward ran, against the Triton forward,
# causal 1.03-1.13x from Sq = 1280 (Sq = Skv 1280-2000, key lengths or not, and Sq = 1280
# against 4k and 8k keys) but 0.97x at 1k and 1.00x at 1152; without causal, where
# index checks are built (key lengths, Skv not a multiple of 128), 1.00-1.07x from 1536
# but 0.93x at 1280 and 0.85x at 1k (key lengths).
_HOPPER_ROUTES: dict[tuple[int, bool], tuple[tuple[Reach, tuple[int, ...]], ...]] = {
    (128, False): (((256, 512), (128, 2, 2, 1)),),
    (128, True): (((256, 2048), (128, 2, 2, 1)), ((256, 512), (64, 4, 2, 1))),
    (64, False): (((1536, 1536), (128, 2, 3, 1)),),
    (64, True): (((1280, 1280), (64, 3, 3, 1, 1)),),
    (256, False): (((256, 256), (64, 2, 2, 0)),),
    (256, True): (((256, 256), (64, 2, 2, 0)),),
}


# Routes taken before _HOPPER_ROUTES' where every row sees every key
# (hopper_forward.every_key_seen, in the route's key blocks): the kernel then builds no
# index checks, and at D=64 the registers that frees hold a third K/V slot without
# spilling. On an H200 (128, 3, 3, 1) ran 1.02-1.04x (128, 2, 3, 1) at 1k-4k and 1.01x at
# 8k-16k on such calls but 0.99-1.00x where the checks are built (key lengths, Skv not a
# multiple of 128); and 1.16x this file's forward at 1k, where calls with the checks built
# ran 0.94-1.00x (NOTES run 27). Its 192-row tiles want Sq to fill them: against 512-4k
# keys 1.05-1.17x at Sq = 512 and 1.20x at 768, 1.00x at 640, 0.84-0.88x at 256 (run 29).
_HOPPER_ALL_SEEN_ROUTES: dict[int, tuple[tuple[Reach, tuple[int, ...]], ...]] = {
    64: (((512, 512), (128, 3, 3, 1)),),
}


def _reaches(call: AttentionCall, reach: Reach | None) -> bool:
    """Whether the call's Sq and Skv each reach reach's (Sq, Skv); False for None."""
    return reach is not None and call.seq_q >= reach[0] and call.seq_kv >= reach[1]


def _tile_head_dim(call: AttentionCall) -> int:
    """The head dim of the Gluon kernels' tiles for the call, hopper_forward.head_block
    (D=96 runs on 128 columns), by which their routes and configs go: this file's kernels
    pad the same (BLOCK_D), so what was measured between the two at 128 holds at 96. On
    an H200 the Gluon kernels against this file's: forward 1.11x at D=96 4k, 1.20x causal,
    1.32x at D=80 1k causal, 1.23x at D=192 4k, 1.07x at D=48 4k causal; backward 1.23x,
    1.19x, 1.28x, 1.86x (1.72x causal), 1.19x (NOTES run 63); since then the Gluon
    kernels' products skip most columns past D (hopper_forward.split_columns), another
    1.06-1.13x forward and 1.09-1.19x backward there (run 64)."""
    return hopper_forward.head_block(call.head_dim)


def _hopper_config(call: AttentionCall) -> tuple[int, ...] | None:
    """The Gluon forward's tile config for the call's tile head dim (_tile_head_dim),
    causality, Sq and Skv (_HOPPER_ALL_SEEN_ROUTES where every key is seen, then
    _HOPPER_ROUTES), or None where it was not measured faster."""
    head_dim = _tile_head_dim(call)
    all_seen = tuple(route for route in _HOPPER_ALL_SEEN_ROUTES.get(head_dim, ())
                     if hopper_forward.every_key_seen(call.causal, call.key_lengths,
                                                      call.seq_kv, route[1][0]))
    routes = all_seen + _HOPPER_ROUTES.get((head_dim, call.causal), ())
    return next((config for reach, config in routes if _reaches(call, reach)), None)


def _hopper_forward_fits(call: AttentionCall) -> bool:
    """Whether the call is one the Gluon forward covers and was measured faster on: a
    config in _HOPPER_ROUTES for its length, no dropout (the Gluon forward does not drop;
    the backward kernels do), and _gluon_covers. Says nothing about the device."""
    return (call.dropout_p == 0.0 and _hopper_config(call) is not None
            and _gluon_covers(call, (call.q, call.k, call.v)))


# The Gluon kernels' head dims are multiples of this (_gluon_covers): out, which
# _empty_outputs lays out (B, S, H, D), goes through TMA, whose strides are multiples of
# 16 bytes (at D=44 a head is 88).
_GLUON_DIM_STEP = 8


def _tile_widths() -> list[int]:
    """The Gluon kernels' tile head dims, narrowest first: those _HOPPER_ROUTES has."""
    return sorted({d for d, _ in _HOPPER_ROUTES})


def _gluon_dims_text() -> str:
    """The head dims the Gluon kernels take, in words: those of their tiles' widths
    (_dims_text), "a multiple of 8 from 40 to 256"."""
    tiles = _tile_widths()
    return (f"a multiple of {_GLUON_DIM_STEP} from {tiles[0] // 2 + _GLUON_DIM_STEP} to "
            f"{tiles[-1]}")


def _gluon_covers(call: AttentionCall, tensors: tuple[Tensor, ...]) -> bool:
    """What the Gluon kernels need: bfloat16 or float16 (timed in bfloat16; the two take
    the same tensor-core path), D = Dv a multiple of _GLUON_DIM_STEP, a positive scale, no
    mask tensor or window, and `tensors` (B, H, S, D) that TMA can read, none
    broadcast."""
    return (call.dtype in (torch.bfloat16, torch.float16)
            and call.head_dim_v == call.head_dim and call.head_dim % _GLUON_DIM_STEP == 0
            and call.scale > 0
            and call.attn_mask is None and call.window is None
            and all(_tma_layout(t) and hopper_forward.describable(t) for t in tensors))


# The backward's kernels on Hopper are the Gluon ones (hopper_backward) where they cover
# the call and were measured faster, each with a switch of its own and a Reach per (head
# dim, causal). At D=128 Sq from 256 and Skv from 512 (1024 causal): the two ran
# 1.04-1.11x the Triton backward at Sq = 256-512 against 1k-4k keys and 1.06x (full) and
# 1.14x (causal) at Sq = Skv = 512, where run 20 had 0.95x; 0.98x at Sq = 128 against 8k
# keys. But a step that small waits on the host, and the Gluon pair costs ~85 us more
# host time per forward+backward (its eight TMA descriptors, a guess): through autograd,
# causal 512 ran 0.88-0.92x, full 512 1.04x. At D=64 from 1k: the dK/dV kernel ran 0.93x
# at Sq = Skv = 512 causal and 0.96x at Sq = 512 against 4k keys without causal (run 29).
# On an H200, the whole backward:
# - the dK/dV kernel: D=128 full 1.05-1.13x from 1k (runs 20, 21); causal 1.05-1.10x
#   from 2k and 1.09x at 1k (run 26; 1.01x in run 21, before the host descriptors and
#   the masked-step change); D=64 1.03-1.04x from 4k (run 21), 1.02-1.05x at 1k-2k
#   (run 26; causal 1k was 0.88x in run 21);
# - the dQ kernel on top of it, D=128: 1.006-1.013x at 4k and 16k (run 22), 0.99-1.02x
#   at 1k-2k (run 26; 0.95-0.99x in run 22); at D=64 alone 0.77x the Triton dQ kernel
#   (run 22), so not routed there.
# bfloat16 and float16, both checked on a GPU.
_HOPPER_DKDV = True
# At D=256 (hopper_backward.wide_dkdv_kernel) the whole backward ran 1.38-1.54x the
# Triton one at 1k-16k, causal or not, 1.28-1.29x at 512, 1.17-1.18x at 256 and
# 1.21-1.27x at Sq = 256 against 4k keys; 1.06x at Sq = 128 against 8k (run 60); with
# dropout 0.1, 1.45-1.72x at 512-4k (run 62).
_HOPPER_DKDV_REACH: dict[tuple[int, bool], Reach] = {
    (128, False): (256, 512), (128, True): (256, 1024), (64, False): (1024, 1024),
    (64, True): (1024, 1024), (256, False): (256, 256), (256, True): (256, 256)}
_HOPPER_DQ = True
# The dQ kernel at D=256 (32-key blocks), beside wide_dkdv_kernel: the backward 1.09-1.15x
# its time with the Triton dQ kernel at 256-16k, causal or not (run 61).
_HOPPER_DQ_REACH: dict[tuple[int, bool], Reach] = {(128, False): (256, 512),
                                                   (128, True): (256, 1024),
                                                   (256, False): (256, 256),
                                                   (256, True): (256, 256)}


def _hopper_backward_fits(call: AttentionCall, out: Tensor, dout: Tensor) -> tuple[bool, bool]:
    """(dK/dV kernel, dQ kernel): whether each Gluon backward kernel covers the call (with
    its output out and gradient dout) and was measured faster on it: the call has the
    kernel's reach (Sq, Skv) for its tile head dim (_tile_head_dim) and causality, and
    _gluon_covers, worked out once for both; the dQ kernel also reads out along rows of
    unit stride (the forward's own out always is). Says nothing about the device."""
    key = (_tile_head_dim(call), call.causal)
    dkdv = _reaches(call, _HOPPER_DKDV_REACH.get(key))
    dq = _reaches(call, _HOPPER_DQ_REACH.get(key)) and out.stride(3) == 1
    if (dkdv or dq) and _gluon_covers(call, (call.q, call.k, call.v, dout)):
        return dkdv, dq
    return False, False


def _uses_hopper_backward(call: AttentionCall, out: Tensor, dout: Tensor) -> tuple[bool, bool]:
    """(dK/dV kernel, dQ kernel): whether each Gluon backward kernel runs the call: its
    switch is on, the call is on a Hopper GPU, and _hopper_backward_fits."""
    if not ((_HOPPER_DKDV or _HOPPER_DQ) and _on_hopper(call)):
        return False, False
    dkdv, dq = _hopper_backward_fits(call, out, dout)
    return _HOPPER_DKDV and dkdv, _HOPPER_DQ and dq


def _ran_on_gluon(switch: str, kernel: str, launch: Callable[[], None]) -> bool:
    """Runs a Gluon kernel's launch and says whether it ran. One that does not compile
    here (a Triton whose Gluon differs from the one it was checked under) is switched off
    for the process (the module flag `switch`), once, with a warning; the Triton kernel
    serves instead."""
    try:
        launch()
        return True
    except triton.CompilationError as exc:
        globals()[switch] = False
        _warn_gluon_off(kernel, exc)
        return False


def _warn_gluon_off(kernel: str, exc: Exception) -> None:
    warnings.warn(f"attnkit: the Gluon {kernel} for Hopper did not compile under Triton "
                  f"{triton.__version__} ({type(exc).__name__}: {str(exc)[:200]}); using the "
                  f"Triton {kernel} instead", RuntimeWarning, stacklevel=4)


_NOT_HOPPER = "not a Hopper GPU"


def _hopper_forward_unavailable(device: torch.device) -> str | None:
    """None where the Gluon forward can run on device (an sm_90 GPU, a Triton release it
    was checked under, not the interpreter), else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return _NOT_HOPPER
    if _INTERPRET:
        return "TRITON_INTERPRET is set"
    if not hopper_forward.available():
        checked = ", ".join(f"{major}.{minor}" for major, minor in
                            hopper_forward.CHECKED_RELEASES)
        return f"Triton {triton.__version__} is not a release it was checked under ({checked})"
    return None


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return _hopper_forward_unavailable(device) is None


def _on_hopper(call: AttentionCall) -> bool:
    """Whether the call's device is one the Gluon kernels run on (_is_hopper); a CPU
    call is told so without the cached lookup."""
    return call.device.type == "cuda" and _is_hopper(call.device)


_BLOCK_LEAD = ("impl='auto' runs triton first for causal calls of 1 < Sq < Skv (a block of "
               "new queries against a cache) with no mask tensor, key lengths, window or "
               "dropout when nothing needs a gradient: SDPA's flash kernel, on its own "
               "bottom-right causal mask there, took 1.05-6.6x its GPU time; and with "
               "gradients from B*Hq*Sq*Skv*D = 2^34 up, where SDPA's forward+backward took "
               "1.26-1.84x its time, host time included (below it, triton's longer host "
               "time lost); and for one query row with heads wider than 128 against a "
               "cache of B*Hkv*Skv*D >= 2^24, with nothing to differentiate and no mask "
               "tensor, key lengths, window or dropout, where SDPA's flash kernel took "
               "1.20-1.51x its GPU time")


def _details(device: torch.device) -> str | None:
    """On a Hopper GPU, whether the Gluon forward and backward kernels run there, and if
    not why, and the calls `auto` runs here first (_leads)."""
    unavailable = _hopper_forward_unavailable(device)
    if unavailable == _NOT_HOPPER:
        return None
    off = "switched off in this process (it did not compile here, or by hand)"
    why = unavailable or (None if _HOPPER_FORWARD else off)
    state = (f"off: {why}" if why else
             f"on for bfloat16/float16 calls with D = Dv {_gluon_dims_text()} "
             f"(rows that TMA reads: 16-byte aligned), on tiles of "
             f"{_widths_text(_tile_widths())} columns (the narrowest "
             f"that holds D), and {_route_text()}, "
             f"and no mask tensor, window or dropout; "
             f"impl='auto' runs triton first for those calls where it was faster than "
             f"cuDNN: when nothing needs a gradient, {_reach_text(_LEADS_REACH)}; with "
             f"gradients, {_reach_text(_LEADS_WITH_GRADS_REACH)}; with gradients and "
             f"dropout (this file's forward, the Gluon dQ and dK/dV kernels), "
             f"{_reach_text(_LEADS_WITH_DROPOUT_REACH)}")
    text = f"Gluon forward for Hopper: {state}"
    for kernel, switch, reach in (("dQ", _HOPPER_DQ, _HOPPER_DQ_REACH),
                                  ("dK/dV", _HOPPER_DKDV, _HOPPER_DKDV_REACH)):
        why = unavailable or (None if switch else off)
        state = (f"off: {why}" if why else
                 f"on for calls of the same kinds, dropout too, with "
                 f"{_reach_text(reach, tiles=True)}")
        text += f". Gluon {kernel} kernel for Hopper: {state}"
    return f"{text}. {_BLOCK_LEAD}"


def _route_text() -> str:
    """The reach of _HOPPER_ROUTES' last (shortest) route per head dim and causality, as
    _reach_text says it, and _HOPPER_ALL_SEEN_ROUTES' after it."""
    all_seen = "".join(f"; {_lengths_text(routes[-1][0])} at {_dims_text(d, True)} where "
                       f"every row sees every key (no causal mask or key lengths, Skv a "
                       f"multiple of {routes[-1][1][0]})"
                       for d, routes in _HOPPER_ALL_SEEN_ROUTES.items())
    shortest = {key: routes[-1][0] for key, routes in _HOPPER_ROUTES.items()}
    return _reach_text(shortest, tiles=True) + all_seen


def _widths_text(widths: list[int]) -> str:
    """[64, 128, 256] -> "64, 128 or 256"."""
    *rest, last = map(str, widths)
    return f"{', '.join(rest)} or {last}" if rest else last


def _dims_text(head_dim: int, tiles: bool) -> str:
    """A head dim in words; where tiles, a tile head dim, as the dims it runs (multiples of
    _GLUON_DIM_STEP; hopper_forward.head_block): 128 -> "D=72-128"."""
    return f"D={head_dim // 2 + _GLUON_DIM_STEP}-{head_dim}" if tiles else f"D={head_dim}"


def _lengths_text(reach: Reach) -> str:
    sq, skv = reach
    return f"Sq and Skv >= {sq}" if sq == skv else f"Sq >= {sq} and Skv >= {skv}"


def _reach_text(reach: dict[tuple[int, bool], Reach], tiles: bool = False) -> str:
    """{(head dim, causal): (shortest Sq, shortest Skv)} in words, widest head dim first,
    e.g. "Sq >= 256 and Skv >= 512 at D=128, Sq and Skv >= 2048 at D=64 (Sq and Skv >=
    8192 causal)"; tiles: the head dims are tile head dims (_dims_text)."""
    parts = []
    for d in sorted({d for d, _ in reach}, reverse=True):
        full, causal = reach.get((d, False)), reach.get((d, True))
        dims = _dims_text(d, tiles)
        if causal is None:
            parts.append(f"{_lengths_text(full)} at {dims} without causal")
        elif full is None:
            parts.append(f"{_lengths_text(causal)} at {dims} causal")
        elif full == causal:
            parts.append(f"{_lengths_text(full)} at {dims}")
        else:
            parts.append(f"{_lengths_text(full)} at {dims} ({_lengths_text(causal)} causal)")
    return ", ".join(parts)


def _uses_hopper_forward(call: AttentionCall) -> bool:
    return _HOPPER_FORWARD and _on_hopper(call) and _hopper_forward_fits(call)


# impl="auto" runs SDPA first, which runs cuDNN on Hopper. Forward alone, on an H200, the
# Gluon forward against the faster of sdpa and sdpa_cudnn: D=64 without causal 1.08-1.10x
# at 2k-4k in two runs (runs 27-28, after the all-seen build), 0.97x at 1k, 1.04-1.16x
# from 8k; causal 0.94-0.99x at 4k (runs 17, 28), 0.99-1.07x at 8k, 1.01-1.04x at 16k
# (run 17); D=128 without causal 0.93-1.03x, a coin toss. At D=96, where the Gluon
# forward's products skip the tile's last 32 columns (hopper_forward.split_columns),
# against sdpa_cudnn (`attnkit bench --preset core`, run 64, two runs): without causal
# 0.98-1.02x at 1k, 1.04-1.05x at 4k, 1.03-1.06x at 16k; causal 0.93-0.95x at 1k, 1.01-1.02x
# at 4k, 1.09-1.16x at 16k. So it leads from these lengths (Sq and Skv both; measured
# where they are equal) per (head dim, causal), and nowhere else. With gradients to
# compute, cuDNN's backward is faster than this file's at D=64 and 128 (0.68-0.93x
# forward+backward), so SDPA keeps those calls (_LEADS_WITH_GRADS_REACH, below, has
# D=192's and 256's).
_LEADS_REACH: dict[tuple[int, bool], Reach] = {(64, False): (2048, 2048),
                                               (64, True): (8192, 8192),
                                               (96, False): (1024, 1024),
                                               (96, True): (4096, 4096),
                                               (128, True): (8192, 8192)}


# The size (B * Hq * Sq * Skv * D) from which a block of queries against a cache leads with
# gradients to compute. Forward+backward through autograd, host time included (H200,
# bf16, D=64/80/128, 17 shapes, run 57: h200-logs/fb-blocks-run57.log): from 2^34, SDPA's
# flash kernel on its own causal took 1.26-1.84x this file's time (5 shapes); below,
# 0.39-1.05x, where this file's ~0.6-0.9 ms of host time a step (SDPA's ~0.3) outweighs
# its shorter kernels (0.48-0.82x SDPA's GPU time, run 57 call 5).
_BLOCK_WITH_GRADS_SIZE = 2**34

# With gradients to compute, where the Gluon forward runs the call and the Gluon dQ and
# dK/dV kernels are on (their reach at D=256 is the forward's), from these lengths per
# (head dim, causal). Forward+backward through autograd, host time included, against
# sdpa_cudnn, which plain SDPA ran there (`attnkit bench --preset core`, H200, bf16, run
# 61, B*S = 16k tokens; h200-core-bf16-d256-s*-run61b):
# D=256 without causal 1.12x at 1k and 4k, 1.18x at 16k; causal 1.09x at 4k, 1.10x at
# 16k, but 0.92x at 1k; at 2k 1.11x and causal 1.09x (run 62,
# h200-core-bf16-d256-s2048-run62). D=192 at 4k, with the products split (run 64,
# h200-core-bf16-d192-s4096-run64): 1.15-1.16x, causal 1.13x; not measured shorter.
# At D=96 0.92-1.07x, a coin toss; at D=64 and 128 cuDNN's backward is faster.
_LEADS_WITH_GRADS_REACH: dict[tuple[int, bool], Reach] = {(192, False): (4096, 4096),
                                                          (192, True): (4096, 4096),
                                                          (256, False): (1024, 1024),
                                                          (256, True): (2048, 2048)}

# With gradients and dropout, where the Gluon dQ and dK/dV kernels run the call (after
# this file's forward: the Gluon forward does not drop), from these lengths per (head
# dim, causal). Forward+backward through autograd, host time included, dropout 0.1,
# against SDPA (cuDNN there), H200, bf16, two runs of benchmarks/dropout_step.py (run 63,
# dropout_step_h200_run63.json): D=256 1.32-1.33x at 1k, 1.41x at 4k, causal 1.16-1.22x
# at 1k, 1.29-1.30x at 2k, 1.34x at 4k; D=192 causal 4k 0.98-0.99x, D=128 0.86-0.91x.
_LEADS_WITH_DROPOUT_REACH: dict[tuple[int, bool], Reach] = {(256, False): (1024, 1024),
                                                            (256, True): (1024, 1024)}


def _leads(call: AttentionCall) -> bool:
    """Whether impl="auto" should try this backend before SDPA: a block of queries against
    a cache (_leads_a_block), with gradients to compute only from _BLOCK_WITH_GRADS_SIZE
    up; or a call that the Gluon forward runs, with the Sq and Skv for its head dim and
    causality of _LEADS_REACH, and where it has gradients to compute, of
    _LEADS_WITH_GRADS_REACH and with both Gluon backward kernels running it (its dout taken
    to be laid out as q); or with gradients and dropout, a call of
    _LEADS_WITH_DROPOUT_REACH's lengths whose backward both Gluon kernels run."""
    key = (call.head_dim, call.causal)
    if call.needs_grad:
        size = call.batch * call.heads_q * call.seq_q * call.seq_kv * call.head_dim
        if size >= _BLOCK_WITH_GRADS_SIZE and _leads_a_block(call):
            return True
        # Both Gluon backward kernels, after the Gluon forward, or with dropout (which it
        # does not draw) after this file's.
        dropout = call.dropout_p > 0.0
        reach = (_LEADS_WITH_DROPOUT_REACH if dropout else _LEADS_WITH_GRADS_REACH).get(key)
        return (_reaches(call, reach) and (dropout or _uses_hopper_forward(call))
                and _uses_hopper_backward(call, call.q, call.q) == (True, True))
    # The cheap checks first: auto asks this of every call, short ones (decoding) above all.
    return (_leads_a_block(call) or _leads_a_wide_step(call)
            or (_reaches(call, _LEADS_REACH.get(key)) and _uses_hopper_forward(call)))


def _leads_a_block(call: AttentionCall) -> bool:
    """Causal with 1 < Sq < Skv, on a Hopper GPU, with no mask tensor, key lengths, window
    or dropout (none measured): a few new queries (a speculative decoding step, a chunk of
    a prefill) against a cache. attnkit's sdpa runs them on the flash kernel's own causal
    mask, aligned to the bottom right (since run 55; before, the band as a mask on the
    mem-efficient kernel, 1.6-16x this file's GPU time, run 54). That took 1.05-6.6x this
    file's forward's GPU time (H200, bf16, D=64 and 128, Skv 4k-16k, Sq 4-1024, CUDA
    graphs; 2.6-3.2x at Sq 4-16 with 128-wide heads, 2.2-6.6x at Sq 4 with 64-wide,
    1.5-1.7x at Sq 128-1024, 1.05x at Sq 64 of 32 heads against 32): run 57,
    benchmarks/results/h200-logs/lower-right-times-run57.log (run 55's, before _kv_splits
    kept to one wave of programs, had 1.06-2.9x).
    With host time (do_bench) SDPA's is the shorter call at most of those shapes: a
    decoding loop that cares is one for CUDA graphs. One query row needs no mask, and
    SDPA's flash kernel took 0.74-0.98x this file's GPU time there (run 54; 0.94-0.99x in
    run 57, decode_h200_run57.json)."""
    return (call.causal_alone and 1 < call.seq_q < call.seq_kv and call.dropout_p == 0.0
            and _on_hopper(call))


def _leads_a_wide_step(call: AttentionCall) -> bool:
    """One query row with heads wider than 128 against a cache of B*Hkv*Skv*D >=
    _WIDE_STEP_SIZE, on a Hopper GPU, with no mask tensor, key lengths, window or dropout,
    nothing to differentiate: a decoding step of a model with wide heads, which this
    file's forward runs on its tile for few rows (_WIDE_DECODE_ROWS). By GPU time (CUDA
    graphs, H200, bf16, run 58: decode_h200_run58.json, h200-logs/decode-wide-run58.json),
    SDPA's flash kernel took 1.20-1.51x this file's time on 9 such steps at D=256 and 192
    (16/8, 32/16 and 16/16 heads, b1-b16, 4k-32k keys), and the same time (1.00x) on a
    smaller cache (MQA, 8.4M elements), 0.73x on 2.1M (1k keys). With host time (do_bench)
    SDPA's call is the shorter at most of them, as at _leads_a_block's."""
    width = max(call.head_dim, call.head_dim_v)
    return (call.seq_q == 1 and width > _WIDE_HEAD
            and call.batch * call.heads_kv * call.seq_kv * width >= _WIDE_STEP_SIZE
            and not call.has_mask and call.dropout_p == 0.0 and _on_hopper(call))


_WIDE_STEP_SIZE = 2**24  # B*Hkv*Skv*D: b1, 8 kv heads of 256 against 8k keys (1.31x)


# Key splits for calls with few query rows (decoding against a cache): the forward's grid
# is (query blocks, B * Hq), which for one query row is B * Hq programs, a fraction of a
# GPU's multiprocessors, each walking every key. Split, each range of keys gets its own
# programs. Each range is a multiple of _SPLIT_ALIGN keys (of every BLOCK_N, so that no
# key block straddles two ranges) and at least _SPLIT_KEYS long, or _SHORT_SPLIT_KEYS
# where longer ranges would leave most multiprocessors idle (short caches, NOTES run 13).
_SPLIT_ALIGN = 128  # the widest BLOCK_N
_MIN_BLOCK_M = 64  # the smallest BLOCK_M on a GPU for heads up to _WIDE_HEAD wide
_SPLIT_KEYS = 1024
_SHORT_SPLIT_KEYS = 256
_MAX_SPLITS = 64


_multiprocessors = hopper_forward.multiprocessors


def _key_ranges(seq_kv: int, wanted: int, config: TileConfig | None) -> tuple[int, int]:
    """(ranges, keys per range) for about `wanted` ranges of multiples of _SPLIT_ALIGN
    keys; (1, 0) for the whole range at once (0: the kernel does not read it, and a
    constant keeps the launch's specialization one)."""
    size = _cdiv(_cdiv(seq_kv, wanted), _SPLIT_ALIGN) * _SPLIT_ALIGN
    ranges = _cdiv(seq_kv, size)
    if ranges == 1 or (config is not None and size % config[1]):
        return 1, 0  # (a key block wider than _SPLIT_ALIGN would straddle two ranges)
    return ranges, size


def _default_key_ranges(call: AttentionCall) -> int:
    """How many key ranges _forward runs `call` in when given no splits, packing or tile
    (1: all keys at once, which the Gluon forward takes where it runs)."""
    return _key_ranges(call.seq_kv, _kv_splits(call, _packs_group(call)), None)[0]


def _packs_group(call: AttentionCall) -> bool:
    """Whether the forward packs a kv group's query heads into the rows of one tile: with
    fewer query rows than the smallest tile (decoding), a tile per query head would
    leave most of its rows empty and load the group's K/V once per query head."""
    return call.grouped and call.seq_q < _MIN_BLOCK_M


def _query_rows(call: AttentionCall, packed: bool) -> tuple[int, int]:
    """(row groups, rows in each) of the forward: its grid's axis 1 runs over the groups,
    (batch, query head), or (batch, kv head) when packed (_packs_group), and axis 0 over
    tiles of each group's rows."""
    if packed:
        return call.batch * call.heads_kv, call.group * call.seq_q
    return call.batch * call.heads_q, call.seq_q


def _kv_splits(call: AttentionCall, packed: bool) -> int:
    """How many key ranges to run apart: as many programs as fit two per multiprocessor,
    and no more, when the query rows alone give fewer than one each; 1 otherwise, and on
    the CPU. Past two per multiprocessor the programs left over run as a second, mostly
    idle wave: on the H200, 320 programs took 1.20x the time of 256 (b8 h32/8 against 16k
    keys, 5 ranges against 4), 288 took 1.17x (h32, 9 against 8), where counts inside one
    wave differed by 1-3% (run 57). Ranges keep _SPLIT_KEYS keys at least, unless that
    leaves fewer programs than half the multiprocessors: then shorter ones, down to
    _SHORT_SPLIT_KEYS, for one program per multiprocessor (on the H100, b1 h32/8 against
    4k keys: 9.6 against 16.5 us with 4 ranges). packed: the rows are a kv group's
    (_packs_group)."""
    if call.device.type != "cuda":
        return 1
    row_groups, rows = _query_rows(call, packed)
    programs = row_groups * _cdiv(rows, _MIN_BLOCK_M)
    sms = _multiprocessors(call.device)
    if programs >= sms:
        return 1
    ranges = min(2 * sms // programs, call.seq_kv // _SPLIT_KEYS)
    if ranges * programs < sms // 2:
        ranges = max(ranges, min(_cdiv(sms, programs), call.seq_kv // _SHORT_SPLIT_KEYS))
    return max(1, min(ranges, _MAX_SPLITS))


@_on_call_device
def _backward(call: AttentionCall, seed: int | Tensor, out: Tensor, lse: Tensor, dout: Tensor,
              configs: tuple[TileConfig | None, TileConfig | None] = (None, None),
              dlse: Tensor | None = None):
    """dq, dk, dv; configs: the (dK/dV kernel, dQ kernel) tile configs, None = autotuned;
    dlse: the gradient of lse (B, Hq, Sq), or None for none.

    d lse / d s = P, so dlse joins dS = P * (dP - delta) as delta - dlse. The kernels are
    left as they are: the dK/dV kernel reads delta from memory after the dQ kernel wrote
    it, so delta is lowered in between; dQ's share, scale * dlse * (P K), is a forward
    with k for the values, added after."""
    delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
    dq, dk, dv = _empty_grads(call.q, call.k, call.v)
    dkdv_gluon, dq_gluon = _uses_hopper_backward(call, out, dout)
    # The Triton kernels' shared arguments are worked out only where one of them runs:
    # this Python runs on autograd's worker thread, where it cost ~1.3-2.2x its time on
    # the calling thread on the H200's host (NOTES, runs 31-32).
    meta, shared = _meta(call, seed), None
    head_group = meta[1]["HEAD_GROUP"]
    if not (dq_gluon or dkdv_gluon) and configs == (None, None):
        shared = _backward_shared(call, meta, lse, dout)
        if (_bwd_dkdv_kernel, shared[-1]) not in _CHOSEN:  # a first backward: build both
            _build_lone_rounds(_dq_launch(call, shared, out, lse, dout, delta, dq),
                               _dkdv_launch(call, shared, lse, dout, delta, dk, dv))
    if not (configs[1] is None and dq_gluon
            and _ran_on_gluon("_HOPPER_DQ", "dQ kernel", lambda: _launch_gluon_dq(
                call, seed, head_group, out, lse, dout, delta, dq))):
        shared = shared or _backward_shared(call, meta, lse, dout)
        _launch_dq(call, shared, out, lse, dout, delta, dq, configs[1])
    if dlse is not None:
        delta.sub_(dlse)
    if not (configs[0] is None and dkdv_gluon
            and _ran_on_gluon("_HOPPER_DKDV", "dK/dV kernel", lambda: _launch_gluon_dkdv(
                call, seed, head_group, lse, dout, delta, dk, dv))):
        shared = shared or _backward_shared(call, meta, lse, dout)
        _launch_dkdv(call, shared, lse, dout, delta, dk, dv, configs[0])
    if dlse is not None:
        pk, _ = _forward(dataclasses.replace(call, v=call.k, dropout_p=0.0), 0)  # P K
        dq.add_((pk.float() * (dlse.unsqueeze(-1) * call.scale)).to(dq.dtype))
    return dq, dk, dv


def _backward_builds(call: AttentionCall, seed: int | Tensor, out: Tensor,
                     lse: Tensor) -> list[tuple]:
    """The builds (as _build_ahead takes them) of the backward's kernels that are not
    built yet: the candidates of its Triton kernels not tuned yet, and its Gluon kernels
    not launched yet, for a forward's first launch to build alongside its own: a first
    forward+backward then waits for one round of builds, not two. None at all where the
    backward cannot be foreseen: it builds its kernels when it runs, and meets any error
    there, as it would have without this."""
    try:
        triton_launches, gluon_launches = _stand_in_backward(call, seed, out, lse)
        return (_untuned_builds(*triton_launches, lone_only=False)
                + _unlaunched_builds(gluon_launches))
    except Exception:  # noqa: BLE001 - an optimization only; the backward decides
        return []


class _Collector(list):
    """A launcher (called as _launch_jitted is) that launches nothing: it keeps each
    launch (jitted, grid, args, constexprs, options)."""

    def __call__(self, *launch) -> None:
        self.append(launch)


def _stand_in_backward(call: AttentionCall, seed: int | Tensor, out: Tensor,
                       lse: Tensor) -> tuple[list[tuple], list[tuple]]:
    """The backward's launches as a forward can foresee them: its Triton ones (as _launch
    takes them) and its Gluon ones (as _launch_jitted takes them), with stand-ins for the
    tensors that do not exist yet: out for the gradient (the layout a gradient usually
    has, or one that specializes the same: randn_like's, the output projection's, a
    contiguous one with a head dim that is a multiple of 16; a gradient that differs
    builds its own in the backward), lse for delta, and tensors on the meta device for
    dq, dk, dv, of which a build reads the dtype, strides and address (0: aligned) only."""
    dkdv_gluon, dq_gluon = _uses_hopper_backward(call, out, out)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device="meta")
                  for t in (call.q, call.k, call.v))
    meta = _meta(call, seed)
    shared = _backward_shared(call, meta, lse, out)
    gluon, head_group = _Collector(), meta[1]["HEAD_GROUP"]
    if dq_gluon:
        _launch_gluon_dq(call, seed, head_group, out, lse, out, lse, dq, launcher=gluon)
    if dkdv_gluon:
        _launch_gluon_dkdv(call, seed, head_group, lse, out, lse, dk, dv, launcher=gluon)
    return ([] if dq_gluon else [_dq_launch(call, shared, out, lse, out, lse, dq)]) + (
        [] if dkdv_gluon else [_dkdv_launch(call, shared, lse, out, lse, dk, dv)]), list(gluon)


def _backward_shared(call: AttentionCall, meta: tuple[tuple, dict], lse: Tensor,
                     dout: Tensor) -> tuple:
    """What the two backward kernels' launches share, worked out once per backward: the
    scalar arguments after the sizes, the flags, the mask and its strides, the key
    lengths (or a stand-in the kernels do not read) and the tuning key."""
    (left, right, qk_scale, seed, drop_p, *buckets), flags = meta
    mask, mask_strides = _mask_args(call)
    lengths = call.key_lengths if call.key_lengths is not None else lse
    scalars = (left, right, qk_scale, call.scale, seed, drop_p, *buckets)
    return (scalars, flags, mask, mask_strides, lengths,
            _tune_key(flags, buckets, seed, call.q, dout, mask, lengths))


def _launch_dq(call: AttentionCall, shared: tuple, out: Tensor, lse: Tensor, dout: Tensor,
               delta: Tensor, dq: Tensor, config: TileConfig | None = None) -> None:
    """The dQ kernel: dq, and delta = rowsum(out * dout) for the dK/dV kernel."""
    _launch(*_dq_launch(call, shared, out, lse, dout, delta, dq), config)


def _dq_launch(call: AttentionCall, shared: tuple, out: Tensor, lse: Tensor, dout: Tensor,
               delta: Tensor, dq: Tensor) -> tuple:
    """The dQ kernel's launch as _launch takes it: kernel, grid, args, flags, tune key."""
    scalars, flags, mask, mask_strides, lengths, tune_key = shared
    q, k, v = call.q, call.k, call.v
    B, Hq, Sq, _ = q.shape
    return _bwd_dq_kernel, lambda meta: (_cdiv(Sq, meta["BLOCK_M"]), B * Hq), (
        q, k, v, out, dout, lse, delta, dq, mask, lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        *mask_strides, Hq, call.group, Sq, call.seq_kv, *scalars,
    ), flags, tune_key


def _launch_gluon_dq(call: AttentionCall, seed: int | Tensor, head_group: int, out: Tensor,
                     lse: Tensor, dout: Tensor, delta: Tensor, dq: Tensor,
                     launcher: Callable | None = None) -> None:
    """The Gluon dQ kernel (hopper_backward.launch_dq): dq, and delta for the dK/dV
    kernel, as _launch_dq writes them. launcher: _launch_jitted's stand-in (None: it)."""
    hopper_backward.launch_dq(call.q, call.k, call.v, out, dout, lse, delta, dq,
                              call.key_lengths, call.causal, call.scale, seed, call.dropout_p,
                              head_group=head_group,
                              launcher=_launch_jitted if launcher is None else launcher)


def _launch_gluon_dkdv(call: AttentionCall, seed: int | Tensor, head_group: int, lse: Tensor,
                       dout: Tensor, delta: Tensor, dk: Tensor, dv: Tensor,
                       launcher: Callable | None = None) -> None:
    """The Gluon dK/dV kernel (hopper_backward.launch_dkdv), reading the delta that the
    dQ kernel wrote. launcher: _launch_jitted's stand-in (None: it)."""
    hopper_backward.launch_dkdv(call.q, call.k, call.v, dout, lse, delta, dk, dv,
                                call.key_lengths, call.causal, call.scale, seed,
                                call.dropout_p, head_group=head_group,
                                launcher=_launch_jitted if launcher is None else launcher)


def _launch_dkdv(call: AttentionCall, shared: tuple, lse: Tensor, dout: Tensor,
                 delta: Tensor, dk: Tensor, dv: Tensor, config: TileConfig | None = None
                 ) -> None:
    """The dK/dV kernel, reading the delta that _launch_dq wrote."""
    _launch(*_dkdv_launch(call, shared, lse, dout, delta, dk, dv), config)


def _dkdv_launch(call: AttentionCall, shared: tuple, lse: Tensor, dout: Tensor,
                 delta: Tensor, dk: Tensor, dv: Tensor) -> tuple:
    """The dK/dV kernel's launch as _launch takes it: kernel, grid, args, flags, tune key."""
    scalars, flags, mask, mask_strides, lengths, tune_key = shared
    q, k, v = call.q, call.k, call.v
    B, Hq, Sq, _ = q.shape
    return _bwd_dkdv_kernel, lambda meta: (_cdiv(call.seq_kv, meta["BLOCK_N"]),
                                           B * call.heads_kv), (
        q, k, v, dout, lse, delta, dk, dv, mask, lengths,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *mask_strides, Hq, call.heads_kv, call.group, Sq, call.seq_kv, *scalars,
    ), {**flags, "GROUPED": call.grouped}, tune_key


# ---------------------------------------------------------------------------------------
# The kernels as torch.library custom ops, so that torch.compile(fullgraph=True) keeps
# them in its graph: the fake kernels give compile the output shapes and strides without
# running Triton. Options travel as flat arguments (a window side of -1 is unbounded);
# the dropout seed is a 0-d int64 tensor drawn by the caller (run: on the call's device),
# so each op is a pure function of its inputs and the draw itself stays traceable (an int
# would need .item()).
# ---------------------------------------------------------------------------------------
_OPTIONS = ("Tensor? key_lengths, Tensor? attn_mask, bool causal, int window_left, "
            "int window_right, float scale, float dropout_p, Tensor? seed")


def _kernel_seed(seed: Tensor | None, device: torch.device) -> int | Tensor:
    """The dropout seed as the kernels take it: 0 without dropout; the tensor itself on
    the call's device, where the kernels read it; a seed held elsewhere (a CPU seed with a
    GPU call) by value, read on the host without waiting on a GPU."""
    if seed is None:
        return 0
    return seed if seed.device == device else int(seed)


def _op_call(q, k, v, key_lengths, attn_mask, causal, window_left, window_right, scale,
             dropout_p) -> AttentionCall:
    """The AttentionCall back from an op's flat arguments (already validated once)."""
    window = (None if window_left < 0 else window_left,
              None if window_right < 0 else window_right)
    return AttentionCall(
        q=q, k=k, v=v, causal=causal, key_lengths=key_lengths, attn_mask=attn_mask,
        window=None if window == (None, None) else window, scale=scale,
        dropout_p=dropout_p, return_lse=False,
    )


@torch.library.custom_op(
    "attnkit::triton_attention_fwd", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}) -> (Tensor, Tensor)",
)
def _attention_fwd(q, k, v, key_lengths, attn_mask, causal, window_left, window_right,
                   scale, dropout_p, seed):
    """-> out (B, Hq, Sq, Dv), a view of a (B, Sq, Hq, Dv) buffer; lse (B, Hq, Sq) float32."""
    call = _op_call(q, k, v, key_lengths, attn_mask, causal, window_left, window_right,
                    scale, dropout_p)
    return _forward(call, _kernel_seed(seed, q.device))


@_attention_fwd.register_fake
def _(q, k, v, *options):
    return _empty_outputs(q, v)


@torch.library.custom_op(
    "attnkit::triton_attention_bwd", mutates_args=(),
    schema=f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)
def _attention_bwd(dout, dlse, q, k, v, out, lse, key_lengths, attn_mask, causal, window_left,
                   window_right, scale, dropout_p, seed):
    """-> dq, dk, dv, contiguous, shaped like q, k, v; dlse: lse's gradient, or None."""
    call = _op_call(q, k, v, key_lengths, attn_mask, causal, window_left, window_right,
                    scale, dropout_p)
    return _backward(call, _kernel_seed(seed, q.device), out, lse, dout, dlse=dlse)


@_attention_bwd.register_fake
def _(dout, dlse, q, k, v, *rest):
    return _empty_grads(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_lengths, attn_mask, *options, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, attn_mask, seed)
    ctx.options = options  # causal, window_left, window_right, scale, dropout_p
    # lse's gradient stays None where no loss reaches lse (traced graphs too), which spares
    # the backward the forward that dQ's share of one costs (_backward). An lse returned
    # from a compiled region gets a zero tensor instead, and pays that forward.
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    forbid_second_derivative("triton")
    q, k, v, out, lse, key_lengths, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, dlse, q, k, v, out, lse, key_lengths, attn_mask,
                                *ctx.options, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same kernels as the custom ops, for eager calls that need gradients, without
    the op dispatcher (eager calls with nothing to differentiate call _forward alone).

    At small sizes the GPU waits on host time, and a custom op with autograd costs about
    three times an autograd.Function per call (CPU machine, torch 2.13: 51 against 16 us
    with gradients, 23 against 12 without). torch.compile gets the custom ops instead,
    which it can trace.
    """

    @staticmethod
    def forward(ctx, q, k, v, call: AttentionCall, seed: int | Tensor):
        out, lse = _forward(call, seed, grads_follow=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.seed = call, seed
        # A gradient nobody sent stays None: lse's, most of the time, which materialized
        # would cost every backward a zero-filled (B, Hq, Sq) tensor and a forward more.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        forbid_second_derivative("triton")
        if dout is None and dlse is None:
            return None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # a loss through lse alone
            dout = torch.zeros_like(out)
        call = ctx.call
        # The same tensors as the call's unless saved-tensor hooks gave back new ones; the
        # test first, since a replace costs ~3 us of the backward's host time.
        if not (q is call.q and k is call.k and v is call.v):
            call = dataclasses.replace(call, q=q, k=k, v=v)
        return (*_backward(call, ctx.seed, out, lse, dout, dlse=dlse), None, None)


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------
# The oldest Triton each path was seen to work with (run 50, on the CPU machine): the
# kernels compile for sm_90 from 3.4 on (3.3 has no tl.make_tensor_descriptor; GPUs have
# run them with 3.6), and the CPU interpreter runs them from 3.7 on (up to 3.6 it fails to
# take a loop bound it holds as a one-element array).
OLDEST_TRITON = {"cuda": (3, 4), "cpu": (3, 7)}


def too_old_triton(device_type: str) -> str | None:
    """Why the installed Triton is older than OLDEST_TRITON's for device_type, or None."""
    oldest = OLDEST_TRITON.get(device_type)
    if oldest is None or _triton_at_least(*oldest):
        return None
    where = "on a GPU" if device_type == "cuda" else "under its CPU interpreter"
    return f"needs Triton >= {oldest[0]}.{oldest[1]} {where}, found {triton.__version__}"


def available(device: torch.device) -> str | None:
    if triton is None:
        return "needs the optional dependency triton (pip install attnkit[triton])"
    if old := too_old_triton(device.type):
        return old
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRET:
        return None
    return (f"needs a CUDA device (or TRITON_INTERPRET=1 set before importing triton, to "
            f"run on the CPU through Triton's interpreter), got {device.type}")


def supports(call: AttentionCall) -> str | None:
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 inputs, got {str(call.dtype).removeprefix('torch.')}"
    if call.dtype == torch.bfloat16 and call.device.type == "cpu":
        # Triton's interpreter multiplies the raw bits of bfloat16 in tl.dot
        # (triton-lang/triton#11584), so its answers would be garbage.
        return "bfloat16 does not run under Triton's CPU interpreter; use float16 there"
    for name, d in (("head_dim", call.head_dim), ("head_dim of v", call.head_dim_v)):
        if not 16 <= d <= 256:
            return f"{name} must lie in [16, 256], got {d}"
    if call.heads_q > GRID_ROWS:
        return f"takes at most {GRID_ROWS} query heads, got {call.heads_q}"
    if call.attn_mask is not None and call.attn_mask.requires_grad:
        return "computes no gradient for attn_mask, which requires grad"
    if call.carries_tangents:  # the kernels would drop them silently
        return NO_FORWARD_AD
    return None


def run(call: AttentionCall) -> Result:
    B, Hq, Sq, _ = call.q.shape
    if B * Hq * Sq == 0 or call.seq_kv == 0:
        out = call.q.new_zeros(B, Hq, Sq, call.head_dim_v)
        lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float32, device=call.device)
        # Keeps the graph connected so that backward gives zero gradients.
        out = out + 0 * (call.q.sum() + call.k.sum() + call.v.sum())
        return out, lse
    if B * Hq > GRID_ROWS:
        # Every kernel here but the Gluon forward lays (batch, query head) rows along a
        # grid's second dimension: past GRID_ROWS, launches raised "invalid argument"
        # (an H200, run 49), 65536 rows included.
        return in_batch_pieces(call, GRID_ROWS // Hq, run)
    # Dropout's Philox seed comes from torch's generator on the call's device, so
    # torch.manual_seed repeats it; the kernels read it from memory, so each replay of a
    # captured CUDA graph draws a new one (a seed passed by value would be captured once).
    seed = torch.randint(0, 2**31 - 1, (), device=call.device) if call.dropout_p else None
    if not torch.compiler.is_compiling():
        seed = 0 if seed is None else seed
        if not (torch.is_grad_enabled()
                and (call.q.requires_grad or call.k.requires_grad or call.v.requires_grad)):
            # Nothing to differentiate (inference, decoding): an autograd.Function would
            # only add its own host time: 11-18 us a call on the CPU machine (launches
            # stubbed as in benchmarks/host_stub.py, the two paths timed in turns).
            return _forward(call, seed)
        return _EagerAttention.apply(call.q, call.k, call.v, call, seed)
    left, right = call.window or (None, None)
    return _attention_fwd(
        call.q, call.k, call.v, call.key_lengths, call.attn_mask, call.causal,
        -1 if left is None else left, -1 if right is None else right, call.scale,
        call.dropout_p, seed,
    )


BACKEND = Backend(
    name="triton",
    summary="fused Triton kernels (FlashAttention-2 style forward and backward; on "
            f"Hopper, Gluon kernels for long sequences on tiles of {_widths_text(_tile_widths())} "
            f"columns (head dims {_gluon_dims_text()}): the forward, dK/dV, and dQ from 72)",
    available=available,
    supports=supports,
    run=run,
    details=_details,
    leads=_leads,
)
