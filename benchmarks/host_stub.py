"""attnkit's own host time per `triton` call, on any machine: the kernel launches stubbed.

    PYTHONPATH=src python benchmarks/host_stub.py

On a GPU, benchmarks/host_overhead.py times whole calls; on the H100 host those move by
10-40% between processes (NOTES, runs 6-10), more than most changes to the Python path.
This runs the same path on the CPU with only the GPU's part taken out: Triton's
launcher is replaced by a no-op compiled kernel and the autotuner by its first config,
so everything else (validation, autograd, `_meta`, allocation, the launch cache's key)
runs as it does before a real launch. Prints the best of several timed runs, per call,
for a forward under no_grad and a forward+backward (b1 h2 s64 d64, float16), then the
parts of it timed alone in alternation: the launch cache's key (`_specialization`) on
the forward's own arguments, and `_meta` worked out against remembered.
"""

from __future__ import annotations

import time

import torch
import triton
from triton.runtime.jit import JITFunction

from attnkit.backends import fused_triton as ft
from attnkit.call import make_call


class _NoLaunch:
    """Stands in for a CompiledKernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args: None


def stub_launches() -> None:
    """Take Triton's launches, the autotuner's timing and the GPU queries out of the path."""
    torch.cuda.current_device = lambda: 0
    ft._FAST_LAUNCH = True
    ft._tma_ready = lambda *tensors: False
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: _NoLaunch()

    def first_config(self, *args, **kwargs):
        self.best_config = self.configs[0]

    triton.runtime.Autotuner.run = first_config


def per_call_us(fn, calls: int = 3000, trials: int = 5) -> float:
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    if ft._INTERPRET:
        raise SystemExit("run without TRITON_INTERPRET: this times the compiled-kernel path")
    stub_launches()
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            ft.run(make_call(q, k, v))

    def forward_backward():
        out, _ = ft.run(make_call(q, k, v))
        torch.autograd.grad(out, (q, k, v), grad)

    print(f"host time per call, launches stubbed: forward {per_call_us(forward):.1f} us, "
          f"forward+backward {per_call_us(forward_backward):.1f} us")

    seen = []
    launch = ft._launch_jitted
    ft._launch_jitted = lambda jitted, grid, args, *rest: (seen.append((jitted, args)),
                                                           launch(jitted, grid, args, *rest))
    forward()
    _, args = seen[0]
    call = make_call(q, k, v)
    print(f"launch key (_specialization): "
          f"{per_call_us(lambda: ft._specialization(args), calls=2000):.1f} us a launch")
    times = {"worked out": [], "remembered": []}
    for _ in range(7):  # alternating, so that the machine's drifts hit both alike
        for name, fn in (("worked out", lambda: ft._work_out_meta(call)),
                         ("remembered", lambda: ft._meta(call, 0))):
            times[name].append(per_call_us(fn, calls=2000, trials=1))
    print("_meta: " + ", ".join(f"{name} {min(t):.1f} us" for name, t in times.items()))


if __name__ == "__main__":
    main()
