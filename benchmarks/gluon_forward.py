"""The Gluon forward for Hopper (`backends/hopper_forward.py`) against the Triton one, on a GPU.

    PYTHONPATH=src python benchmarks/gluon_forward.py [--out DIR] [--rounds 5]
        [--shape B,H,S,D,C ...] [--config BLOCK_N,STAGES,WARPGROUPS[,O_TMA,OWN_RANGES] ...]

First every tile config is checked against the float64 oracle on awkward inputs (odd
lengths, causal with Sq != Skv and rows that see no key, key_lengths with an empty row,
grouped heads, q/k/v as strided views of one QKV projection); any failure stops the run.
Then on each shape the Triton forward (autotuned, as `attnkit` runs it) and every Gluon
config are timed with triton.testing.do_bench in turns, `--rounds` times over, on random
bf16 data; medians of the rounds are reported in TFLOP/s. Writes DIR/gluon_forward.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import torch
from triton.testing import do_bench

from attnkit.backends import fused_triton as ft
from attnkit.backends import hopper_forward as hf
from attnkit.backends import reference
from attnkit.bench import attention_flops, environment
from attnkit.call import make_call
from attnkit.verify import lse_err, rel_err

SHAPES = [
    (4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (2, 16, 8192, 128, False),
    (2, 16, 8192, 128, True), (1, 16, 16384, 128, False), (1, 16, 16384, 128, True),
    (4, 32, 4096, 64, False), (4, 32, 4096, 64, True), (1, 32, 16384, 64, False),
    (1, 32, 16384, 64, True), (16, 16, 1024, 128, True), (16, 32, 1024, 64, False),
]

# (B, Hq, Hkv, Sq, Skv, D, causal, lengths, qkv-view)
CASES = [
    (2, 4, 4, 1000, 1000, 128, False, None, False),
    (2, 4, 4, 1000, 1000, 128, True, None, False),
    (2, 4, 4, 1000, 1000, 64, True, None, False),
    (1, 4, 4, 17, 1000, 128, True, None, False),
    (1, 4, 4, 1000, 17, 64, True, None, False),  # rows before the first key see nothing
    (2, 4, 4, 1, 300, 128, False, None, False),
    (2, 4, 4, 300, 700, 128, False, [0, 555], False),  # batch 0 sees no key at all
    (2, 4, 4, 700, 700, 64, True, [700, 333], False),
    (2, 8, 2, 513, 513, 128, True, None, False),
    (2, 6, 6, 777, 777, 128, True, None, True),
    (2, 6, 6, 777, 777, 64, False, None, True),
    # more tiles than a GPU has multiprocessors: persistent programs walk several, of
    # different lengths (the K/V ring and Q's buffers carry over from tile to tile)
    (3, 8, 2, 2000, 2000, 128, True, [2000, 777, 0], False),
    (3, 8, 4, 2000, 2000, 64, False, [1500, 0, 2000], False),
    # 8-16 tiles per program on 132 multiprocessors, as long calls have (run 18's
    # chained-tiles config passed every case above and then faulted at 4k)
    (8, 16, 4, 1000, 1000, 128, True, None, False),
    (8, 32, 8, 1000, 1000, 64, True, None, False),
]


def make_inputs(case, gen):
    b, hq, hkv, sq, skv, d, causal, lengths, view = case
    dev, dt = "cuda", torch.bfloat16
    if view:  # one (B, S, 3, H, D) projection, q/k/v as (B, H, S, D) views into it
        qkv = torch.randn((b, sq, 3, hq, d), device=dev, dtype=dt, generator=gen)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn((b, hq, sq, d), device=dev, dtype=dt, generator=gen)
        k, v = (torch.randn((b, hkv, skv, d), device=dev, dtype=dt, generator=gen)
                for _ in range(2))
    key_lengths = None if lengths is None else torch.tensor(lengths, device=dev)
    return make_call(q, k, v, causal=causal, key_lengths=key_lengths)


def run_gluon(call, config):
    q = call.q
    out, lse = ft._empty_outputs(q, call.v)
    hf.launch(q, call.k, call.v, out, lse, call.key_lengths, call.causal, call.scale, config,
              ft._hopper_head_group(call))  # as _forward does
    return out, lse


def check(configs) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for case in CASES:
        call = make_inputs(case, gen)
        want_out, want_lse = reference.BACKEND.run(make_call(
            call.q.double(), call.k.double(), call.v.double(), causal=call.causal,
            key_lengths=call.key_lengths, return_lse=True))
        for config in configs[case[5]]:
            out, lse = run_gluon(call, config)
            torch.cuda.synchronize()
            err = rel_err(out.double(), want_out)
            lse_ok = lse_err(lse, want_lse) < 1e-3
            ok = err < 1e-2 and lse_ok and not torch.isnan(out).any()
            record(rows, case, config, {"rel_err": err, "lse_ok": lse_ok}, bool(ok))
    return rows


def record(rows: list, case, config, errs: dict, ok: bool) -> None:
    """One check of a case under a config: appended to rows and printed."""
    rows.append({"case": list(map(str, case)), "config": config, **errs, "ok": ok})
    print(f"{'ok  ' if ok else 'FAIL'} {case} {config}: "
          + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in errs.items()), flush=True)


def triton_forward(call):
    """out, lse from fused_triton's own forward kernel, not the Gluon one it may route to."""
    ft._HOPPER_FORWARD = False
    try:
        return ft._forward(call, 0)
    finally:
        ft._HOPPER_FORWARD = True


