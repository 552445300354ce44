"""A module's training step per impl: eager, under torch.compile(mode="reduce-overhead"),
and as CUDA graphs made by torch.cuda.make_graphed_callables (no dynamo).

    PYTHONPATH=src python benchmarks/graphed_step.py [--preset notebook bert]
        [--modes eager reduce-overhead graphed] [--profile] [--json PATH]    (CUDA only)

The module presets' bars (issue 3: `MultiHeadAttention(impl="triton")` at least 1.15x the
fastest other module) are a race of host time in eager mode (NOTES, runs 11-49). This
times the same step with CUDA graphs taking the host out: `MultiHeadAttention` at the
sizes of `attnkit bench`'s notebook and bert presets (bert's with its additive padding
mask), bfloat16, one set of weights. A step sets the gradients to None (as `zero_grad`
does, so that no step reads a gradient an earlier replay wrote), runs the forward and the
backward; under reduce-overhead it first marks a new CUDA graph step. `graphed` captures
the module's forward and backward once (`make_graphed_callables`, the mask a constant of
the capture), so its step is two graph replays and autograd's bookkeeping around them.

Each (impl, mode) is warmed up 4 steps, then timed with CUDA events over 30 steps, 5
rounds taken in turns; prints the medians and writes them to --json (default
$OUT/graphed_step.json, or ./graphed_step.json). With --profile, 10 more steps of each
run under torch.profiler: the host's wall time a step, the GPU's kernel time a step, and
the operators that take the most host time are printed and saved beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import attnkit
from attnkit.bench import preset_configs
from attnkit.verify import padding_mask

# The implementations timed on each preset (its sizes are attnkit bench's): triton, plain
# SDPA, and the pinned SDPA kernel that takes the preset's mask
IMPLS = {"notebook": ["triton", "sdpa", "sdpa_flash"], "bert": ["triton", "sdpa", "sdpa_efficient"]}
MODES = ("eager", "reduce-overhead", "graphed")
STEPS, ROUNDS, PROFILED_STEPS = 30, 5, 10


class _WithMask(nn.Module):
    """The module called with one fixed attn_mask: make_graphed_callables takes the
    tensors a capture varies over as positional arguments, and the mask does not vary."""

    def __init__(self, module: nn.Module, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.module, self.mask = module, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) if self.mask is None else self.module(x, attn_mask=self.mask)


def _step_function(module: nn.Module, mode: str, x: torch.Tensor, g: torch.Tensor):
    if mode == "reduce-overhead":
        fn = torch.compile(module, mode=mode)
    elif mode == "graphed":
        fn = torch.cuda.make_graphed_callables(module, (x,))
    else:
        fn = module
    params = [x, *module.parameters()]

    def step() -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        for t in params:
            t.grad = None
        fn(x).backward(g)

    return step


def _profile(step, label: str) -> tuple[dict, str]:
    """Host wall time and GPU kernel time a step over PROFILED_STEPS steps, and the
    profiler's table of the operators by their own host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            step()
        host_s = time.perf_counter() - started
        torch.cuda.synchronize()
    events = prof.key_averages()
    # The device's own events (kernels, copies, memsets): an operator's self device time
    # counts its kernels a second time (run 52's JSON had that double sum), so CPU-side
    # events are left out, as the profiler's table total does.
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU)
    summary = dict(host_us_per_step=host_s * 1e6 / PROFILED_STEPS,
                   device_us_per_step=device_us / PROFILED_STEPS)
    table = events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    return summary, f"## {label}\n{summary}\n{table}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=tuple(IMPLS), default=list(IMPLS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--profile", action="store_true", help="profile 10 steps of each")
    parser.add_argument("--json", type=Path,
                        default=Path(os.environ.get("OUT", ".")) / "graphed_step.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    dev, dt = torch.device("cuda"), torch.bfloat16
    results, profiles = [], []
    for preset in args.preset:
        c = preset_configs(preset)[0]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(c.batch, c.seq, c.d_model, generator=gen).to(dev, dt).requires_grad_()
        g = torch.randn(c.batch, c.seq, c.d_model, generator=gen).to(dev, dt)
        mask = padding_mask(c.batch, c.seq, dt, dev, gen) if c.mask == "padding" else None
        sizes = dict(causal=c.causal, qkv_bias=c.qkv_bias, device=dev, dtype=dt)
        base = attnkit.MultiHeadAttention(c.d_model, c.d_model, c.heads, **sizes)
        steps = {}
        for impl in IMPLS[preset]:
            for mode in args.modes:
                m = attnkit.MultiHeadAttention(c.d_model, c.d_model, c.heads, impl=impl, **sizes)
                m.load_state_dict(base.state_dict())
                started = time.perf_counter()
                try:
                    step = _step_function(_WithMask(m, mask), mode, x, g)
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
            if args.profile:
                summary, text = _profile(steps[(impl, mode)], f"{preset} {impl} {mode}")
                row.update(summary)
                profiles.append(text)
            results.append(row)
            extra = "".join(f"  {k} {row[k]:.1f}" for k in ("host_us_per_step",
                                                             "device_us_per_step") if k in row)
            print(f"{preset:9s} {impl:15s} {mode:16s} {row['us_per_step']:8.1f} us  "
                  f"{row['rounds']}{extra}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(torch=torch.__version__,
                                         device=torch.cuda.get_device_name(), steps=STEPS,
                                         rounds=ROUNDS, results=results), indent=1))
    if profiles:
        args.json.with_suffix(".profile.txt").write_text("\n".join(profiles))


if __name__ == "__main__":
    main()
