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

Then the same two calls on Hopper's path, as if on an sm_90 GPU (b1 h2 s1024 d128,
bfloat16, causal: the Gluon forward and both Gluon backward kernels), the launches
stubbed where fused_triton hands them to the compiled kernel (`_launch_jitted`: its
cache key is worked out and looked up, nothing runs), beside the same calls with the
Gluon kernels switched off. What this cannot time is the launcher's own work, e.g. the
encoding of the Gluon kernels' TMA descriptors, which needs the GPU's driver.
"""

from __future__ import annotations

import time

import torch
import triton
from triton.runtime.jit import JITFunction

from attnkit.backends import fused_triton as ft
from attnkit.backends import hopper_forward
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


def calls(q, k, v, **options):
    """(forward under no_grad, forward+backward) of one `triton` call on q, k, v."""
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            ft.run(make_call(q, k, v, **options))

    def forward_backward():
        out, _ = ft.run(make_call(q, k, v, **options))
        torch.autograd.grad(out, (q, k, v), grad)

    return forward, forward_backward


def main() -> None:
    if ft._INTERPRET:
        raise SystemExit("run without TRITON_INTERPRET: this times the compiled-kernel path")
    stub_launches()
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    forward, forward_backward = calls(q, k, v)
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
    ft._launch_jitted = launch
    hopper_path()


def stub_gluon_launches() -> None:
    """fused_triton as on an sm_90 GPU, its Gluon launches stopped at the compiled kernel."""
    ft._on_hopper = lambda call: True
    hopper_forward.multiprocessors = lambda device: 132

    def launch(jitted, grid, args, constexprs, options, riders=None):
        # nothing is ever compiled here, so this stands for the warm launch, riders unasked
        ft._COMPILED.get(ft._launch_key(jitted, args, constexprs, options))

    ft._launch_jitted = launch


def hopper_path() -> None:
    """Host time per call where the Gluon kernels run, and with them switched off."""
    if hopper_forward.gluon is None:
        print("Hopper's path: this Triton has no Gluon")
        return
    stub_gluon_launches()
    q, k, v = (torch.randn(1, 2, 1024, 128, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    call = make_call(q, k, v, causal=True)
    assert ft._uses_hopper_forward(call) and ft._uses_hopper_backward(call, q, q) == (
        True, True)
    forward, forward_backward = calls(q, k, v, causal=True)

    switches = ("_HOPPER_FORWARD", "_HOPPER_DKDV", "_HOPPER_DQ")
    times: dict[str, list[float]] = {}
    for _ in range(3):  # alternating, so that the machine's drifts hit both alike
        for gluon in (True, False):
            for switch in switches:
                setattr(ft, switch, gluon)
            for what, fn in (("forward", forward), ("forward+backward", forward_backward)):
                times.setdefault(f"{what}, {'Gluon' if gluon else 'Triton'}", []).append(
                    per_call_us(fn, calls=1000, trials=3))
    print("Hopper's path (b1 h2 s1024 d128 bf16 causal), launches stubbed: " +
          ", ".join(f"{name} {min(t):.1f} us" for name, t in times.items()))


if __name__ == "__main__":
    main()
