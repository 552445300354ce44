"""The fused Triton backend on a GPU: correctness at large shapes, then speed against SDPA.

    PYTHONPATH=src python benchmarks/triton_kernel.py [--out DIR] [--budget SECONDS]

1. Checks `triton` against the float64 oracle (attnkit.verify.check) on large bf16 cases:
   causal or not, grouped heads, masks, windows, odd head dims, dead rows.
2. Times forward and forward+backward (median of triton.testing.do_bench) of `triton`,
   SDPA's flash kernel and SDPA's cuDNN kernel at B=2, H=16, D in (64, 128), S in (1k, 4k,
   8k), and an 8192^3 bf16 matmul for the peak. TFLOP/s counts 4*B*H*Sq*Skv*D, halved
   for causal, times 3.5 for forward+backward.

Prints a table last and writes every number to DIR/triton_kernel.json.
"""

import argparse
import json
import os
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit import attention
from attnkit.backends.fused_triton import autotuned_configs
from attnkit.bench import attention_flops
from attnkit.verify import Case, check

START = time.time()


def checks() -> list[Case]:
    base = Case(batch=2, heads_q=16, heads_kv=16, seq_q=1024, seq_kv=1024, head_dim=128,
                dtype=torch.bfloat16)
    return [
        base,
        replace(base, causal=True),
        replace(base, head_dim=64),
        replace(base, head_dim=64, causal=True),
        replace(base, batch=1, seq_q=4096, seq_kv=4096, causal=True),
        replace(base, heads_kv=4, causal=True, key_lengths=True, dead_rows=True),
        replace(base, head_dim=64, mask="padding", dead_rows=True),
        replace(base, head_dim=64, heads_kv=4, mask="bool", dead_rows=True),
        replace(base, heads_q=4, heads_kv=4, mask="additive"),
        replace(base, window=(256, 0), causal=True),
        replace(base, seq_q=1000, seq_kv=1500, window=(128, 128)),
        replace(base, seq_q=1, seq_kv=4096, heads_kv=2, causal=True),
        replace(base, head_dim=80, seq_q=1000, seq_kv=1000, causal=True),
        replace(base, head_dim=256, heads_q=8, heads_kv=8, seq_q=1000, seq_kv=1000),
    ]


def flops(b, h, s, d, causal, mode):
    return attention_flops(b, h, s, s, d, causal) * (3.5 if mode == "fwd+bwd" else 1.0)


def sdpa_with(backend):
    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


IMPLS = {
    "triton": lambda q, k, v, causal: attention(q, k, v, causal=causal, impl="triton"),
    "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
}


def time_one(impl, b, h, s, d, causal, mode):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_(mode == "fwd+bwd") for _ in range(3))
    fn = IMPLS[impl]
    if mode == "fwd":
        def step():
            fn(q, k, v, causal)
    else:
        grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)

        def step():
            fn(q, k, v, causal).backward(grad)
    step()  # compile and autotune outside the timing
    ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v],
                                 return_mode="median")
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--budget", type=float, default=500.0,
                        help="seconds after which the remaining timings are skipped")
    parser.add_argument("--checks", choices=["all", "quick", "none"], default="all",
                        help="quick: one case per code path (even/odd head dim, masks)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 8192])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "checks": [], "timings": []}
    path = os.path.join(args.out, "triton_kernel.json")

    def save():
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=str)

    cases = checks() if args.checks != "none" else []
    if args.checks == "quick":
        cases = [cases[i] for i in (1, 5, 7, 8, 10, 12)]
    if cases:
        for case in cases:
            t0 = time.time()
            r = check("triton", case, "cuda")
            row = {"case": case.name, "passed": r.passed, "out_err": r.out_err,
                   "lse_err": r.lse_err, "grad_err": r.grad_err, "skipped": r.skipped,
                   "errors": r.errors, "seconds": round(time.time() - t0, 1)}
            record["checks"].append(row)
            print(f"check {'ok  ' if r.passed else 'FAIL'} {case.name:48s} out {r.out_err:.1e} "
                  f"lse {r.lse_err:.1e} grad {r.grad_err:.1e} {row['seconds']}s", flush=True)
            save()
            torch.cuda.empty_cache()

    mat = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: mat @ mat, return_mode="median")
    record["matmul_tflops"] = 2 * 8192**3 / mm_ms / 1e9
    print(f"bf16 matmul 8192^3: {record['matmul_tflops']:.0f} TFLOP/s", flush=True)

    b, h = 2, 16
    for d in args.dims:
        for s in args.seqs:
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    for impl in IMPLS:
                        if time.time() - START > args.budget:
                            continue
                        try:
                            ms = time_one(impl, b, h, s, d, causal, mode)
                            tf = flops(b, h, s, d, causal, mode) / ms / 1e9
                        except Exception as exc:  # a pinned SDPA kernel may refuse
                            ms, tf = float("nan"), float("nan")
                            print(f"{impl} failed: {str(exc)[:200]}", flush=True)
                        record["timings"].append(dict(impl=impl, b=b, h=h, s=s, d=d,
                                                      causal=causal, mode=mode, ms=ms,
                                                      tflops=tf))
                        print(f"{impl:11s} d{d} s{s} {'causal' if causal else 'full  '} "
                              f"{mode:8s} {ms:8.3f} ms {tf:6.0f} TFLOP/s", flush=True)
                        save()
    record["seconds"] = time.time() - START
    record["best_configs"] = autotuned_configs()
    save()
    for name, chosen in record["best_configs"].items():
        print(name, chosen)

    print("\n| D | S | causal | mode | triton | sdpa_flash | sdpa_cudnn |  (TFLOP/s)")
    keyed = {}
    for t in record["timings"]:
        keyed.setdefault((t["d"], t["s"], t["causal"], t["mode"]), {})[t["impl"]] = t["tflops"]
    for (d, s, causal, mode), row in keyed.items():
        cells = " | ".join(f"{row.get(i, float('nan')):.0f}" for i in IMPLS)
        print(f"| {d} | {s} | {causal} | {mode} | {cells} |")
    fails = [c["case"] for c in record["checks"] if not c["passed"]]
    print(f"checks: {len(record['checks']) - len(fails)} passed, failed: {fails}")


if __name__ == "__main__":
    main()
