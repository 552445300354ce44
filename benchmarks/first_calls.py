"""A cold process's first forward and first backward of `triton`, timed apart, with the
kernels that each of the two compiled.

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python benchmarks/first_calls.py
        [--cases triton|gluon|all] [--out DIR]

Since run 46 a first forward that a backward will follow builds the backward's kernels
with its own (fused_triton._backward_builds), so the backward should compile nothing: the
counts here (entries in each kernel's in-memory cache, the three Triton kernels' and, on
Hopper, the three Gluon kernels') show whether it did. `triton` cases: shapes of the
kinds `attnkit verify` checks, whose kernels are the Triton ones, each with the kind of
gradient given (randn_like(out); a contiguous one; sum()'s, through a float32 cast);
`gluon` cases: shapes the Gluon kernels take on Hopper. The cases run in one process, in
order, each forward+backward twice (the second call: warm). Start it with an empty
TRITON_CACHE_DIR for cold numbers. The process first does cold_start.warm_up, as
cold_start.py's child does, so that one-time work of Triton and of torch is not charged
to the first case. Writes DIR/first_calls.json. Needs a CUDA
GPU.

Run 46 ran the two drafts this was made from, one for the `triton` cases and one for the
`gluon` cases, with the same cases (the first draft made one call a case and no trivial
backward first, so its first case carries torch's one-time import); their JSON
(`results/first_calls_h200_run46*.json`) names the fields otherwise (NOTES, run 46). This
form ran on the H200 in runs 47 and 48 (`results/first_calls_h200_run4{7,8}_*.json`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import triton
from cold_start import warm_up  # beside this script

import attnkit
from attnkit.backends import fused_triton, hopper_backward, hopper_forward
from attnkit.bench import environment
from attnkit.call import make_call

# name: (batch, heads, seq, head_dim, causal, gradient)
TRITON_CASES = {
    "17x17 d64 causal": (2, 4, 17, 64, True, "randn_like"),
    "100x100 d64": (2, 4, 100, 64, False, "randn_like"),
    "1000x1000 d128 causal": (1, 4, 1000, 128, True, "contiguous"),
    "40x40 d128, sum()'s gradient": (2, 4, 40, 128, False, "sum"),
}
GLUON_CASES = {
    "1k d128 causal": (1, 16, 1024, 128, True, "contiguous"),
    "4k d64": (1, 16, 4096, 64, False, "contiguous"),
    "2k d128": (1, 16, 2048, 128, False, "contiguous"),
    "b2 h8 4k d128 causal": (2, 8, 4096, 128, True, "contiguous"),
}
KERNELS = {
    "fwd": fused_triton._fwd_kernel, "dq": fused_triton._bwd_dq_kernel,
    "dkdv": fused_triton._bwd_dkdv_kernel,
    # None where this Triton has no Gluon
    "gluon fwd": getattr(hopper_forward, "forward_kernel", None),
    "gluon dq": getattr(hopper_backward, "dq_kernel", None),
    "gluon dkdv": getattr(hopper_backward, "dkdv_kernel", None),
}


def compiled(device: torch.device) -> dict[str, int]:
    """How many builds each kernel holds in memory for `device`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    counts = {}
    for name, kernel in KERNELS.items():
        # an Autotuner's JITFunction (a JITFunction's own .fn is its Python function)
        jitted = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        caches = getattr(jitted, "device_caches", {})  # a defaultdict: look, do not index
        counts[name] = len(caches[index][0]) if index in caches else 0
    return counts


def run_case(device: torch.device, case: tuple, gen: torch.Generator) -> dict:
    b, h, s, d, causal, gradient = case
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    contiguous = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=gen)
    counts, calls = [compiled(device)], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            start = time.perf_counter()
            out = attnkit.attention(q, k, v, causal=causal, impl="triton")
            torch.cuda.synchronize()
            middle = time.perf_counter()
            counts.append(compiled(device))
            if gradient == "sum":
                out.float().sum().backward()
            else:
                out.backward(torch.randn_like(out) if gradient == "randn_like" else contiguous)
            torch.cuda.synchronize()
            calls.append((middle - start, time.perf_counter() - middle))
            counts.append(compiled(device))
    call = make_call(q.detach(), k.detach(), v.detach(), causal=causal)
    dout = out.detach()
    return {
        "case": case, "first_s": calls[0], "second_s": calls[1],
        # as _forward decides: a forward whose keys are split takes the Triton kernel
        "gluon": {"forward": fused_triton._uses_hopper_forward(call)
                  and fused_triton._default_key_ranges(call) == 1,
                  "backward (dK/dV, dQ)": fused_triton._uses_hopper_backward(call, dout, dout)},
        "compiled": dict(zip(("before", "after forward", "after backward"), counts[:3],
                             strict=True)),
        "warnings": [str(w.message)[:300] for w in caught],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=("triton", "gluon", "all"), default="all")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    device = torch.device("cuda")
    warm_up(device)
    cases = {**(TRITON_CASES if args.cases != "gluon" else {}),
             **(GLUON_CASES if args.cases != "triton" else {})}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = {}
    for name, case in cases.items():
        rows[name] = run_case(device, case, gen)
        first, second = rows[name]["first_s"], rows[name]["second_s"]
        print(f"{name:32} first fwd {first[0]:6.2f} s, bwd {first[1]:6.2f} s; second "
              f"{1e3 * second[0]:.1f} / {1e3 * second[1]:.1f} ms; compiled "
              f"{rows[name]['compiled']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_calls.json").write_text(json.dumps(
        {**environment(device), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
