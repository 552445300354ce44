"""`attnkit bench`: every implementation side by side on one problem, on this machine.

Three presets:
- notebook: the notebook's comparison, x (8, 1024, 768), 12 heads, causal, through every
  textbook variant and `MultiHeadAttention(impl=...)` per backend, all on one set of weights.
- bert: the ttnn tutorial's BERT attention, x (8, 384, 1024), 16 heads of 64, QKV biases,
  an additive (B, 1, 1, S) padding mask, not causal; the same implementations.
- core: the functional backends alone on q, k, v over S = 512 .. 16k, D = 64 / 128, causal
  and not, with B*S = 16k tokens and H*D = 2048 (the flash-attention benchmark's sizing,
  so the work per call grows with S only through the S^2 term), and `auto`: whatever
  impl="auto" picks for the call (recorded as `picked`; beside that backend's own row it
  is an A/A test of the timing). With key_lengths, each batch element hides its keys
  past a length drawn in [S/2, S] (padded batches).

Per implementation: the first call (cold: compilation, autotuning, caches), the warm
median forward (under no_grad) and forward+backward, peak memory (GPU), TFLOP/s, the
share of this device's measured matmul rate, speed-ups, and the relative error against
the float64 oracle on the same inputs and weights. The warm times of one config's
implementations are taken in turns, ROUNDS (3; `--rounds`) times over, and each reported
time is the median of its rounds: a GPU's clocks drift over the seconds one config takes,
and timing the implementations one after the other would hand that drift to the
comparison. How far the rounds disagreed is kept too (`fwd_spread`, `fwd_bwd_spread`).

A slow CPU gets the `--quick` sizes by default (printed at the start); `--full` forces the
presets' own sizes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.markup import escape
from torch import Tensor

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "PRESETS",
    "BenchRun",
    "Config",
    "Measurement",
    "attention_flops",
    "config_flops",
    "environment",
    "preset_configs",
    "print_results",
    "run_bench",
    "write_outputs",
]

PRESETS = ("notebook", "bert", "core")

# The presets' own sizes, and the --quick ones that a 2-core CPU finishes in minutes.
_MODULE_SIZES = {
    # preset: (batch, seq, d_model, heads, causal, qkv_bias, mask)
    "notebook": (8, 1024, 768, 12, True, False, None),
    "bert": (8, 384, 1024, 16, False, True, "padding"),
}
_MODULE_QUICK = {"notebook": (2, 256), "bert": (2, 128)}
_CORE_SEQS, _CORE_QUICK_SEQS = (512, 1024, 2048, 4096, 8192, 16384), (128, 256, 512)
_CORE_HEAD_DIMS, _CORE_QUICK_HEAD_DIMS = (64, 128), (64,)
_CORE_TOKENS, _CORE_QUICK_TOKENS = 16384, 1024  # B * S
_CORE_WIDTH, _CORE_QUICK_WIDTH = 2048, 256  # H * D

# The float64 oracle materializes (b, h, S, S) scores a few times over; past this many
# elements (1 GiB per copy) it runs on a slice of the batch / heads and says so.
_ORACLE_BUDGET = 2**27

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Config:
    """One problem size. d_model is None for the functional core (q, k, v given directly)."""

    preset: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    causal: bool
    d_model: int | None = None
    qkv_bias: bool = False
    mask: str | None = None  # "padding" (module presets) or "lengths" (core: key_lengths)

    @property
    def is_module(self) -> bool:
        return self.d_model is not None

    @property
    def label(self) -> str:
        from attnkit.verify import problem_label

        if self.is_module:
            sizes = [f"b{self.batch}", f"s{self.seq}", f"d{self.d_model}", f"h{self.heads}"]
        else:
            sizes = [f"b{self.batch}", f"h{self.heads}", f"s{self.seq}", f"d{self.head_dim}"]
        return problem_label(sizes, self.causal, self.qkv_bias, self.mask)


def preset_configs(
    preset: str, *, quick: bool = False, batch: int | None = None, seq: int | None = None,
    head_dim: int | None = None, key_lengths: bool = False,
) -> list[Config]:
    """The configs of `preset`; batch / seq override the preset's (seq: one S for core).
    Core only: head_dim runs that head dim alone, with heads = the preset's H * D // D;
    key_lengths gives every config key lengths (mask "lengths")."""
    for name, value in (("head_dim", head_dim), ("key_lengths", key_lengths or None)):
        if value is not None and preset != "core":
            raise ValueError(f"{name} applies to the core preset only, not {preset!r}")
    if preset in _MODULE_SIZES:
        b, s, d, h, causal, bias, mask = _MODULE_SIZES[preset]
        if quick:
            b, s = _MODULE_QUICK[preset]
        return [Config(preset, batch or b, seq or s, h, d // h, causal, d, bias, mask)]
    if preset != "core":
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    seqs = (seq,) if seq else _CORE_QUICK_SEQS if quick else _CORE_SEQS
    head_dims = (head_dim,) if head_dim else _CORE_QUICK_HEAD_DIMS if quick else _CORE_HEAD_DIMS
    tokens, width = (_CORE_QUICK_TOKENS, _CORE_QUICK_WIDTH) if quick else (
        _CORE_TOKENS, _CORE_WIDTH)
    if head_dim is not None and not 0 < head_dim <= width:
        raise ValueError(f"head_dim must lie in [1, {width}] (the core width H * D), "
                         f"got {head_dim}")
    return [
        Config("core", batch or max(1, tokens // s), s, width // d, d, causal,
               mask="lengths" if key_lengths else None)
        for d in head_dims
        for causal in (False, True)
        for s in seqs
    ]


# --------------------------------------------------------------------------- FLOPs


def attention_flops(
    batch: int, heads_q: int, seq_q: int, seq_kv: int, head_dim: int, causal: bool
) -> float:
    """Forward FLOPs of the attention core: two matmuls, 4*B*Hq*Sq*Skv*D.

    Halved for causal attention with Sq == Skv (half the scores are masked), whether or not
    an implementation skips the masked half: the count is of useful work.
    """
    flops = 4.0 * batch * heads_q * seq_q * seq_kv * head_dim
    return flops / 2 if causal and seq_q == seq_kv else flops


def config_flops(config: Config) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of one call.

    The backward of attention costs 2.5x its forward (five matmuls against two; 3.5x in
    all). Module presets count the projections too: 2*B*S*d*3d for QKV and 2*B*S*d*d for
    the output, whose backward costs 2x the forward (3x in all).
    """
    c = config
    attn = attention_flops(c.batch, c.heads, c.seq, c.seq, c.head_dim, c.causal)
    if not c.is_module:
        return attn, 3.5 * attn
    proj = 8.0 * c.batch * c.seq * c.d_model * c.d_model
    return attn + proj, 3.5 * attn + 3.0 * proj


