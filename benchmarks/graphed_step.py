"""A module's training step, eager and under torch.compile(mode="reduce-overhead"), per impl.

    PYTHONPATH=src python benchmarks/graphed_step.py [notebook] [bert]    (CUDA only)

The module presets' bars (issue 3: `MultiHeadAttention(impl="triton")` at least 1.15x the
fastest other module) are a race of host time in eager mode (NOTES, runs 11-49). This
times the same step with CUDA graphs taking the host out: `MultiHeadAttention` at the
sizes of `attnkit bench`'s notebook and bert presets (bert's with its additive padding
mask), bfloat16, one set of weights; each step marks a new CUDA graph
step, sets the gradients to None (as `zero_grad` does, so that no step reads a gradient
an earlier replay wrote), runs the forward and the backward. Each (impl, mode) is warmed
up 4 steps, then timed with CUDA events over 30 steps, 5 rounds taken in turns; prints
the medians and writes $OUT (or .)/graphed_step_h200_run51.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

import attnkit
from attnkit.bench import preset_configs
from attnkit.verify import padding_mask

# The implementations timed on each preset (its sizes are attnkit bench's): triton, plain
# SDPA, and the pinned SDPA kernel that takes the preset's mask
IMPLS = {"notebook": ["triton", "sdpa", "sdpa_flash"], "bert": ["triton", "sdpa", "sdpa_efficient"]}
STEPS, ROUNDS = 30, 5


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    results = []
    for preset in sys.argv[1:] or IMPLS:
        c = preset_configs(preset)[0]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(c.batch, c.seq, c.d_model, generator=gen).to(dev, dt).requires_grad_()
        g = torch.randn(c.batch, c.seq, c.d_model, generator=gen).to(dev, dt)
        mask = padding_mask(c.batch, c.seq, dt, dev, gen) if c.mask == "padding" else None
        sizes = dict(causal=c.causal, qkv_bias=c.qkv_bias, device=dev, dtype=dt)
        base = attnkit.MultiHeadAttention(c.d_model, c.d_model, c.heads, **sizes)
        steps = {}
        for impl in IMPLS[preset]:
            for mode in ("eager", "reduce-overhead"):
                m = attnkit.MultiHeadAttention(c.d_model, c.d_model, c.heads, impl=impl, **sizes)
                m.load_state_dict(base.state_dict())
                fn = m if mode == "eager" else torch.compile(m, mode=mode)
                params = [x, *m.parameters()]

                def step(fn=fn, params=params, mode=mode, x=x, g=g, mask=mask):
                    if mode != "eager":
                        torch.compiler.cudagraph_mark_step_begin()
                    for t in params:
                        t.grad = None
                    y = fn(x) if mask is None else fn(x, attn_mask=mask)
                    y.backward(g)

                started = time.perf_counter()
                try:
                    for _ in range(4):
                        step()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - reported, the rest still timed
                    print(preset, impl, mode, "ERROR", type(exc).__name__, str(exc)[:300])
                    continue
                print(preset, impl, mode, f"warm-up {time.perf_counter() - started:.1f} s")
                steps[(impl, mode)] = step
        times = {key: [] for key in steps}
        for _ in range(ROUNDS):
            for key, step in steps.items():
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(STEPS):
                    step()
                end.record()
                torch.cuda.synchronize()
                times[key].append(start.elapsed_time(end) * 1000 / STEPS)
        for (impl, mode), ts in times.items():
            row = dict(preset=preset, impl=impl, mode=mode, us_per_step=statistics.median(ts),
                       rounds=[round(t, 1) for t in ts])
            results.append(row)
            print(f"{preset:9s} {impl:15s} {mode:16s} {row['us_per_step']:8.1f} us  "
                  f"{row['rounds']}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "graphed_step_h200_run51.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
                       steps=STEPS, rounds=ROUNDS, results=results), f, indent=1)


if __name__ == "__main__":
    main()
