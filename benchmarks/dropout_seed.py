"""What dropout, and reading its seed from GPU memory, cost the Triton kernels, on a GPU.

    PYTHONPATH=src python benchmarks/dropout_seed.py [--out DIR] [--rounds 5]
        [--dropout 0.1] [--shape B,H,S,D,C ...] [--pieces] [--kinds none,tensor,...]

What dropout costs the Triton kernels. Since run 33 `run` draws the Philox seed as a 0-d
int64 tensor on the call's device and the kernels load it (so that each replay of a
captured CUDA graph drops anew); before, they took it by value. The kernels still take
either, so for each shape the forward and the backward kernels (fused_triton._forward,
_backward; no autograd, no host work of `run`) run without dropout (`none`), with it and
the seed as an int (`int`), and with the same seed in a device tensor (`tensor`); beside
them SDPA's default backend without and with the same dropout (`sdpa_none`, `sdpa_int`),
its backward through autograd (at these sizes the GPU time hides the host's). All are
timed in turns with triton.testing.do_bench (median, after warm-up, random bf16 data),
`--rounds` times over. `int` and `tensor` drop the same scores, which
tests/test_triton.py checks on the GPU under every tile
(test_dropout_drops_the_same_scores_under_every_tile_on_gpu); here the autotuner picks
for each seed kind apart, so their outputs may differ by rounding. Prints one line per
shape and pass; writes DIR/dropout_seed.json, with the autotuner's picks.

--pieces also times the backward's two Triton kernels alone (`dq`: the dQ kernel, which
writes delta; `dkdv`: the dK/dV kernel), each autotuned, for the chosen kinds: these say
what dropout costs each Triton kernel against that kernel without it. On Hopper, where
the Gluon backward kernels cover the call, it times them alone too (`gluon_dq`,
`gluon_dkdv`; `backward` runs them, with dropout too since run 36).

--kinds times only those of none, int, tensor, sdpa_none, sdpa_int (all by default): on
a cold process most of the time is the autotuner's, which tunes each seed kind apart and
with dropout keeps every tile, so `--kinds none,tensor,sdpa_int` takes about half.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import torch
import torch.nn.functional as F
import triton
from kernel_variants import parse_shape  # beside this script
from triton.testing import do_bench

from attnkit.backends import fused_triton as ft
from attnkit.bench import attention_flops, environment
from attnkit.call import make_call

SHAPES = ["4,16,4096,128,0", "4,16,4096,128,1", "16,16,1024,128,1", "4,32,4096,64,1"]
SEED = 1234
KINDS = ("none", "int", "tensor", "sdpa_none", "sdpa_int")
# each pass's share of the forward's matmul FLOPs: the backward does 5 matmuls to the
# forward's 2, the dQ kernel 2 of them, the dK/dV kernel 4 (it recomputes S and dP)
BACKWARD_SHARE = {"backward": 2.5, "dq": 1.0, "dkdv": 2.0}


def run_shape(shape, dropout_p: float, rounds: int, pieces: bool,
              kinds: tuple[str, ...] = KINDS) -> list[dict]:
    b, h, s, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    calls = {"none": make_call(q, k, v, causal=causal),
             "int": make_call(q, k, v, causal=causal, dropout_p=dropout_p)}
    calls["tensor"] = calls["int"]
    calls = {kind: call for kind, call in calls.items() if kind in kinds}
    seeds = {"none": 0, "int": SEED, "tensor": torch.tensor(SEED, device="cuda")}
    forwards = {kind: ft._forward(call, seeds[kind]) for kind, call in calls.items()}
    passes = {"forward": lambda kind: ft._forward(calls[kind], seeds[kind]),
              "backward": lambda kind: ft._backward(calls[kind], seeds[kind],
                                                    *forwards[kind], dout)}
    if pieces:
        passes |= backward_pieces(calls, seeds, forwards, dout)
    # SDPA's default backend without and with the same dropout beside them; its backward
    # through autograd (the graph kept, so each pass runs only the backward again)
    sdpa = {kind: p for kind, p in (("none", 0.0), ("int", dropout_p))
            if f"sdpa_{kind}" in kinds}
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    sdpa_outs = {kind: F.scaled_dot_product_attention(qg, kg, vg, dropout_p=p, is_causal=causal)
                 for kind, p in sdpa.items()}
    sdpa_steps = {"forward": lambda kind: F.scaled_dot_product_attention(
                      q, k, v, dropout_p=sdpa[kind], is_causal=causal),
                  "backward": lambda kind: torch.autograd.grad(
                      sdpa_outs[kind], (qg, kg, vg), dout, retain_graph=True)}
    rows = []
    for name, step in passes.items():
        timed = {kind: functools.partial(step, kind) for kind in calls}
        if name in sdpa_steps:
            timed |= {f"sdpa_{kind}": functools.partial(sdpa_steps[name], kind)
                      for kind in sdpa}
        samples: dict[str, list[float]] = {kind: [] for kind in timed}
        for _ in range(rounds):
            for kind, fn in timed.items():
                samples[kind].append(float(do_bench(fn, warmup=25, rep=150,
                                                    return_mode="median")))
        ms = {kind: statistics.median(times) for kind, times in samples.items()}
        flops = (attention_flops(b, h, s, s, d, causal)
                 * BACKWARD_SHARE.get(name.removeprefix("gluon_"), 1))
        rows.append({"shape": {"batch": b, "heads": h, "seq": s, "head_dim": d,
                               "causal": causal}, "pass": name, "ms": ms,
                     "tflops": {kind: flops / t / 1e9 for kind, t in ms.items()},
                     "samples": samples})
        print(f"{name:8s} b{b} h{h} s{s} d{d} {'causal' if causal else 'full  '}  "
              + "  ".join(f"{kind} {t:.3f} ms" for kind, t in ms.items()), flush=True)
    return rows


def backward_pieces(calls: dict, seeds: dict, forwards: dict, dout) -> dict:
    """--pieces: the passes `dq` and `dkdv`, the Triton backward kernels alone per kind,
    and `gluon_dq` and `gluon_dkdv`, the Gluon ones, each where it covers the call of
    every kind timed (Hopper; fused_triton's _uses_hopper_backward). All are launched
    through the functions _backward launches them with; their shared arguments, delta
    and gradient buffers are made once per kind, outside the timed passes."""
    metas = {kind: ft._meta(call, seeds[kind]) for kind, call in calls.items()}
    shared = {kind: ft._backward_shared(call, metas[kind], forwards[kind][1], dout)
              for kind, call in calls.items()}
    delta = {kind: torch.empty_like(lse) for kind, (_, lse) in forwards.items()}
    grads = {kind: ft._empty_grads(call.q, call.k, call.v) for kind, call in calls.items()}

    def dq(kind: str):
        out, lse = forwards[kind]
        ft._launch_dq(calls[kind], shared[kind], out, lse, dout, delta[kind], grads[kind][0])

    def dkdv(kind: str):
        ft._launch_dkdv(calls[kind], shared[kind], forwards[kind][1], dout, delta[kind],
                        *grads[kind][1:])

    def gluon_dq(kind: str):
        out, lse = forwards[kind]
        ft._launch_gluon_dq(calls[kind], seeds[kind], metas[kind][1]["HEAD_GROUP"], out, lse,
                            dout, delta[kind], grads[kind][0])

    def gluon_dkdv(kind: str):
        ft._launch_gluon_dkdv(calls[kind], seeds[kind], metas[kind][1]["HEAD_GROUP"],
                              forwards[kind][1], dout, delta[kind], *grads[kind][1:])

    for kind in calls:  # the dK/dV kernels read the delta that the dQ kernel wrote
        dq(kind)
    pieces = {"dq": dq, "dkdv": dkdv}
    fits = [ft._uses_hopper_backward(call, forwards[kind][0], dout)
            for kind, call in calls.items()]
    if all(dkdv_fits for dkdv_fits, _ in fits):
        pieces["gluon_dkdv"] = gluon_dkdv
    if all(dq_fits for _, dq_fits in fits):
        pieces["gluon_dq"] = gluon_dq
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,S,D,C")
    parser.add_argument("--pieces", action="store_true",
                        help="also time the backward's kernels alone (the Triton ones, "
                             "and on Hopper the Gluon ones)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma-separated, of: " + ", ".join(KINDS))
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    report = {"meta": {**environment(torch.device("cuda")), "kind": "dropout-seed",
                       "triton": triton.__version__, "dropout_p": args.dropout,
                       "rounds": args.rounds}, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for text in args.shape or SHAPES:
        b, h, sq, skv, d, causal = parse_shape(text)
        if sq != skv:  # SDPA's is_causal aligns to the top left, attnkit's to the bottom right
            raise SystemExit(f"--shape {text}: one length for queries and keys here")
        report["rows"] += run_shape((b, h, sq, d, causal), args.dropout, args.rounds,
                                  args.pieces, kinds)
        report["picks"] = ft.autotuned_configs()  # the seed kinds are tuned apart
        with open(os.path.join(args.out, "dropout_seed.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
