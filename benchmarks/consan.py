"""Run a script under Triton's concurrency sanitizer for Gluon kernels (ConSan), on a GPU.

    PYTHONPATH=src:benchmarks python benchmarks/consan.py SCRIPT [ARGS ...]

e.g. `benchmarks/memcheck.py --gluon-only` (the Gluon kernels forced onto short, awkward
shapes) or `benchmarks/dkdv_case.py run PATH 64,3` (the dK/dV config that computes wrong
gradients, NOTES runs 38, 42 and 43, on inputs `dkdv_case.py save PATH` made outside).

ConSan instruments Triton-language kernels as well, and on fused_triton's forward (a TMA
config; Triton 3.6, H200) it asserted "Deadlock detected: all active threads are waiting
on mbarriers", where the same kernel runs and checks right without it (run 43). So a
script under it should launch Gluon kernels only: gluon_dkdv.py's checks, which build
their inputs with the Triton kernels, cannot run here, hence dkdv_case.py. Each kernel
build takes about a minute under it (the dK/dV kernel: 67-71 s a config, run 43), and
memcheck.py's five Gluon cases build about a dozen (three kernels, D=64 and 128, causal
or not, key lengths or not; at D=256 the forward and wide_dkdv_kernel): more than one
10-minute call may be needed.

ConSan (Triton 3.6 and later, `TRITON_INSTRUMENTATION_MODE=consan`) compiles every kernel
with checks of its shared-memory buffers, mbarriers and async copies, and stops it with
a device-side assert naming what it found (a buffer read while a copy into it is still
outstanding, for one). compute-sanitizer's racecheck does not model mbarriers, so on
these kernels it reports every ring handoff (run 42). What the variable alone leaves
out, and this wrapper adds:

- a compile cache of its own: a launch's cache key has the mode, but a build made with
  triton.compile directly (gluon_sass.py) is keyed without it, so the two kinds would
  share entries (the dK/dV kernel under the variable: 2088 SASS instructions from a warm
  cache, 98016 from a fresh one);
- an allocator for the global scratch memory ConSan keeps its state in (Triton's is per
  thread and unset by default);
- autograd's backward on the calling thread, where that allocator is set;
- each launch through Triton's own path rather than fused_triton's direct one;
- CUDA_LAUNCH_BLOCKING=1, so that the assert surfaces at the launch that made it.

The instrumented kernels run many times slower than the plain ones: keep shapes small.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.splitlines()[2].strip())
    script = sys.argv[1]
    # before Triton is imported: its knobs read the environment then
    os.environ["TRITON_INSTRUMENTATION_MODE"] = "consan"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnkit-consan-")
    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"

    import torch
    import triton

    from attnkit.backends import fused_triton

    triton.set_allocator(fused_triton._scratch)
    torch.autograd.set_multithreading_enabled(False)
    fused_triton._FAST_LAUNCH = False
    print(f"ConSan on; compile cache {os.environ['TRITON_CACHE_DIR']}", flush=True)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # its neighbours import
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