# --------------------------------------------------------------------------- timing


class Clock:
    """Cold and warm timings, in milliseconds, the right way for each device.

    CPU: torch.utils.benchmark.Timer.blocked_autorange (median of blocks). GPU:
    triton.testing.do_bench (median; it flushes the L2 cache between calls), or CUDA
    events when Triton is not installed.
    """

    def __init__(self, device: torch.device, min_run_time: float = 0.5) -> None:
        self.device = device
        self.min_run_time = min_run_time

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def median(self, fn: Callable[[], object], mode: str = "median",
               share: float = 1.0, warmed: bool = False) -> float:
        """Warm median time of fn() (mode="min": the fastest, for a peak rate), timed for
        `share` of the usual time (one of several rounds); warmed: fn ran already, the
        CPU's warm-up call is left out."""
        if self.device.type == "cuda":
            try:
                from triton.testing import do_bench
            except ImportError:
                return self._cuda_events(fn, mode, reps=max(5, round(30 * share)))
            return float(do_bench(fn, warmup=10 if warmed else 25, rep=100 * share,
                                  return_mode=mode))
        from torch.utils.benchmark import Timer

        if not warmed:
            fn()  # warm-up: allocator caches, lazy initialization, a second compile
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        measured = timer.blocked_autorange(min_run_time=self.min_run_time * share)
        return (measured.median if mode == "median" else min(measured.times)) * 1e3

    def _cuda_events(self, fn: Callable[[], object], mode: str, reps: int = 30) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times) if mode == "median" else min(times)

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        """Memory `fn` allocates beyond what was live before it (GPU); None on the CPU.

        The CPU has no allocator statistics that count only this process's tensors, and an
        RSS difference mostly measures the allocator's caching, so it is not reported.
        """
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, clock: Clock) -> float:
    """This device's measured matmul rate in `dtype` (under the current TF32 setting).

    The fastest of the timed runs, not the median: a peak is what the device can do, and
    on a shared CPU the median would be dragged down by whatever else runs.
    """
    n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = clock.median(lambda: a @ b, mode="min")
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """What one implementation runs: forward() -> out, differentiated against `inputs`;
    picked: the backend that runs it, where the name does not say (impl="auto")."""

    forward: Callable[[], Tensor]
    inputs: list[Tensor]
    grad_out: Tensor
    picked: str | None = None

    def run_forward(self) -> Tensor:
        with torch.no_grad():
            return self.forward()

    def run_forward_backward(self) -> None:
        out = self.forward()
        torch.autograd.grad(out, self.inputs, self.grad_out)


