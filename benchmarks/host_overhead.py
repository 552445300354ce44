"""Host time per attention call on a GPU: what a call costs when its GPU work is tiny.

    PYTHONPATH=src python benchmarks/host_overhead.py [--out DIR] [--shape B,H,S,D]

At small sizes `triton.testing.do_bench` times from one launch to the next, so a call
whose Python takes longer than its kernels is timed at its host cost. This launches
many calls on a tiny input (B=1, H=2, S=64, D=64, bf16: microseconds of GPU work) with
one synchronize at the end, so the time per call is the host's: validation, dispatch,
Triton's launcher, autograd. Prints a table and writes DIR/host_overhead.json.
--shape times another input instead: on Hopper, 1,2,4096,128 takes the Gluon kernels
with still little GPU work (tens of us), so that their launches' host time shows.

--ab-fast-launch times triton twice in the same process, trials alternating, with
fused_triton's direct launch of compiled kernels on and off (`_FAST_LAUNCH`): host noise
between processes on the H100 host is larger than the difference (NOTES, run 6).

--engine times the autograd engine alone on the same tensor: a backward through a C++ op
(x * 1) against one through a Python autograd.Function that does the same, to tell how
much of triton's host time any Python backward pays on this device.

--profile IMPL also runs IMPL's forward+backward under cProfile and writes where the host
time goes to DIR/host_profile_IMPL.txt (the functions with the most time of their own,
and the most time in all).

--parts takes triton's causal forward+backward apart, each part's host time measured with
the GPU held by a sleep while 40 calls are enqueued (module_time.host_and_gpu_ms), the
parts in turns over --rounds: the whole step, the forward with autograd on, the backend's
_forward and _backward alone (the Python around the kernels and their launches), and the
autograd engine alone (x * 1 forward+backward on a small tensor). What the step costs
beyond _forward + _backward is attention()'s dispatch, autograd's node and engine, and
the backward's Python running on the engine's GPU worker thread rather than the caller's
(the step once more with torch.autograd.set_multithreading_enabled(False), which runs it
on the caller's).

--threads times each --threads-impls implementation's causal forward+backward (and the
engine alone, through a C++ and a Python node) by host time as --parts does, once with
the backward on autograd's GPU worker thread, PyTorch's default, and once on the caller's
thread: what the hand-over between the two threads costs a step, and whether a Python
backward pays more of it than a C++ one; beside them each step's GPU time, to tell how near
its host time comes to it (a step timed at host speed: NOTES, run 32).

--backward-pieces times, both ways as --threads does, a Python autograd node whose backward
runs nothing, a pure Python loop, triton's causal _backward, or that backward twice: how
the worker thread's extra time grows with the work its backward runs (NOTES, run 32).

--timeline IMPL records 50 causal forward+backward steps under torch.profiler (CPU
activity: aten ops, CUDA runtime and driver calls, by thread) and prints one step from
the middle as a time line (offset, duration, thread, op): the gaps between ops are
Python. Writes the table of ops to DIR/host_ops_IMPL.txt and the trace to
DIR/host_trace_IMPL.json (chrome://tracing, Perfetto).
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import triton
from module_time import host_and_gpu_ms

from attnkit import attention
from attnkit.call import make_call

IMPLS = ("sdpa", "triton", "flex")


def per_call_us(fn, calls: int = 300, trials: int = 5) -> float:
    for _ in range(20):  # compile, autotune, allocator warm-up
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def calls(q, k, v, grad, impl: str, causal: bool):
    """The forward (no autograd) and forward+backward calls that get timed."""
    def forward():
        with torch.no_grad():
            attention(q, k, v, causal=causal, impl=impl)

    def forward_backward():
        out = attention(q, k, v, causal=causal, impl=impl)
        torch.autograd.grad(out, (q, k, v), grad)

    return forward, forward_backward


def fast_launch_ab(q, k, v, grad, rounds: int = 7) -> list[dict]:
    """triton's host time per call with fused_triton._FAST_LAUNCH on and off, the two
    alternating over `rounds` so that drifts of the host hit both alike; medians."""
    from attnkit.backends import fused_triton

    saved, rows = fused_triton._FAST_LAUNCH, []
    try:
        for causal in (False, True):
            times = {(fast, part): [] for fast in (True, False) for part in ("fwd", "fwd_bwd")}
            for _ in range(rounds):
                for fast in (True, False):
                    fused_triton._FAST_LAUNCH = fast
                    for part, fn in zip(("fwd", "fwd_bwd"), calls(q, k, v, grad, "triton", causal),
                                        strict=True):
                        times[fast, part].append(per_call_us(fn, calls=200, trials=2))
            for fast in (True, False):
                row = {"impl": "triton" if fast else "triton (Triton's launch path)",
                       "causal": causal, "rounds": rounds,
                       "fwd_us": statistics.median(times[fast, "fwd"]),
                       "fwd_bwd_us": statistics.median(times[fast, "fwd_bwd"])}
                rows.append(row)
                print(f"{row['impl']:30s} {'causal' if causal else 'full  '} forward "
                      f"{row['fwd_us']:6.1f} us  forward+backward {row['fwd_bwd_us']:6.1f} us "
                      f"(median of {rounds} alternating rounds)", flush=True)
    finally:
        fused_triton._FAST_LAUNCH = saved
    return rows


class _PythonScale(torch.autograd.Function):
    """x * 1 with a Python backward: what the autograd engine pays for any Python node."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        return grad


