"""Time each Triton kernel (forward, dK/dV, dQ) under every candidate tile config, on a GPU.

    PYTHONPATH=src python benchmarks/triton_configs.py [--out DIR] [--budget SECONDS]
                                                       [--tuned-only | --forward-only]
                                                       [--shape B,H,S,D,C ...]
                                                       [--config M,N,WARPS,STAGES ...]
                                                       [--repeat N]

The `core` bench times the autotuned backend as a whole; this separates it. For each
shape it launches every kernel with each config of CANDIDATES given explicitly (the
`_launch` path of fused_triton, bypassing the autotuner), times it with
triton.testing.do_bench (median, after warm-up, random bf16 data), then asks the
autotuner which config it picks: which configs belong in _FWD_CONFIGS, _DKDV_CONFIGS
and _DQ_CONFIGS, and whether a slow shape is a tile problem at all (benchmarks/NOTES.md,
run 5). --tuned-only times just the autotuned kernels, to compare kernel versions, and
the forward under each of its own configs with K/V loads through TMA and through pointers
(an A/B in one process, where the GPU it runs on takes TMA), beside the autotuner's own
timings of those configs. --forward-only times the forward alone under every config of
CANDIDATES and FORWARD_EXTRA, each through TMA and through pointers, and checks each one's
output and log-sum-exp against the float64 oracle: a wider search than the autotuner's
lists, for what to add to _FWD_CONFIGS / _FWD_TMA_CONFIGS. --config limits any mode to
the tile configs given; --repeat N times each config of the kernel sweep N times, the
configs in turns, and keeps the medians.

Prints one table per shape and writes every number to DIR/triton_configs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
from triton.testing import do_bench

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.bench import attention_flops
from attnkit.call import make_call
from attnkit.verify import rel_err

START = time.time()

# (batch, heads, seq, head_dim, causal): B*S = 16k tokens, as in the `core` preset.
SHAPES = [
    (32, 32, 512, 64, True),
    (32, 32, 512, 64, False),
    (32, 16, 512, 128, False),
    (16, 16, 1024, 128, True),
    (4, 32, 4096, 64, False),
    (4, 16, 4096, 128, False),
    (1, 16, 16384, 128, True),
]

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The backward kernels read BLOCK_N as their
# key tile and BLOCK_M as their query tile, like the forward.
CANDIDATES = [
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4),
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3),
    (64, 128, 4, 3), (64, 128, 8, 3),
    (128, 128, 8, 2), (128, 128, 8, 3),
    (32, 64, 4, 2), (32, 128, 4, 2),
]
# Forward-only tiles too large for the backward kernels' shared memory or registers.
FORWARD_EXTRA = [(128, 64, 8, 4), (128, 128, 4, 3), (128, 128, 8, 4), (256, 64, 8, 3),
                 (256, 128, 8, 2)]


def time_ms(fn) -> float | None:
    try:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    except Exception as exc:  # out of shared memory, say: that config cannot run here
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return None


def sweep(shape: tuple[int, int, int, int, bool], candidates: list,
          forward_only: bool = False, repeat: int = 1) -> dict:
    b, h, s, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    call = make_call(q, k, v, causal=causal)
    ft._fwd_kernel.configs_timings = {}
    out, lse = ft._forward(call, 0)  # autotuned, also the reference for the backward
    # The autotuner's own timings of the forward's configs for this shape (empty when an
    # earlier shape had the same tuning key), to set beside do_bench's below.
    tuner_ms = {str(config): timing
                for config, timing in (ft._fwd_kernel.configs_timings or {}).items()}
    for config, timing in tuner_ms.items():
        print(f"  autotuner timed fwd {config}: {timing}", flush=True)
    fl = attention_flops(b, h, s, s, d, causal)
    rows = []
    if forward_only:  # each config's out and lse against the float64 oracle, too
        ref_out, ref_lse = attention(q.double(), k.double(), v.double(), causal=causal,
                                     impl="reference", return_lse=True)
    for config in candidates if forward_only else []:
        loads = (True, False) if ft._tma_ready(k, v) else (False,)
        times = [time_ms(lambda c=config, t=tma: ft._forward(call, 0, c, tma=t))
                 for tma in loads]
        errors = []
        for tma, t in zip(loads, times, strict=True):
            if t is not None:
                out_c, lse_c = ft._forward(call, 0, config, tma=tma)
                errors.append(max(rel_err(out_c, ref_out), rel_err(lse_c, ref_lse)))
        rows.append({"config": list(config), "fwd_ms": times[-1],
                     "fwd_tma_ms": times[0] if len(times) == 2 else None,
                     "worst_rel_err": max(errors, default=None)})
        wrong = " WRONG" if any(e > 1e-2 for e in errors) else ""
        print(f"  fwd {config}: " + ", ".join(
            f"{name} {t:.3f} ms ({fl / t / 1e9:.0f} TFLOP/s)" if t else f"{name} -"
            for name, t in zip(("TMA", "pointers")[2 - len(times):], times, strict=True))
            + f"; worst rel err {max(errors, default=float('nan')):.1e}{wrong}", flush=True)
    # Each config timed `repeat` times, the configs in turns, medians kept: the same pair
    # timed twice in one process moved 6% (NOTES, run 10), as much as tiles differ.
    samples: dict[tuple, list[list]] = {c: [[], [], []] for c in candidates}
    for _ in range(repeat if not forward_only else 0):
        for config, (fwd, dkdv, dq) in samples.items():
            fwd.append(time_ms(lambda c=config: ft._forward(call, 0, c)))
            dkdv.append(time_ms(
                lambda c=config: ft._backward(call, 0, out, lse, dout, (c, None))))
            dq.append(time_ms(
                lambda c=config: ft._backward(call, 0, out, lse, dout, (None, c))))
    for config, timings in samples.items() if not forward_only else ():
        fwd, dkdv, dq = (None if None in t else statistics.median(t) for t in timings)
        rows.append({"config": list(config), "fwd_ms": fwd,
                     "bwd_with_this_dkdv_ms": dkdv, "bwd_with_this_dq_ms": dq,
                     "samples": timings})
        print(f"  {config}: fwd {fwd and f'{fwd:.3f}'} ms "
              f"({fwd and f'{fl / fwd / 1e9:.0f}'} TFLOP/s); bwd with it as dK/dV "
              f"{dkdv and f'{dkdv:.3f}'} ms, as dQ {dq and f'{dq:.3f}'} ms", flush=True)
    loads = {}
    if not candidates and ft._tma_ready(k, v):
        for config in ft._FWD_CONFIGS:
            times = [time_ms(lambda c=config, t=tma: ft._forward(call, 0, c, tma=t))
                     for tma in (True, False)]
            loads[str(config)] = {"tma_ms": times[0], "pointer_ms": times[1]}
            print(f"  fwd {config}: TMA {times[0] and f'{times[0]:.3f}'} ms, pointers "
                  f"{times[1] and f'{times[1]:.3f}'} ms", flush=True)
    tuned_fwd = time_ms(lambda: ft._forward(call, 0))
    tuned_bwd = None if forward_only else time_ms(
        lambda: ft._backward(call, 0, out, lse, dout))
    print(f"  autotuned: fwd {tuned_fwd:.3f} ms ({fl / tuned_fwd / 1e9:.0f} TFLOP/s), "
          f"bwd {tuned_bwd and f'{tuned_bwd:.3f}'} ms "
          f"({tuned_bwd and f'{2.5 * fl / tuned_bwd / 1e9:.0f}'} TFLOP/s)", flush=True)
    return {
        "shape": {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal},
        "flops_fwd": fl,
        "rows": rows,
        "fwd_loads": loads,
        "fwd_autotuner_ms": tuner_ms,
        "autotuned": {"fwd_ms": tuned_fwd, "bwd_ms": tuned_bwd,
                      "picked": ft.autotuned_configs()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=480.0,
                        help="stop starting new shapes after this many seconds")
    parser.add_argument("--tuned-only", action="store_true",
                        help="time only what the autotuner picks (about a minute)")
    parser.add_argument("--forward-only", action="store_true",
                        help="the forward alone under more tile configs, TMA and pointers")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each config this many times, the configs in turns, "
                        "and keep the medians (kernel sweep)")
    parser.add_argument("--config", action="append", default=[],
                        metavar="BLOCK_M,BLOCK_N,WARPS,STAGES",
                        help="only these tile configs (repeatable)")
    parser.add_argument("--shape", action="append", default=[],
                        metavar="BATCH,HEADS,SEQ,HEAD_DIM,CAUSAL",
                        help="only these shapes (repeatable; CAUSAL 0 or 1)")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] or SHAPES
    shapes = [(b, h, s, d, bool(causal)) for b, h, s, d, causal in shapes]
    if args.tuned_only and args.forward_only:
        parser.error("--tuned-only and --forward-only exclude each other")
    candidates = ([] if args.tuned_only else
                  CANDIDATES + FORWARD_EXTRA if args.forward_only else CANDIDATES)
    if args.config:
        candidates = [tuple(int(x) for x in c.split(",")) for c in args.config]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shapes": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triton_configs.json")
    for shape in shapes:
        if time.time() - START > args.budget:
            print(f"budget of {args.budget:.0f} s spent; not run: {shape}")
            continue
        print(f"{shape} (batch, heads, seq, head_dim, causal)", flush=True)
        result["shapes"].append(sweep(shape, candidates, args.forward_only, args.repeat))
        with open(path, "w") as f:  # after every shape, so a cut-off run keeps its data
            json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
