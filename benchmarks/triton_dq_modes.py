"""The backward's three ways of getting dq, side by side on a GPU (fused_triton.DQ_MODES).

    PYTHONPATH=src python benchmarks/triton_dq_modes.py [--out DIR] [--budget SECONDS]

"kernel" is the separate dQ kernel (7 matmuls in all), "atomic" adds dq from the dK/dV
kernel in any order (5 matmuls, not bitwise repeatable), "ordered" the same adds in a
fixed order (causal only; full attention falls back to "kernel"). For each mode:
1. the oracle check (attnkit.verify.check) on a few bf16 cases, and the "ordered" turn
   waits that gave up (fused_triton.order_faults, must stay 0);
2. whether two backward passes agree bit for bit;
3. backward and forward+backward time (median of triton.testing.do_bench) on `core`
   shapes with S >= 1k, TFLOP/s counted as in `attnkit bench` (backward = 2.5 forwards).
Writes DIR/triton_dq_modes.json after every row.

--quick keeps a cold machine's compile time short (each tile config of each flag set is a
compile of several seconds): one tile config per kernel, two for the dK/dV kernel with dq
added in, two checks, and the D=128 and causal shapes at 4k and 16k only.
"""

import argparse
import json
import os
import time
from dataclasses import replace

import torch
import triton

from attnkit import attention
from attnkit.backends import fused_triton
from attnkit.bench import attention_flops
from attnkit.verify import Case, check

START = time.time()
SHAPES = [(b, h, s, d, causal) for causal in (False, True)
          for d, h in ((128, 16), (64, 32)) for b, s in ((16, 1024), (4, 4096), (1, 16384))]


def checks() -> list[Case]:
    base = Case(batch=2, heads_q=16, heads_kv=16, seq_q=1024, seq_kv=1024, head_dim=128,
                dtype=torch.bfloat16, causal=True)
    return [base, replace(base, causal=False), replace(base, head_dim=64, heads_kv=4),
            replace(base, seq_q=1000, seq_kv=1500, key_lengths=True, dead_rows=True),
            replace(base, window=(256, 0), mask="padding", dead_rows=True),
            replace(base, head_dim=80, seq_q=1000, seq_kv=1000)]


def quick() -> None:
    """Narrow the autotuners' lists (see --quick)."""
    def configs(*tiles):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in tiles]

    fused_triton._DKDV_CONFIGS[:] = [(64, 128, 8, 3)]
    fused_triton._DKDV_DQ_CONFIGS[:] = [(64, 128, 8, 2), (32, 128, 8, 2)]
    fused_triton._fwd_kernel.configs = configs((128, 64, 8, 3))
    fused_triton._bwd_dq_kernel.configs = configs((128, 64, 8, 3))
    fused_triton._bwd_dkdv_kernel.configs = configs(*fused_triton._DKDV_CONFIGS,
                                                    *fused_triton._DKDV_DQ_CONFIGS)


def grads(q, k, v, grad, causal):
    out = attention(q, k, v, causal=causal, impl="triton")
    return torch.autograd.grad(out, (q, k, v), grad)


def time_ms(q, k, v, grad, causal) -> tuple[float, float]:
    """Median backward and forward+backward time."""
    out = attention(q, k, v, causal=causal, impl="triton")
    bwd = triton.testing.do_bench(
        lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    return bwd, triton.testing.do_bench(lambda: grads(q, k, v, grad, causal))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=420.0)
    parser.add_argument("--quick", action="store_true", help="see the module docstring")
    args = parser.parse_args()
    shapes, cases = SHAPES, checks()
    if args.quick:
        quick()
        shapes = [x for x in SHAPES if x[2] >= 4096 and (x[3] == 128 or x[4])]
        cases = [cases[1], cases[3]]
        fused_triton._MAX_SPINS = 1 << 14  # a wrong turn costs milliseconds, not seconds
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "checks": [], "timings": []}

    def save():
        record["autotuned"] = fused_triton.autotuned_configs()
        with open(os.path.join(args.out, "triton_dq_modes.json"), "w") as f:
            json.dump(record, f, indent=1)

    dev = torch.device("cuda")
    for mode in fused_triton.DQ_MODES:
        fused_triton._dq_mode = mode
        for case in cases:
            if mode == "ordered" and not case.causal:
                continue
            r = check("triton", case, dev)
            row = {"mode": mode, "case": case.name, "passed": r.passed, "grad_err": r.grad_err,
                   "out_err": r.out_err, "faults": fused_triton.order_faults(dev)}
            record["checks"].append(row)
            print(row, f"{time.time() - START:.0f} s", flush=True)
            save()
    for b, h, s, d, causal in shapes:
        q, k, v, grad = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fwd = attention_flops(b, h, s, s, d, causal)
        first = None
        for mode in fused_triton.DQ_MODES:
            if time.time() - START > args.budget:
                print("budget spent", flush=True)
                save()
                return
            if mode == "ordered" and not causal:
                continue  # falls back to "kernel"
            fused_triton._dq_mode = mode
            got = grads(q, k, v, grad, causal)
            again = grads(q, k, v, grad, causal)
            first = first or got
            bwd_ms, both_ms = time_ms(q, k, v, grad, causal)
            same = all(torch.equal(x, y) for x, y in zip(got, again, strict=True))
            row = {"mode": mode, "b": b, "h": h, "s": s, "d": d, "causal": causal,
                   "bwd_ms": bwd_ms, "fwd_bwd_ms": both_ms,
                   "bwd_tflops": 2.5 * fwd / bwd_ms * 1e-9,
                   "fwd_bwd_tflops": 3.5 * fwd / both_ms * 1e-9,
                   "bitwise_repeatable": same,
                   "dq_vs_kernel": ((got[0].float() - first[0].float()).norm()
                                    / first[0].float().norm()).item(),
                   "faults": fused_triton.order_faults(dev)}
            record["timings"].append(row)
            print(f"b{b} h{h} s{s} d{d} {'causal' if causal else 'full  '} {mode:8s} "
                  f"bwd {bwd_ms:7.3f} ms {row['bwd_tflops']:5.0f} TF/s  fwd+bwd "
                  f"{both_ms:7.3f} ms {row['fwd_bwd_tflops']:5.0f} TF/s  repeatable "
                  f"{row['bitwise_repeatable']}  dq diff {row['dq_vs_kernel']:.1e}  "
                  f"faults {row['faults']}", flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
