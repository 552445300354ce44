"""A/B of the Triton backend's code variants in one process, on a GPU.

    PYTHONPATH=src python benchmarks/kernel_variants.py [--out DIR] [--rounds 5]
        [--variant NAME:ATTR=VALUE,ATTR=VALUE ...] [--shape B,H,S,D,C ...] [--backward]
        [--key-lengths] [--fwd-bwd] [--dropout P]

A variant is a set of fused_triton module switches that an experiment adds (run 13's,
taken out again: `_LAZY_RESCALE`, `_EXP_POLY`, `_DKDV_TMA`; NOTES), which the launch
wrappers read on every call, or a kernel module swapped for another build of it
(`hopper_backward=@NAME`: the module NAME, importable from this folder), or any other
value a module beside this script holds (`_HOPPER_ROUTES=@NAME.ATTR`, e.g. a route table
to try); a switch a variant does not set stays as found, whatever ran before it. For each
shape the forward (or, with --backward, the backward; with --fwd-bwd, forward and
backward together through attnkit.attention and autograd, host time and all, as `attnkit
bench` times them) runs autotuned under each variant once (a switch that enters a tuning
key gets its own pick, a switch that does not shares the first one's), then is timed
with triton.testing.do_bench (median, after warm-up, random bf16 data) under each
variant in turns, `--rounds` times over; the medians of the rounds are reported. Timing
in turns matters here: the differences sought are a few %, and the same kernel moves
that much between calls (NOTES, run 10). Each variant's outputs are compared with the
first variant's. --key-lengths gives each batch element a key length drawn in [S/2, S],
as `attnkit bench --key-lengths` does (padded batches). --dropout P drops with
probability P under one fixed seed, the same for every variant (forward or --backward
only). A shape's S may be SQ:SKV, for queries and keys of different lengths (a causal
mask aligned to the bottom right, as attnkit's contract has it; TFLOP/s then count every
pair, as attention_flops does).

Prints one table per shape and writes every sample to DIR/kernel_variants.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics

import torch
import triton
from triton.testing import do_bench

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.bench import attention_flops, environment, padded_lengths
from attnkit.call import make_call
from attnkit.verify import lse_err, rel_err

# (batch, heads, Sq, Skv, head_dim, causal): B*S = 16k tokens, as in the `core` preset.
SHAPES = [
    (4, 16, 4096, 4096, 128, False), (4, 16, 4096, 4096, 128, True),
    (1, 16, 16384, 16384, 128, False), (4, 32, 4096, 4096, 64, False),
    (4, 32, 4096, 4096, 64, True), (1, 32, 16384, 16384, 64, False),
]


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, settings = text.partition(":")
    switches: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        attr, _, value = item.partition("=")
        if not hasattr(ft, attr):
            raise SystemExit(f"fused_triton has no switch {attr!r}")
        # ATTR=@module: one of fused_triton's kernel modules swapped for another build of
        # it, e.g. a copy of the last commit's saved beside this script
        switches[attr] = held_value(value[1:]) if value.startswith("@") else int(value)
    return name, switches


def held_value(path: str) -> object:
    """The module `path`, or, where no module has that name, the attribute ATTR of the
    module MODULE in `path` = MODULE.ATTR."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, attr = path.rpartition(".")
        if not module:
            raise
        return getattr(importlib.import_module(module), attr)


def parse_shape(text: str) -> tuple[int, int, int, int, int, bool]:
    """B,H,S,D,C or B,H,SQ:SKV,D,C as (B, H, SQ, SKV, D, causal)."""
    b, h, seq, d, causal = text.split(",")
    sq, _, skv = seq.partition(":")
    return int(b), int(h), int(sq), int(skv or sq), int(d), causal == "1"


def switch_to(switches: dict[str, object], found: dict[str, object]) -> None:
    """fused_triton as one variant has it: its own switches set, and every other switch
    that some variant sets back at its value as found, so that a variant runs as written
    whatever ran before it."""
    for attr, value in {**found, **switches}.items():
        setattr(ft, attr, value)
    ft._META.clear()  # flags worked out under the last variant's switches


