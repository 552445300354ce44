"""Decoding steps: a few query rows against a long KV cache, `triton` beside SDPA and flex.

    PYTHONPATH=src python benchmarks/decode.py [--out DIR] [--splits 1,2,4,8]

Decoding reads every cached key and value once per step and does little arithmetic on
them, so its yardstick is bandwidth (DESIGN.md): bytes of K and V read per second against
a measured device-to-device copy. `triton` runs the forward over several key ranges at
once when the query rows alone leave the GPU's multiprocessors idle (`_kv_splits`); the
`triton, one range` column forces the single-range forward, so the two columns show what
the split buys, and `triton kernels` the default choices, all three launched without
attention()'s host work. With grouped heads, one program's tile holds the query rows of a kv
group's heads (`_packs_group`), so K and V are loaded once per group; `triton, heads
apart` forces a program per query head, which loads them once per query head. `auto`
is attention()'s own choice (the row's "auto_picks" names it). Each
output is checked against `sdpa` on the same inputs first. Each is timed twice: by
do_bench, which includes host time (a decoding step of a few microseconds of GPU work is
host-bound), and replayed from a CUDA graph, which is GPU time alone. The graph replays one
step over the same cache, which at 4096 keys fits in L2; a model's step reads each layer's
cache once, from memory. So each is also timed L2-cold: one graph steps through enough
copies of the cache in turn (`cold_copies`, four L2s' worth) that each step's K and V come
from memory, its time divided by the copies ("cold_graph_ms").
Writes DIR/decode.json ({"meta": versions and device, "results": one row per step}),
which benchmarks/make_tables.py turns into a table.

--splits times instead the triton forward alone on shorter caches (SPLIT_SHAPES) under
each of the given key-range counts (as `_key_ranges` rounds them), GPU time from CUDA
graphs, beside the count `_kv_splits` picks: what the choice of ranges should be where
the merge's launch and the ranges' fixed costs weigh against the parallelism they buy.
Writes DIR/decode_splits.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

import torch
from triton.testing import do_bench, do_bench_cudagraph

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.bench import environment
from attnkit.call import AttentionCall, make_call
from attnkit.functional import select
from attnkit.verify import rel_err

# (batch, query heads, kv heads, query rows, cached keys, head dim)
# Rows 7-9 are blocks of new queries (a speculative step, a chunk of a prefill), which
# `auto` sends to `triton` first (fused_triton._leads_a_block); the last two have 256-wide
# heads (Gemma 2's 16/8 heads; fused_triton._WIDE_DECODE_ROWS).
SHAPES = [(1, 32, 8, 1, 4096, 128), (1, 32, 8, 1, 16384, 128), (1, 32, 8, 1, 65536, 128),
          (8, 32, 8, 1, 16384, 128), (1, 32, 32, 1, 16384, 128), (4, 32, 8, 4, 16384, 128),
          (1, 32, 8, 16, 16384, 128), (1, 32, 8, 256, 16384, 128), (1, 32, 8, 4, 4096, 64),
          (8, 16, 8, 1, 8192, 256), (1, 16, 8, 1, 32768, 256)]


SPLIT_SHAPES = [(1, 32, 8, 1, 1024, 128), (1, 32, 8, 1, 2048, 128), (1, 32, 8, 1, 4096, 128),
                (1, 32, 8, 1, 8192, 128), (1, 32, 8, 1, 16384, 128),
                (1, 32, 32, 1, 4096, 128), (1, 32, 32, 1, 8192, 128),
                (4, 32, 8, 1, 4096, 128), (8, 32, 8, 1, 4096, 128), (4, 32, 8, 4, 4096, 128),
                # where 2 x SMs / programs is not whole (132 SMs: 64, 32 and 128 programs)
                (8, 32, 8, 1, 16384, 128), (1, 32, 32, 1, 16384, 128),
                (1, 32, 8, 256, 16384, 128)]


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, hkv, sq, skv, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((b, hq, sq, d), device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn((b, hkv, skv, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    return q, k, v


def sweep_splits(shape: tuple[int, ...], counts: list[int]) -> dict:
    """GPU time of the triton forward under each key-range count, against the default."""
    q, k, v = inputs(shape)
    call = make_call(q, k, v, causal=True)
    packed = ft._packs_group(call)
    default = ft._default_key_ranges(call)
    want = ft._forward(call, 0)[0]
    graph_us: dict[int, float] = {}
    for count in sorted({ft._key_ranges(call.seq_kv, n, None)[0] for n in counts} | {default}):
        with torch.no_grad():
            got = ft._forward(call, 0, splits=count)[0]
            assert rel_err(got, want) < 1e-2, (shape, count)
            graph_us[count] = 1e3 * float(do_bench_cudagraph(
                lambda c=count: ft._forward(call, 0, splits=c), return_mode="median"))
    best = min(graph_us, key=graph_us.get)
    print(f"{shape}: default {default} ranges {graph_us[default]:.1f} us; best {best} "
          f"{graph_us[best]:.1f} us; " + ", ".join(f"{n}: {t:.1f}" for n, t in
                                                   graph_us.items()), flush=True)
    return {"shape": list(shape), "packed": packed, "default": default,
            "graph_us": {str(n): t for n, t in graph_us.items()}}


def steps(call: AttentionCall) -> dict[str, Callable]:
    """The call's decoding step over its cache (causal), by each implementation or forced
    path."""
    q, k, v = call.q, call.k, call.v
    return {
        "triton": lambda: attention(q, k, v, causal=True, impl="triton"),
        "triton kernels": lambda: ft._forward(call, 0)[0],
        "triton, one range": lambda: ft._forward(call, 0, splits=1)[0],
        "triton, heads apart": lambda: ft._forward(call, 0, packed=False)[0],
        "sdpa": lambda: attention(q, k, v, causal=True, impl="sdpa"),
        "flex": lambda: attention(q, k, v, causal=True, impl="flex"),
        "auto": lambda: attention(q, k, v, causal=True),
    }


def cold_copies(kv_bytes: int) -> int:
    """Caches to step through in turn so that a step finds none of its K and V in L2: the
    others read since its last turn fill four L2s."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, math.ceil(4 * l2_bytes / kv_bytes))


