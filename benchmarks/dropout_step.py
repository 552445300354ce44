"""A training step's attention with dropout, by backend, and what `auto` picks, on a GPU.

    PYTHONPATH=src python benchmarks/dropout_step.py [--out DIR] [--dropout 0.1]
        [--shape B,H,S,D,C ...] [--impl NAME ...]

`attnkit bench` times no dropout; `auto` routes calls with dropout and gradients by
fused_triton._LEADS_WITH_DROPOUT_REACH, measured here. For each shape (C: 1 causal, 0
not) every backend runs forward and backward through attnkit.attention and autograd,
host time included, as `attnkit bench` times a step: triton.testing.do_bench's median
after warm-up, random bf16 data. A backend that refuses the call is reported with its
error's type. Prints one line per shape; writes DIR/dropout_step.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from attnkit import attention
from attnkit.bench import environment
from attnkit.call import make_call
from attnkit.functional import select

SHAPES = [(2, 16, 4096, 256, True), (2, 16, 4096, 256, False), (8, 16, 1024, 256, False),
          (8, 16, 1024, 256, True), (4, 16, 2048, 256, True), (2, 16, 4096, 192, True),
          (2, 16, 4096, 128, True), (4, 16, 4096, 128, False)]
IMPLS = ["triton", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "auto"]


def step_ms(shape: tuple[int, int, int, int, bool], impl: str, dropout_p: float) -> float:
    """Milliseconds of one forward+backward of impl on shape, with dropout."""
    b, h, s, d, causal = shape
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        out = attention(q, k, v, causal=causal, dropout_p=dropout_p, impl=impl)
        return torch.autograd.grad(out, (q, k, v), grad)

    return do_bench(step, warmup=10, rep=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,S,D,C")
    parser.add_argument("--impl", action="append", default=[])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dropout_step.py times on a GPU")
    shapes = [(*map(int, text.split(",")[:4]), text.split(",")[4] == "1")
              for text in args.shape] or SHAPES
    results = []
    for shape in shapes:
        b, h, s, d, causal = shape
        q = torch.empty(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        picked = select(make_call(q, q, q, causal=causal, dropout_p=args.dropout)).name
        times: dict[str, float | str] = {}
        for impl in args.impl or IMPLS:
            try:
                times[impl] = round(step_ms(shape, impl, args.dropout), 4)
            except Exception as error:  # a backend that refuses the call
                times[impl] = type(error).__name__
        print(shape, "auto picks", picked, times, flush=True)
        results.append({"shape": {"batch": b, "heads": h, "seq": s, "head_dim": d,
                                  "causal": causal}, "auto_picks": picked, "ms": times})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dropout_step.json"), "w") as f:
        json.dump({"environment": environment(torch.device("cuda")), "dropout_p": args.dropout,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