def run_shape(shape, variants, rounds: int, backward: bool, key_lengths: bool,
              fwd_bwd: bool = False, dropout_p: float = 0.0) -> dict:
    b, h, sq, skv, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((b, h, seq, d), device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for seq in (sq, skv, skv, sq))
    lengths = padded_lengths(b, skv, gen) if key_lengths else None
    call = make_call(q, k, v, causal=causal, key_lengths=lengths, dropout_p=dropout_p)
    seed = 1234  # one seed for every variant, so that their outputs compare

    if fwd_bwd:
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]

        def step():
            out = attention(*inputs, causal=causal, key_lengths=lengths, impl="triton")
            return torch.autograd.grad(out, inputs, dout)
    elif backward:
        out, lse = ft._forward(call, seed)  # the backward's input, under the switches as found

        def step():
            return ft._backward(call, seed, out, lse, dout)
    else:
        def step():
            return ft._forward(call, seed)

    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    results = {}
    found = {attr: getattr(ft, attr) for _, switches in variants for attr in switches}
    try:
        for round_ in range(rounds):
            for name, switches in variants:
                switch_to(switches, found)
                if round_ == 0:
                    results[name] = step()
                samples[name].append(float(do_bench(step, warmup=25, rep=150,
                                                    return_mode="median")))
    finally:  # the next shape starts from the switches as found too
        switch_to({}, found)
    flops = attention_flops(b, h, sq, skv, d, causal) * (3.5 if fwd_bwd else
                                                          2.5 if backward else 1.0)
    first = variants[0][0]
    rows = []
    for name, _ in variants:
        ms = statistics.median(samples[name])
        # the forward's (out, lse), the backward's (dq, dk, dv)
        compare = (rel_err,) * 3 if backward or fwd_bwd else (rel_err, lse_err)
        err = max(fn(got, want) for fn, got, want in zip(compare, results[name],
                                                          results[first], strict=True))
        rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9,
                     "vs_first": statistics.median(samples[first]) / ms,
                     "rel_err_vs_first": err, "samples": samples[name]})
        print(f"  {name:14s} {ms:.3f} ms  {flops / ms / 1e9:5.0f} TFLOP/s  "
              f"x{rows[-1]['vs_first']:.3f}  err vs {first} {err:.1e}", flush=True)
    picked = ft.autotuned_configs()
    print(f"  autotuner picks so far: {picked}", flush=True)
    return {"shape": {"batch": b, "heads": h, "seq": sq, "seq_kv": skv, "head_dim": d,
                      "causal": causal},
            "key_lengths": None if lengths is None else lengths.tolist(),
            "dropout_p": dropout_p,
            "backward": backward, "fwd_bwd": fwd_bwd, "rows": rows, "autotuned": picked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,S,D,C",
                        help="S may be SQ:SKV")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward (dQ, dK, dV) instead of the forward")
    parser.add_argument("--fwd-bwd", action="store_true",
                        help="time forward+backward through attention() and autograd")
    parser.add_argument("--key-lengths", action="store_true",
                        help="key lengths drawn in [S/2, S] per batch element")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="dropout probability (forward or --backward only)")
    args = parser.parse_args()
    if args.dropout and args.fwd_bwd:
        parser.error("--dropout with --fwd-bwd: attention() draws a new seed per call, so "
                     "the variants' outputs would not compare")
    if not args.variant:
        raise SystemExit("give the variants to compare: --variant NAME:ATTR=VALUE,... (twice "
                         "or more); fused_triton keeps no switches between experiments")
    variants = [parse_variant(text) for text in args.variant]
    shapes = [parse_shape(text) for text in args.shape] or SHAPES
    report = {"meta": {**environment(torch.device("cuda")), "kind": "kernel-variants",
                       "triton": triton.__version__,
                       "variants": args.variant, "rounds": args.rounds},
              "results": []}
    os.makedirs(args.out, exist_ok=True)
    for shape in shapes:
        mode = "forward+backward" if args.fwd_bwd else "backward" if args.backward else "forward"
        print(f"{mode} {shape}{' key lengths' if args.key_lengths else ''}"
              f"{f' dropout {args.dropout}' if args.dropout else ''}", flush=True)
        report["results"].append(run_shape(shape, variants, args.rounds, args.backward,
                                           args.key_lengths, args.fwd_bwd, args.dropout))
        with open(os.path.join(args.out, "kernel_variants.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