# x * 1 through a C++ node and through a Python node, by the names the rows carry
ENGINE_NODES = (("engine: C++ node", lambda t: t * 1), ("engine: Python node", _PythonScale.apply))


def engine_rows(x, grad) -> list[dict]:
    """fwd+bwd host time of x * 1 through a C++ node and through a Python node."""
    rows = []
    for name, op in ENGINE_NODES:
        def forward_backward(op=op):
            torch.autograd.grad(op(x), x, grad)

        rows.append({"impl": name, "causal": None, "fwd_us": None,
                     "fwd_bwd_us": per_call_us(forward_backward)})
        print(f"{name:22s} forward+backward {rows[-1]['fwd_bwd_us']:6.1f} us", flush=True)
    return rows


def host_and_gpu_us(fn, calls: int = 40, trials: int = 5) -> tuple[float, float | None]:
    """Median host time per call of fn, in us, while the GPU is held (host_and_gpu_ms), and
    the median GPU time per call of the trials in which no call waited for the GPU."""
    for _ in range(5):  # compile, autotune, allocator warm-up
        fn()
    samples = [host_and_gpu_ms(fn, calls) for _ in range(trials)]
    gpu = [g * 1e3 for _, g in samples if g is not None]
    return (statistics.median(h * 1e3 for h, _ in samples),
            statistics.median(gpu) if gpu else None)


def host_us(fn, calls: int = 40, trials: int = 5) -> float:
    """host_and_gpu_us's host time alone."""
    return host_and_gpu_us(fn, calls, trials)[0]


def on_caller_thread(fn):
    """fn with autograd's backward run on the calling thread, not the engine's GPU worker."""
    def wrapped():
        with torch.autograd.set_multithreading_enabled(False):
            fn()
    return wrapped


def _engine_leaf() -> tuple[torch.Tensor, torch.Tensor]:
    """A small leaf that requires grad and a gradient for it: the engine-alone steps."""
    x = torch.randn(1024, device="cuda", requires_grad=True)
    return x, torch.randn_like(x)


def _triton_causal_forward(q, k, v):
    """(call, out, lse) of triton's causal forward on q, k, v, for timing _backward alone."""
    from attnkit.backends import fused_triton

    call = make_call(q.detach(), k.detach(), v.detach(), causal=True)
    with torch.no_grad():
        out, lse = fused_triton._forward(call, 0)
    return call, out, lse