def time_shape(shape, configs, rounds: int) -> dict:
    b, h, s, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    call = make_call(q, k, v, causal=causal)
    ref_out, _ = triton_forward(call)  # autotunes once
    runs = {"triton": lambda: triton_forward(call)}
    for config in configs[d]:
        out, _ = run_gluon(call, config)
        err = rel_err(out.float(), ref_out.float())
        print(f"  gluon {config} against triton: rel err {err:.2e}")
        runs[f"gluon {config}"] = (lambda c=config: run_gluon(call, c))
    return time_in_turns(shape, runs, rounds, attention_flops(b, h, s, s, d, causal))


def time_against_triton(shape, configs, rounds: int, prepare, triton_fn, gluon_fn,
                        matmuls: int, what: str) -> dict:
    """For the backward experiments: prepare(B, Hq, Hkv, Sq, Skv, D, causal, lengths,
    generator) gives the arguments both kernels take; fused_triton's (triton_fn, warmed up
    and autotuned first) and each Gluon config's are timed by time_in_turns, on `matmuls`
    matmuls of the forward's size."""
    b, h, s, d, causal = shape
    args = prepare(b, h, h, s, s, d, causal, None, torch.Generator(device="cuda").manual_seed(0))
    triton_fn(*args)
    runs = {"triton": lambda: triton_fn(*args)}
    for config in configs:
        runs[f"gluon {config or 'routed'}"] = (lambda c=config: gluon_fn(*args, c))
    flops = attention_flops(b, h, s, s, d, causal) * matmuls / 2
    return time_in_turns(shape, runs, rounds, flops, what)


def time_in_turns(shape, runs: dict, rounds: int, flops: float, what: str = "") -> dict:
    """Each of runs (name -> callable; the first is the baseline) timed with do_bench once
    per round, in turns, `rounds` times; prints the medians (ms, TFLOP/s of `flops`, and
    speed against the baseline) and returns every sample."""
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            samples[name].append(do_bench(fn, warmup=25, rep=100))
    med = {name: statistics.median(ms) for name, ms in samples.items()}
    base = next(iter(med.values()))
    b, h, s, d, causal = shape
    print(f"B{b} H{h} S{s} D{d} {'causal' if causal else 'full'}{what}:")
    for name, ms in med.items():
        print(f"  {name:24s} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  "
              f"{base / ms:5.2f}x")
    return {"shape": list(shape), "flops": flops, "samples_ms": samples, "median_ms": med}


def int_tuple(text: str) -> tuple[int, ...]:
    """A --config value, e.g. "128,2,2,0" -> (128, 2, 2, 0)."""
    return tuple(int(x) for x in text.split(","))


def experiment_parser(doc: str, rounds: int, config_help: str,
                      head_dim: bool = False) -> argparse.ArgumentParser:
    """The options of this script and of gluon_dq.py and gluon_dkdv.py; head_dim: also
    --head-dim, for a check_fn that takes it (run_experiment)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--shape", action="append", help="B,H,S,D,CAUSAL")
    parser.add_argument("--config", action="append", type=int_tuple, help=config_help)
    parser.add_argument("--check-only", action="store_true")
    if head_dim:
        parser.add_argument("--head-dim", type=int, choices=tuple(hf.CONFIGS), default=None,
                            help="check and time that head dim's cases and shapes only")
    return parser


def run_experiment(args, name: str, configs, check_fn, time_fn, shapes) -> None:
    """check_fn(configs) (check_fn(configs, head_dim) where the parser has --head-dim);
    then, where every check passed, time_fn(shape, configs, rounds) over --shape (or
    `shapes`, of --head-dim's head dim); everything into OUT/<name>.json."""
    head_dim = getattr(args, "head_dim", None)
    if args.shape:
        shapes = [tuple(int(x) for x in s.split(",")[:4]) + (s.split(",")[4] == "1",)
                  for s in args.shape]
    elif head_dim is not None:
        shapes = [shape for shape in shapes if shape[3] == head_dim]
    if hasattr(args, "head_dim"):
        check_fn = functools.partial(check_fn, head_dim=head_dim)
    os.makedirs(args.out, exist_ok=True)  # before the checks, which take minutes
    result = {"environment": environment(torch.device("cuda")),
              "configs": {str(d): c for d, c in configs.items()} if isinstance(configs, dict)
              else configs}
    result["checks"] = check_fn(configs)
    if all(r["ok"] for r in result["checks"]) and not args.check_only:
        result["timings"] = [time_fn(shape, configs, args.rounds) for shape in shapes]
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)


def fits(config: tuple[int, ...], head_dim: int) -> bool:
    try:
        hf.q_buffer_count(config, head_dim, torch.bfloat16.itemsize)
    except ValueError:
        return False
    return True


def main() -> None:
    fields = "BLOCK_N,STAGES,WARPGROUPS[,O_TMA,OWN_RANGES] (all D)"
    args = experiment_parser(__doc__, 5, fields).parse_args()
    configs = dict(hf.CONFIGS)
    if args.config:  # each head dim takes those of them that fit in shared memory
        configs = {d: [c for c in args.config if fits(c, d)] for d in hf.CONFIGS}
    run_experiment(args, "gluon_forward", configs, check, time_shape, SHAPES)


if __name__ == "__main__":
    main()