def measure(shape: tuple[int, ...], bandwidth: float) -> dict:
    b, hq, hkv, sq, skv, d = shape
    q, k, v = inputs(shape)
    call = make_call(q, k, v, causal=True)
    runs = steps(call)
    kv_bytes = 2 * k.numel() * k.element_size()
    copies = cold_copies(kv_bytes)
    layers = [runs] + [steps(make_call(q, k.clone(), v.clone(), causal=True))
                       for _ in range(copies - 1)]
    want = runs["sdpa"]()
    packed = ft._packs_group(call)
    row = {"shape": list(shape), "kv_bytes": kv_bytes, "packed": packed,
           "splits": ft._kv_splits(call, packed), "auto_picks": select(call).name,
           "cold_copies": copies, "ms": {}, "graph_ms": {}, "cold_graph_ms": {},
           "rel_err_vs_sdpa": {}}
    for name, fn in runs.items():
        try:
            with torch.no_grad():
                row["rel_err_vs_sdpa"][name] = rel_err(fn(), want)
                row["ms"][name] = float(do_bench(fn, return_mode="median"))
        except Exception as exc:  # flex's compile, say: the row goes on
            print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            row["ms"][name] = None
            continue
        try:  # GPU time alone: a step this short can take less than its host time
            with torch.no_grad():
                row["graph_ms"][name] = float(do_bench_cudagraph(fn, return_mode="median"))
                row["cold_graph_ms"][name] = float(do_bench_cudagraph(
                    lambda n=name: [layer[n]() for layer in layers],
                    return_mode="median")) / copies
        except Exception as exc:
            print(f"  {name} in a CUDA graph: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:100]}")

    def rate(ms: float | None) -> str:
        return "-" if ms is None else f"{ms * 1e3:.0f} us {kv_bytes / (ms * 1e-3) / bandwidth:.0%}"

    cells = [f"{name} {rate(ms)} | graph {rate(row['graph_ms'].get(name))} "
             f"| L2-cold {rate(row['cold_graph_ms'].get(name))} "
             f"(err {row['rel_err_vs_sdpa'][name]:.1e})"
             for name, ms in row["ms"].items() if ms is not None]
    print(f"b{b} h{hq}/{hkv} q{sq} kv{skv} d{d}, {row['splits']} ranges"
          f"{', packed' if packed else ''}, auto picks {row['auto_picks']}:\n  "
          + "\n  ".join(cells), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="write DIR/decode.json (with --splits: DIR/decode_splits.json)")
    parser.add_argument("--splits", default=None, metavar="N,N,...",
                        help="time the forward under these key-range counts instead")
    args = parser.parse_args()
    meta = {**environment(torch.device("cuda")),
            "command": " ".join(["python", "benchmarks/decode.py", *sys.argv[1:]])}
    if args.splits:
        counts = [int(n) for n in args.splits.split(",")]
        rows = [sweep_splits(shape, counts) for shape in SPLIT_SHAPES]
        meta["kind"], name = "decode-splits", "decode_splits.json"
    else:
        bandwidth = copy_bandwidth()
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s ({torch.cuda.get_device_name()}); "
              f"after each time: K and V bytes read per second as a share of it; first by "
              f"do_bench (host time included), then replayed in a CUDA graph (GPU time only)")
        rows = [measure(shape, bandwidth) for shape in SHAPES]
        meta.update(kind="decode", copy_bytes_per_s=bandwidth)
        name = "decode.json"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