def worker_and_caller_rows(steps: dict, rounds: int) -> list[dict]:
    """Each step's host us with its backward on the engine's GPU worker thread (PyTorch's
    default) and on the caller's, in turns over `rounds`, and its GPU us (the worker-thread
    runs'; None where the host waited for the GPU); a row per step, printed. A step whose
    host time nears its GPU time is timed at host speed by do_bench on a slower host."""
    times = {(name, one): [] for name in steps for one in (False, True)}
    gpu_times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            host, gpu = host_and_gpu_us(step)
            times[name, False].append(host)
            gpu_times[name] += [gpu] if gpu is not None else []
            times[name, True].append(host_us(on_caller_thread(step)))
    rows = []
    for name in steps:
        worker, caller = (statistics.median(times[name, one]) for one in (False, True))
        gpu = statistics.median(gpu_times[name]) if gpu_times[name] else None
        rows.append({"impl": name, "causal": True, "rounds": rounds,
                     "host_us_worker_thread": worker, "host_us_caller_thread": caller,
                     "gpu_us": gpu,
                     "rounds_worker": times[name, False], "rounds_caller": times[name, True]})
        print(f"{name:30s} forward+backward host {worker:6.1f} us on autograd's worker "
              f"thread, {caller:6.1f} us on the caller's; GPU "
              f"{'-' if gpu is None else f'{gpu:.1f} us'}", flush=True)
    return rows


def threads_rows(q, k, v, grad, impls, rounds: int) -> list[dict]:
    """--threads: each impl's causal forward+backward, and the engine alone through a C++
    and a Python node, both ways (worker_and_caller_rows)."""
    x, x_grad = _engine_leaf()
    steps = {impl: calls(q, k, v, grad, impl, causal=True)[1] for impl in impls}
    for name, op in ENGINE_NODES:
        steps[name] = lambda op=op: torch.autograd.grad(op(x), x, x_grad)
    return worker_and_caller_rows(steps, rounds)


class _RunInBackward(torch.autograd.Function):
    """x * 1 whose backward runs work() first: a Python node with a backward of our choice."""

    @staticmethod
    def forward(ctx, x, work):
        ctx.work = work
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        ctx.work()
        return grad, None


def _python_loop(n: int = 4000) -> int:
    """Pure Python, no GPU: ~110-200 us at n = 4000 on the H200's host (run 32)."""
    total = 0
    for i in range(n):
        total += i
    return total


def backward_pieces_rows(q, k, v, grad, rounds: int) -> list[dict]:
    """--backward-pieces: a Python node's backward running nothing, a pure Python loop,
    triton's causal _backward once, and twice, both ways (worker_and_caller_rows)."""
    from attnkit.backends import fused_triton

    call, out, lse = _triton_causal_forward(q, k, v)

    def backward():
        fused_triton._backward(call, 0, out, lse, grad)

    x, x_grad = _engine_leaf()
    pieces = {"node: nothing": lambda: None, "node: Python loop (4000)": _python_loop,
              "node: triton _backward": backward,
              "node: triton _backward twice": lambda: (backward(), backward())}
    steps = {name: lambda work=work: torch.autograd.grad(_RunInBackward.apply(x, work), x,
                                                         x_grad)
             for name, work in pieces.items()}
    return worker_and_caller_rows(steps, rounds)