@dataclass
class Problem:
    """One config's shared inputs and its oracle, computed once for all implementations.

    oracle(out) -> (relative error, note): compares on `oracle_slice` of the batch / heads.
    """

    config: Config
    entries: dict[str, Callable[[], Workload] | str]
    oracle: Callable[[Tensor], tuple[float, str | None]]


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
           generator: torch.Generator, grad: bool = False) -> Tensor:
    t = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def padded_lengths(batch: int, seq: int, generator: torch.Generator) -> Tensor:
    """Key lengths of a padded batch, the `lengths` mask: one per batch element, drawn
    uniformly in [seq / 2, seq] (at least 1), int64 on generator's device."""
    return torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=generator,
                         device=generator.device)


def _core_problem(config: Config, device: torch.device, dtype: torch.dtype,
                  impls: list[str] | None, exclude: list[str] | None) -> Problem:
    from attnkit.backends import BACKENDS
    from attnkit.call import make_call
    from attnkit.functional import attention, select
    from attnkit.verify import rel_err, selected

    c = config
    gen = torch.Generator().manual_seed(0)
    shape = (c.batch, c.heads, c.seq, c.head_dim)
    q, k, v = (_randn(shape, device, dtype, gen, grad=True) for _ in range(3))
    grad_out = _randn(shape, device, dtype, gen)
    lengths = None
    if c.mask == "lengths":
        lengths = padded_lengths(c.batch, c.seq, gen).to(device)

    def entry(name: str) -> Callable[[], Workload]:
        def make() -> Workload:
            picked = None
            if name == "auto":
                # what runs the forward, timed under no_grad, and what runs forward+backward
                # (a call reads grad mode when asked whether it needs gradients)
                call = make_call(q, k, v, causal=c.causal, key_lengths=lengths)
                with torch.no_grad():
                    forward = select(call)
                both = select(call)
                picked = (both.name if forward is both
                          else f"{forward.name} (forward), {both.name} (forward+backward)")
            return Workload(
                lambda: attention(q, k, v, causal=c.causal, key_lengths=lengths, impl=name),
                [q, k, v], grad_out, picked,
            )
        return make

    entries: dict[str, Callable[[], Workload] | str] = {
        name: backend.available(device) or entry(name)
        for name, backend in BACKENDS.items()
        if selected(name, impls, exclude)
    }
    if selected("auto", impls, exclude):  # what impl="auto" picks, beside the rest
        entries["auto"] = entry("auto")
    per_head = c.seq * c.seq
    nh = min(c.heads, max(1, _ORACLE_BUDGET // per_head))
    nb = min(c.batch, max(1, _ORACLE_BUDGET // (nh * per_head)))
    cache: dict[str, Tensor] = {}

    def oracle(out: Tensor) -> tuple[float, str | None]:
        if "ref" not in cache:
            sub = (slice(0, nb), slice(0, nh))
            with torch.no_grad():
                cache["ref"] = attention(
                    q[sub], k[sub], v[sub], causal=c.causal, impl="reference",
                    key_lengths=None if lengths is None else lengths[:nb])
        note = None
        if (nb, nh) != (c.batch, c.heads):
            note = f"on batch 0..{nb - 1} of {c.batch}, heads 0..{nh - 1} of {c.heads}"
        return rel_err(out[:nb, :nh], cache["ref"]), note

    return Problem(config, entries, oracle)


def _module_problem(config: Config, device: torch.device, dtype: torch.dtype,
                    impls: list[str] | None, exclude: list[str] | None) -> Problem:
    from attnkit.verify import (
        canonical_source,
        load_weights,
        module_candidates,
        module_forward,
        module_oracle,
        padding_mask,
        rel_err,
    )

    c = config
    gen = torch.Generator().manual_seed(0)
    x = _randn((c.batch, c.seq, c.d_model), device, dtype, gen, grad=True)
    grad_out = _randn((c.batch, c.seq, c.d_model), device, dtype, gen)
    mask = padding_mask(c.batch, c.seq, dtype, device, gen) if c.mask == "padding" else None
    try:
        candidates = module_candidates(
            d_model=c.d_model, heads=c.heads, seq=c.seq, causal=c.causal,
            qkv_bias=c.qkv_bias, device=device, impls=impls, exclude=exclude,
        )
        source = canonical_source(c.d_model, c.heads, causal=c.causal, qkv_bias=c.qkv_bias,
                                  dtype=dtype)
    except ImportError as exc:
        return Problem(config, {"module:*": f"module presets need {exc.name or exc}"},
                       lambda out: (math.nan, None))

    def entry(build: Callable[[], torch.nn.Module]) -> Callable[[], Workload]:
        def make() -> Workload:
            module = load_weights(source, build(), device, dtype)
            params = [p for p in module.parameters() if p.requires_grad]
            return Workload(lambda: module_forward(module, x, mask), [x, *params], grad_out)
        return make

    entries = {label: build if isinstance(build, str) else entry(build)
               for label, build in candidates.items()}
    nb = max(1, min(c.batch, _ORACLE_BUDGET // (c.heads * c.seq * c.seq)))
    cache: dict[str, Tensor] = {}

    def oracle(out: Tensor) -> tuple[float, str | None]:
        if "ref" not in cache:
            with torch.no_grad():
                cache["ref"] = module_oracle(
                    source, x[:nb], heads=c.heads, causal=c.causal,
                    attn_mask=None if mask is None else mask[:nb],
                )
        note = None if nb == c.batch else f"on batch 0..{nb - 1} of {c.batch}"
        return rel_err(out[:nb], cache["ref"]), note

    return Problem(config, entries, oracle)


# --------------------------------------------------------------------------- the run


@dataclass
class Measurement:
    """One implementation on one config. status: "ok", "unsupported" or "error".

    fwd_spread, fwd_bwd_spread: (slowest - fastest) / median of the timing rounds, how far
    the rounds behind a median disagreed. picked: the backend impl="auto" ran.
    """

    impl: str
    config: Config
    status: str = "ok"
    reason: str | None = None
    first_call_ms: float | None = None
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_fwd_mib: float | None = None
    peak_fwd_bwd_mib: float | None = None
    flops_fwd: float | None = None
    flops_fwd_bwd: float | None = None
    tflops_fwd: float | None = None
    tflops_fwd_bwd: float | None = None
    peak_frac_fwd: float | None = None
    peak_frac_fwd_bwd: float | None = None
    speedup_vs_slowest: float | None = None
    speedup_vs_sdpa: float | None = None
    rel_err: float | None = None
    rel_err_note: str | None = None
    fwd_spread: float | None = None
    fwd_bwd_spread: float | None = None
    picked: str | None = None

    @property
    def kind(self) -> str:
        return self.impl.split(":", 1)[0] if ":" in self.impl else "backend"


@dataclass
class BenchRun:
    """Everything `attnkit bench` measured, with the metadata that makes it reproducible."""

    meta: dict
    configs: list[Config]
    results: list[Measurement] = field(default_factory=list)


def _reason(exc: BaseException) -> str:
    from attnkit.call import UnsupportedError

    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, UnsupportedError):
        if text.startswith("impl="):  # drop the "impl=... cannot run <call>: " prefix
            text = text.split(": ", 1)[-1]
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        text = "out of memory"
    else:
        text = f"{type(exc).__name__}: {text}"
    return text[:240]


def _refused(exc: BaseException, prefix: str = "") -> tuple[str, str]:
    """(status, reason) of an implementation that did not run."""
    from attnkit.call import UnsupportedError

    return ("unsupported" if isinstance(exc, UnsupportedError) else "error",
            prefix + _reason(exc))


ROUNDS = 3


@dataclass
class _Timed:
    """One implementation of a config between its first call and its last round: what
    the rounds time (the workload's calls, or replays of their CUDA graphs). work is held
    for as long as the graphs are: they read its module's weights by address."""

    measurement: Measurement
    work: Workload
    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None  # None: forward+backward failed
    fwd: list[float] = field(default_factory=list)
    fwd_bwd: list[float] = field(default_factory=list)


def capture(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], object]:
    """fn recorded once as a CUDA graph: (replay, what fn returned, which each replay
    overwrites in place). fn has run eagerly before (compiles, autotuning); it runs three
    more times on a side stream first, as torch.cuda.make_graphed_callables does, so that
    lazily made state (cuBLAS workspaces, allocator blocks) is not made during the capture.

    The first of those runs raises RuntimeError if fn waits for the GPU (.item(), a copy
    to the host): such a call cannot be captured, and a capture that fails part-way
    leaves PyTorch before 2.12 allocating into the dead graph's memory pool."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), warnings.catch_warnings():
        # Its "prototype feature" warning, once per bench run, says nothing about the run
        warnings.filterwarnings("ignore", message="Synchronization debug mode")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph.replay, result


def _prepare(label: str, make: Callable[[], Workload], problem: Problem,
             clock: Clock, cuda_graphs: bool = False) -> tuple[Measurement, _Timed | None]:
    """The first call, the oracle's verdict and peak memory of one implementation; the
    warm times come from _time_rounds. None for the timing where the forward fails.
    cuda_graphs: the forward and the forward+backward are captured as CUDA graphs after
    their eager first calls, the rounds time their replays, and the oracle judges the
    replayed forward's output."""

    m = Measurement(label, problem.config)
    m.flops_fwd, m.flops_fwd_bwd = config_flops(problem.config)
    try:
        work = make()
        m.picked = work.picked
        out: list[Tensor] = []
        m.first_call_ms = clock.once(lambda: out.append(work.run_forward()))
        m.peak_fwd_mib = clock.peak_mib(work.run_forward)
        m.rel_err, m.rel_err_note = problem.oracle(out[0])
    except Exception as exc:  # one broken implementation must not end the run
        m.status, m.reason = _refused(exc)
        return m, None
    finally:
        if clock.device.type == "cuda":
            torch.cuda.empty_cache()
    forward: Callable[[], object] = work.run_forward
    if cuda_graphs:
        try:
            forward, graphed_out = capture(work.run_forward, clock.device)
            forward()
            m.rel_err, m.rel_err_note = problem.oracle(graphed_out)
        except Exception as exc:
            m.status, m.reason = _refused(exc, "CUDA graph capture: ")
            return m, None
    step = "fwd+bwd: "
    try:
        clock.once(work.run_forward_backward)  # its compiles and autotuning, untimed
        m.peak_fwd_bwd_mib = clock.peak_mib(work.run_forward_backward)
        forward_backward: Callable[[], object] = work.run_forward_backward
        if cuda_graphs:
            step += "CUDA graph capture: "
            forward_backward = capture(work.run_forward_backward, clock.device)[0]
    except Exception as exc:
        m.reason = step + _reason(exc)
        return m, _Timed(m, work, forward, None)
    return m, _Timed(m, work, forward, forward_backward)


def _time_rounds(timed: list[_Timed], clock: Clock, rounds: int = ROUNDS) -> None:
    """Warm medians of every prepared implementation, taken in turns `rounds` times; each
    measurement gets the median of its rounds."""
    for _ in range(rounds):
        for t in timed:
            m = t.measurement
            if m.status != "ok":
                continue
            try:
                t.fwd.append(clock.median(t.forward, share=1 / rounds, warmed=True))
            except Exception as exc:  # out of memory beside the others, say
                m.status, m.reason = "error", _reason(exc)
                continue
            if t.forward_backward is not None:
                try:
                    t.fwd_bwd.append(clock.median(t.forward_backward, share=1 / rounds,
                                                  warmed=True))
                except Exception as exc:
                    t.forward_backward, m.reason = None, f"fwd+bwd: {_reason(exc)}"
                    t.fwd_bwd.clear()
    for t in timed:
        m = t.measurement
        if m.status != "ok":
            continue
        m.fwd_ms, m.fwd_spread = _median_spread(t.fwd)
        m.tflops_fwd = m.flops_fwd / (m.fwd_ms * 1e-3) / 1e12
        if t.fwd_bwd:
            m.fwd_bwd_ms, m.fwd_bwd_spread = _median_spread(t.fwd_bwd)
            m.tflops_fwd_bwd = m.flops_fwd_bwd / (m.fwd_bwd_ms * 1e-3) / 1e12


def _median_spread(times: list[float]) -> tuple[float, float | None]:
    """The median of the rounds, and (max - min) / median (None for a single round)."""
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median if len(times) > 1 else None


def _baseline(labels: Iterable[str]) -> str | None:
    """The plain-SDPA entry the speed-ups are quoted against."""
    labels = list(labels)
    for name in ("sdpa", "module:sdpa"):
        if name in labels:
            return name
    return next((lb for lb in labels if "sdpa" in lb and "flash" not in lb), None)


def _speedups(results: list[Measurement], peak: float | None) -> None:
    ok = [m for m in results if m.fwd_ms is not None]
    if not ok:
        return
    slowest = max(m.fwd_ms for m in ok)
    base = _baseline(m.impl for m in ok)
    base_ms = next((m.fwd_ms for m in ok if m.impl == base), None)
    for m in ok:
        m.speedup_vs_slowest = slowest / m.fwd_ms
        m.speedup_vs_sdpa = base_ms / m.fwd_ms if base_ms else None
        if peak:
            m.peak_frac_fwd = m.tflops_fwd / peak
            if m.tflops_fwd_bwd is not None:
                m.peak_frac_fwd_bwd = m.tflops_fwd_bwd / peak


def default_device() -> torch.device:
    """The best device present: CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_bench(
    preset: str = "notebook",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    impls: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    quick: bool | None = None,
    batch: int | None = None,
    seq: int | None = None,
    head_dim: int | None = None,
    key_lengths: bool = False,
    rounds: int | None = None,
    cuda_graphs: bool = False,
    progress: bool = True,
    console: Console | None = None,
    command: str = "",
    checkpoint: Callable[[BenchRun], object] | None = None,
) -> BenchRun:
    """Measure every selected implementation on every config of `preset`.

    device defaults to CUDA when present; dtype to bfloat16 on CUDA, float32 on the CPU;
    quick=None means quick sizes on the CPU (unless batch/seq are given) and the preset's
    own sizes on a GPU. impls / exclude filter as `attnkit.verify.selected` does.
    batch, seq, head_dim and key_lengths change the preset's configs as `preset_configs`
    says. rounds: how many times the warm timings go round a config's implementations
    (default ROUNDS); more rounds split the same time finer. cuda_graphs (CUDA only):
    time replays of each implementation's forward and forward+backward captured as CUDA
    graphs, which leaves out the host's work (Python, dispatch, launches); the first call
    and peak memory stay eager.
    checkpoint(run) is called after each config with the results so far (meta["complete"]
    False until the end), so that a long sweep that is cut off still leaves its results.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = console or Console()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    rounds = ROUNDS if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    auto_quick = quick is None and device.type == "cpu" and batch is None and seq is None
    quick = auto_quick or bool(quick)
    impls = list(impls) if impls else None
    exclude = list(exclude) if exclude else None
    configs = preset_configs(preset, quick=quick, batch=batch, seq=seq, head_dim=head_dim,
                             key_lengths=key_lengths)

    notes = []
    if auto_quick:
        full = preset_configs(preset)[0 if preset != "core" else -1]
        notes.append(f"CPU: quick sizes chosen automatically (the preset's own: {full.label}"
                     f"{' and up' if preset == 'core' else ''}; pass --full for those)")
    if configs[0].is_module:
        notes.append("FLOPs count the QKV and output projections as well as attention")
    if key_lengths:
        notes.append("key lengths drawn in [S/2, S] per batch element; FLOPs count every "
                     "key, also the hidden ones")
    if device.type == "cpu":
        notes.append("peak memory: n/a on the CPU (no per-tensor allocator statistics)")
    if cuda_graphs:
        notes.append("CUDA graphs: the warm times are replays of each implementation's "
                     "captured forward and forward+backward (no host work); the first call "
                     "and peak memory are eager")

    dtype_name = str(dtype).removeprefix("torch.")
    meta = environment(device)
    meta.update(preset=preset, dtype=dtype_name, quick=quick, command=command,
                sizes=[c.label for c in configs], impl_filter=impls, exclude=exclude,
                notes=notes, timing_rounds=rounds, cuda_graphs=cuda_graphs)
    sizes = configs[0].label if len(configs) == 1 else (
        f"{len(configs)} configs, S {configs[0].seq}..{max(c.seq for c in configs)}")
    console.print(f"[bold]attnkit bench[/] · preset [cyan]{preset}[/] · {meta['device_name']} "
                  f"({device}) · {dtype_name} · sizes [cyan]{sizes}[/]{_graphs(meta)}",
                  highlight=False)
    for note in notes:
        console.print(f"  [dim]{note}[/]", highlight=False)

    clock = Clock(device, min_run_time=0.3 if quick else 0.5)
    run = BenchRun(meta, configs)
    meta["complete"] = False

    def peak() -> float | None:
        try:
            return matmul_peak_tflops(device, dtype, clock)
        except Exception as exc:  # a dtype without matmul kernels here, say
            note = f"matmul peak not measured: {_reason(exc)}"
            if note not in notes:
                notes.append(note)
            return None

    # The GPU made current: do_bench's events and synchronizes, and Triton's launches, go
    # to the current device, whatever device the tensors are on (--device cuda:1).
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with current, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peaks = [peak()]
        def build(config: Config) -> Problem:
            builder = _module_problem if config.is_module else _core_problem
            return builder(config, device, dtype, impls, exclude)

        # Built one config at a time, so that only one config's inputs are ever in memory
        # (at S=16k the S x S backends need all of it). A preset's configs all list the same
        # implementations, so the first one sizes the progress bar.
        pending = [build(configs[0])]
        total = len(pending[0].entries) * len(configs) * 2  # the first calls, the rounds
        columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task("bench", total=total)
            for config in configs:
                problem = pending.pop() if pending else build(config)
                measured, timed = [], []
                for label, make in problem.entries.items():
                    bar.update(task, description=f"{label}  {problem.config.label}")
                    if isinstance(make, str):
                        measured.append(Measurement(label, problem.config, "unsupported", make))
                    else:
                        m, t = _prepare(label, make, problem, clock, cuda_graphs)
                        measured.append(m)
                        timed += [t] if t is not None else []
                    bar.advance(task)
                bar.update(task, description=f"warm times  {problem.config.label}")
                _time_rounds(timed, clock, rounds)
                bar.advance(task, len(problem.entries))
                del timed  # the workloads: their outputs and graphs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                run.results.extend(measured)
                if checkpoint is not None:
                    meta["matmul_peak_tflops"] = max((p for p in peaks if p), default=None)
                    _speedups(measured, meta["matmul_peak_tflops"])
                    checkpoint(run)
        # Measured again at the end, the best of the two kept: on a shared machine one
        # reading alone can land in a busy moment and make the shares exceed 100%.
        peaks.append(peak())
    meta["matmul_peak_tflops"] = max((p for p in peaks if p), default=None)
    for config in configs:
        _speedups([m for m in run.results if m.config == config], meta["matmul_peak_tflops"])
    meta["complete"] = True
    return run


# --------------------------------------------------------------------------- output


def environment(device: torch.device) -> dict:
    """Versions, device name, date: what a result set needs to be read later."""
    from importlib import metadata

    import attnkit

    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "attnkit": attnkit.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def print_results(run: BenchRun, console: Console | None = None) -> None:
    """One table per config (a pivot of times when there are many configs)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    from attnkit.verify import tolerance

    gpu = run.meta["device"] == "cuda"
    dtype = _DTYPES[run.meta["dtype"]]
    if len(run.configs) > 4:
        _print_pivot(run, console)
        return
    for config in run.configs:
        rows = [m for m in run.results if m.config == config]
        ok = sorted((m for m in rows if m.fwd_ms is not None), key=lambda m: m.fwd_ms)
        table = Table(title=f"{config.preset}: {config.label} · {run.meta['dtype']} · "
                      f"{run.meta['device_name']}{_graphs(run.meta)}", title_justify="left",
                      header_style="bold")
        headers = ["implementation", "first call ms", "fwd ms", "fwd+bwd ms", "TFLOP/s fwd",
                   "TFLOP/s f+b", "% matmul peak", "× slowest", "× sdpa", "rel err"]
        if gpu:
            headers.insert(7, "MiB fwd / f+b")
        for h in headers:
            table.add_column(h, justify="left" if h == "implementation" else "right",
                             no_wrap=h == "implementation")
        for m in ok:
            tol = tolerance(dtype, torch.device(run.meta["device"]), m.impl.split(":")[-1])
            err = _num(m.rel_err, ".1e")
            if m.rel_err is not None and not m.rel_err <= tol:
                err = f"[red]{err}[/]"
            cells = [m.impl, _ms(m.first_call_ms), _ms(m.fwd_ms), _ms(m.fwd_bwd_ms),
                     _num(m.tflops_fwd, ".3g"), _num(m.tflops_fwd_bwd, ".3g"),
                     _num(None if m.peak_frac_fwd is None else 100 * m.peak_frac_fwd, ".0f"),
                     _num(m.speedup_vs_slowest, ".1f"), _num(m.speedup_vs_sdpa, ".2f"), err]
            if gpu:
                cells.insert(7, f"{_num(m.peak_fwd_mib, '.0f')} / "
                                f"{_num(m.peak_fwd_bwd_mib, '.0f')}")
            table.add_row(*cells)
        console.print(table)
        for m in rows:
            if m.reason:
                style = "red" if m.status == "error" else "yellow"
                console.print(f"  [{style}]{m.status if m.status != 'ok' else 'note'}[/] "
                              f"{m.impl}: {escape(m.reason)}", highlight=False)
        notes = {m.rel_err_note for m in ok if m.rel_err_note}
        for note in notes:
            console.print(f"  [dim]rel err {note} (the float64 oracle would not fit)[/]")
        _print_picks(rows, console)
    peak = run.meta.get("matmul_peak_tflops")
    console.print(f"[dim]% matmul peak: of {_num(peak, '.3g')} TFLOP/s measured on a "
                  f"{run.meta['dtype']} matmul; × sdpa: forward speed-up against plain "
                  f"SDPA; rel err: forward output against the float64 oracle[/]")


def _graphs(meta: dict) -> str:
    """A title's mark for a run timed as CUDA graph replays."""
    return " · CUDA graphs" if meta.get("cuda_graphs") else ""


def _print_pivot(run: BenchRun, console: Console) -> None:
    from rich.table import Table

    impls = list(dict.fromkeys(m.impl for m in run.results))
    table = Table(title=f"{run.meta['preset']} · {run.meta['dtype']} · {run.meta['device_name']}"
                  f"{_graphs(run.meta)}: forward / forward+backward ms", title_justify="left",
                  header_style="bold")
    table.add_column("config", no_wrap=True)
    for impl in impls:
        table.add_column(impl, justify="right")
    for config in run.configs:
        by_impl = {m.impl: m for m in run.results if m.config == config}
        cells = []
        for impl in impls:
            m = by_impl.get(impl)
            if m is None or m.fwd_ms is None:
                cells.append("[yellow]skip[/]" if m and m.status == "unsupported"
                             else "[red]error[/]" if m else "")
            else:
                cells.append(f"{_ms(m.fwd_ms)} / {_ms(m.fwd_bwd_ms)}")
        table.add_row(config.label, *cells)
    console.print(table)
    reasons = {(m.impl, m.status, m.reason) for m in run.results if m.reason}
    for impl, status, reason in sorted(reasons, key=lambda r: r[0]):
        console.print(f"  [yellow]{status}[/] {impl}: {escape(reason)}", highlight=False)
    _print_picks(run.results, console)
    console.print("[dim]every number (TFLOP/s, speed-ups, errors) is in results.json / "
                  "results.csv (--out)[/]")


def _print_picks(results: list[Measurement], console: Console) -> None:
    picked = sorted({m.picked for m in results if m.picked})
    if picked:
        console.print(f"  [dim]auto ran {', '.join(picked)}[/]")


def result_rows(run: BenchRun) -> list[dict]:
    """One flat dict per (config, implementation): the rows of results.csv."""
    rows = []
    for m in run.results:
        row = {"impl": m.impl, "kind": m.kind, "config": m.config.label,
               **asdict(m.config)}
        row.update({f.name: getattr(m, f.name) for f in fields(m)
                    if f.name not in ("impl", "config")})
        rows.append(row)
    return rows


def write_outputs(run: BenchRun, out_dir: str | Path) -> list[Path]:
    """Write results.json, results.csv and chart.png (and scaling.png for sweeps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(run)
    data = {"meta": run.meta, "configs": [asdict(c) for c in run.configs], "results": rows}
    paths = [out / "results.json", out / "results.csv"]
    paths[0].write_text(json.dumps(data, indent=1, default=str) + "\n")
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["impl"])
        writer.writeheader()
        writer.writerows(rows)
    paths.append(plot_bars(run, out / "chart.png"))
    if len({(c.head_dim, c.causal) for c in run.configs}) < len(run.configs):
        paths.append(plot_scaling(run, out / "scaling.png"))
    return paths


def _headline(run: BenchRun) -> Config:
    """The config the bar chart shows: the one with most implementations run, then largest S."""
    def key(c: Config) -> tuple[int, int]:
        return (sum(m.config == c and m.fwd_ms is not None for m in run.results), c.seq)
    return max(run.configs, key=key)


def plot_bars(run: BenchRun, path: Path) -> Path:
    """Horizontal bars of forward and forward+backward time per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = _headline(run)
    rows = [m for m in run.results if m.config == config]
    ok = sorted((m for m in rows if m.fwd_ms is not None), key=lambda m: -m.fwd_ms)
    missing = [m.impl for m in rows if m.fwd_ms is None]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.42 * max(len(ok), 1)), dpi=120)
    y = range(len(ok))
    h = 0.38
    fwd = [m.fwd_ms for m in ok]
    fb = [m.fwd_bwd_ms or 0.0 for m in ok]
    ax.barh([i + h / 2 for i in y], fwd, h, label="forward", color="#3b75af")
    ax.barh([i - h / 2 for i in y], fb, h, label="forward + backward", color="#ef8636")
    for i, m in enumerate(ok):
        for value, dy in ((m.fwd_ms, h / 2), (m.fwd_bwd_ms, -h / 2)):
            if value:
                ax.text(value, i + dy, f" {_ms(value)}", va="center", fontsize=7)
        if m.fwd_bwd_ms is None:
            ax.text(m.fwd_ms, i - h / 2, " no backward here", va="center", fontsize=7,
                    color="gray")
    ax.set_yticks(list(y), [m.impl for m in ok], fontsize=8)
    values = [v for v in fwd + fb if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("milliseconds (median; shorter is faster)")
    ax.set_title(f"attnkit bench {config.preset} · {run.meta['device_name']} · "
                 f"{run.meta['dtype']}\n{config.label}", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)  # the fastest, shortest bars are at the top
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.margins(x=0.15)
    if missing:
        fig.text(0.01, 0.005, "not run: " + ", ".join(missing), fontsize=7, color="gray",
                 wrap=True)
    fig.tight_layout(rect=(0, 0.03 if missing else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(run: BenchRun, path: Path) -> Path:
    """Forward time against S, one panel per (head dim, causal), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = list(dict.fromkeys((c.head_dim, c.causal) for c in run.configs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), dpi=110,
                             squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels, strict=True):
        impls = dict.fromkeys(m.impl for m in run.results)
        for impl in impls:
            pts = sorted((m.config.seq, m.fwd_ms) for m in run.results if m.impl == impl
                         and m.config.head_dim == d and m.config.causal == causal
                         and m.fwd_ms is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        seqs = sorted({c.seq for c in run.configs})
        ax.set_xticks(seqs, [str(x) for x in seqs])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        # Plain numbers: "20" reads faster than "2 x 10^1" on a time axis.
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"D={d}, {'causal' if causal else 'full'}", fontsize=9)
        ax.set_xlabel("sequence length S")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("forward ms (median)")
    # The legend goes on the last panel, from whichever panel has the most lines: in a run
    # cut off early the last panels are still empty.
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[0]),
                          key=lambda hl: len(hl[1]))
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7)
    fig.suptitle(f"attnkit bench {run.meta['preset']} · {run.meta['device_name']} · "
                 f"{run.meta['dtype']} · B*S, H*D fixed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def command_line(argv: list[str] | None) -> str:
    """The command as typed, for results.json."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["attnkit", *args])
