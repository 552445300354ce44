"""Where a module preset's time goes, on a GPU: host time and GPU time per call, apart.

    PYTHONPATH=src python benchmarks/module_time.py [--preset notebook|bert] [--out DIR]
        [--impl LABEL ...] [--rounds 5]

`attnkit bench` times each call with triton.testing.do_bench, as it does every row. At
the module presets a call's GPU work is ~0.1 ms, so where the host takes longer to
enqueue it than the GPU takes to run it, that time is the host's, and it moves with
whatever else the host runs (the bench's rounds up to 195% apart in run 23). This takes
the two apart for the same workloads the bench builds (`bench._module_problem`, one set
of weights):

- gpu: the GPU time per call. A sleep kernel holds the stream while `--calls` calls are
  enqueued, so the GPU then runs them back to back; CUDA events around them.
- host: the time the host takes to enqueue one call while the GPU is busy (the same
  calls, timed on the host clock before the sleep ends).
- bench: do_bench's median, as `attnkit bench` takes it.

Each is the median of `--rounds` rounds taken in turns over the implementations.
Prints a table and writes DIR/module_time_PRESET.json. `--backward-thread caller` runs
autograd's backward on the calling thread (torch.autograd.set_multithreading_enabled
(False)) instead of the engine's GPU worker thread; `both` times each forward+backward
both ways, in turns: the hand-over between the two threads cost ~45-460 us a step on the
H200's host (NOTES, run 31).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
from triton.testing import do_bench

from attnkit.bench import Config, _module_problem, environment, preset_configs

_SLEEP_CYCLES = 1_000_000_000  # ~0.5 s at H100/H200 clocks: longer than any enqueue here
LABELS = ("module:triton", "module:sdpa", "module:sdpa_flash", "module:flex", "variant:sdpa",
          "variant:sdpa_mask")


def host_and_gpu_ms(fn, calls: int) -> tuple[float, float | None]:
    """(host ms, GPU ms) per call of fn, with the GPU held by a sleep while the host
    enqueues `calls` of them; GPU None where a call waited for the GPU (then the calls
    did not run back to back, and the host time includes the wait)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_SLEEP_CYCLES)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / calls
    waited = start.query()  # the sleep outlasts any enqueue that does not wait for it
    end.record()
    end.synchronize()
    return host, None if waited else start.elapsed_time(end) / calls


def parts(work) -> tuple[tuple[str, object], ...]:
    """The two timed parts of a bench workload, by the names the JSON rows carry."""
    return ("fwd", work.run_forward), ("fwd_bwd", work.run_forward_backward)


def synchronizing_ops(fn) -> list[str]:
    """The warnings of torch's sync debug mode over one call of fn: the ops in it that
    make the host wait for the GPU (.item(), nonzero, copies to the host)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0][:120] for w in caught})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("notebook", "bert"), default="notebook")
    parser.add_argument("--impl", action="append", help=f"labels (default {LABELS})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--backward-thread", choices=("worker", "caller", "both"),
                        default="worker", help="where autograd runs the backward "
                                               "(default: its GPU worker thread, PyTorch's)")
    args = parser.parse_args()
    threads = ("worker", "caller") if args.backward_thread == "both" else (args.backward_thread,)
    device = torch.device("cuda")
    config: Config = preset_configs(args.preset)[0]
    labels = args.impl or list(LABELS)
    problem = _module_problem(config, device, torch.bfloat16, None, None)
    works, syncs = {}, {}
    for label in labels:
        try:
            work = problem.entries[label]()
            for _, fn in parts(work):  # compiles, autotunes
                fn()
        except Exception as exc:  # not on this device, or not with this preset's mask
            print(f"{label}: left out ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        works[label] = work
        syncs[label] = {part: synchronizing_ops(fn) for part, fn in parts(work)}
        for part, ops in syncs[label].items():
            for op in ops:
                print(f"{label} {part} waits for the GPU: {op}")
    def part_threads(part: str) -> tuple[str, ...]:
        return threads if part == "fwd_bwd" else threads[:1]  # a forward has no backward

    samples = {(label, part, thread): {"host": [], "gpu": [], "bench": []}
               for label, work in works.items() for part, _ in parts(work)
               for thread in part_threads(part)}
    for _ in range(args.rounds):
        for label, work in works.items():
            for part, fn in parts(work):
                for thread in part_threads(part):
                    with torch.autograd.set_multithreading_enabled(thread == "worker"):
                        host, gpu = host_and_gpu_ms(fn, args.calls)
                        bench = do_bench(fn, warmup=10, rep=100 // args.rounds + 1)
                    got = samples[(label, part, thread)]
                    got["host"].append(host)
                    got["gpu"].append(gpu)
                    got["bench"].append(bench)
    rows = []
    print(f"{args.preset}: {config}, bf16, medians of {args.rounds} rounds (ms per call)")
    print(f"{'implementation':22} {'part':8} {'backward':8} {'host':>7} {'gpu':>7} {'bench':>7}")
    for (label, part, thread), got in samples.items():
        med = {name: statistics.median(values) if None not in values else None
               for name, values in got.items()}
        rows.append({"impl": label, "part": part, "backward_thread": thread,
                     **{f"{k}_ms": v for k, v in med.items()},
                     "syncs": syncs[label][part], "samples": got})
        print(f"{label:22} {part:8} {thread:8} " + " ".join(
            "   wait" if v is None else f"{v:7.3f}" for v in med.values()))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"module_time_{args.preset}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "preset": args.preset,
                   "rounds": args.rounds, "calls": args.calls, "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