def parts_rows(q, k, v, grad, rounds: int) -> list[dict]:
    """triton's causal forward+backward and its parts (--parts), host us, in turns."""
    from attnkit.backends import fused_triton

    call, out, lse = _triton_causal_forward(q, k, v)
    x, x_grad = _engine_leaf()
    forward, forward_backward = calls(q, k, v, grad, "triton", causal=True)

    parts = {
        "forward+backward": forward_backward,
        "forward+backward, one thread": on_caller_thread(forward_backward),
        "forward, autograd on": lambda: attention(q, k, v, causal=True, impl="triton"),
        "forward, no autograd": forward,
        "_forward alone": lambda: fused_triton._forward(call, 0),
        "_backward alone": lambda: fused_triton._backward(call, 0, out, lse, grad),
        "engine: x * 1 forward+backward": lambda: torch.autograd.grad(x * 1, x, x_grad),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            times[name].append(host_us(fn))
    rows = []
    for name, samples in times.items():
        rows.append({"impl": "triton", "part": name, "causal": True, "rounds": rounds,
                     "host_us": statistics.median(samples), "host_us_rounds": samples})
        print(f"{name:32s} host {rows[-1]['host_us']:6.1f} us (rounds: "
              f"{' '.join(f'{t:.0f}' for t in samples)})", flush=True)
    return rows


def middle_step_ops(prof, steps: int) -> tuple[float, list[tuple[float, float, int, str]]]:
    """The length of the middle one of `steps` "step" ranges recorded by prof, in us, and
    the ops that start in it: (offset, duration, thread, name), in order of start."""
    events = prof.events()
    marks = sorted(e.time_range.start for e in events if e.name == "step")
    start, end = marks[steps // 2], marks[steps // 2 + 1]
    ops = sorted((e.time_range.start - start, e.time_range.elapsed_us(), e.thread, e.name)
                 for e in events if start <= e.time_range.start < end and e.name != "step")
    return end - start, ops


def timeline(fn, impl: str, out_dir: str, steps: int = 50) -> None:
    """--timeline: one step's CPU ops from the middle of `steps`, and the files."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("step"):
                fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(out_dir, f"host_trace_{impl}.json"))
    with open(os.path.join(out_dir, f"host_ops_{impl}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    length, ops = middle_step_ops(prof, steps)
    print(f"{impl}: one forward+backward under torch.profiler, {length:.0f} us "
          f"(ops of 2 us or more; the gaps are Python)")
    for offset, duration, thread, name in ops:
        if duration >= 2:
            print(f"  {offset:7.1f} {duration:7.1f} us  thread {thread}  {name[:80]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), metavar="IMPL",
                        help=f"implementations to time (default: {' '.join(IMPLS)}; none: "
                             "only the other options' measurements)")
    parser.add_argument("--ab-fast-launch", action="store_true",
                        help="triton with and without its direct launch, trials alternating")
    parser.add_argument("--engine", action="store_true",
                        help="also time the autograd engine alone: a C++ against a Python node")
    parser.add_argument("--profile", action="append", default=[], metavar="IMPL",
                        help="profile IMPL's forward+backward (repeatable)")
    parser.add_argument("--parts", action="store_true",
                        help="triton's causal forward+backward taken apart (host time)")
    parser.add_argument("--threads", action="store_true",
                        help="each --threads-impls step with autograd's backward on its "
                             "worker thread and on the caller's (host time)")
    parser.add_argument("--backward-pieces", action="store_true",
                        help="a Python node whose backward runs nothing, a Python loop, "
                             "triton's _backward once and twice, on either thread (host time)")
    parser.add_argument("--threads-impls", nargs="+", default=["sdpa", "triton"],
                        metavar="IMPL", help="implementations for --threads "
                                             "(default: sdpa triton)")
    parser.add_argument("--timeline", action="append", default=[], metavar="IMPL",
                        help="one causal forward+backward of IMPL under torch.profiler "
                             "(repeatable)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --parts and --threads, taken in turns (default 3)")
    parser.add_argument("--shape", default="1,2,64,64", metavar="B,H,S,D",
                        help="the input's shape (default 1,2,64,64)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    b, h, s, d = map(int, args.shape.split(","))
    shape = f"b{b} h{h} s{s} d{d} bfloat16"
    q, k, v, grad = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rows = []
    for impl in args.impls:
        for causal in (False, True):
            forward, forward_backward = calls(q, k, v, grad, impl, causal)
            row = {"impl": impl, "causal": causal, "fwd_us": per_call_us(forward),
                   "fwd_bwd_us": per_call_us(forward_backward)}
            rows.append(row)
            print(f"{impl:7s} {'causal' if causal else 'full  '} forward {row['fwd_us']:6.1f} us"
                  f"  forward+backward {row['fwd_bwd_us']:6.1f} us", flush=True)
    if args.ab_fast_launch:
        rows += fast_launch_ab(q, k, v, grad)
    if args.engine:
        rows += engine_rows(q, grad)
    if args.parts:
        rows += parts_rows(q, k, v, grad, args.rounds)
    if args.threads:
        rows += threads_rows(q, k, v, grad, args.threads_impls, args.rounds)
    if args.backward_pieces:
        rows += backward_pieces_rows(q, k, v, grad, args.rounds)
    for impl in args.timeline:
        timeline(calls(q, k, v, grad, impl, causal=True)[1], impl, args.out)
    for impl in args.profile:
        _, forward_backward = calls(q, k, v, grad, impl, causal=False)
        per_call_us(forward_backward, calls=10, trials=1)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            forward_backward()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        with open(os.path.join(args.out, f"host_profile_{impl}.txt"), "w") as f:
            f.write(f"200 calls of forward+backward, {shape}\n{text.getvalue()}")
        print(text.getvalue()[:6000])
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shape": shape, "rows": rows}
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
