"""One attention step per shape for Nsight Compute to profile, and a summary of what it
found in a kernel's SASS.

    # on the GPU machine: one forward+backward per shape, warmed up, profiled alone
    ncu --clock-control none --profile-from-start off --set full --import-source no \\
        -k regex:"dkdv_kernel|dq_kernel|forward_kernel" -o prof \\
        python3 benchmarks/ncu_step.py --shape 4,16,4096,128,1 [--shape ...] [--impl triton]
    ncu --import prof.ncu-rep --page details > details.txt
    ncu --import prof.ncu-rep -k dkdv_kernel --page source --csv --print-source sass > dkdv.csv

    # anywhere: the per-instruction CSV summed up
    python3 benchmarks/ncu_step.py --summarize dkdv.csv [--top 25]

The step runs three times first (compiles, autotuning), then once between
cudaProfilerStart and cudaProfilerStop, so `--profile-from-start off` profiles one step
of each shape. `--clock-control none` leaves the GPU's clocks alone. The summary: the
shared-memory wavefronts by opcode (HGMMA's are its operand reads), the warp stall
samples by reason, and the SASS lines with the most samples. Warps that only pad a
partition to a warpgroup sit at a barrier and show up as `barrier` stalls on NOPs.
First used in run 38 (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import collections
import csv


def profile_steps(shapes: list[str], impl: str, forward_only: bool) -> None:
    import torch

    import attnkit

    gen = torch.Generator(device="cuda").manual_seed(0)
    steps = []
    for text in shapes:
        b, h, s, d, causal = (int(x) for x in text.split(","))
        q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                                     generator=gen) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(not forward_only)

        def step(q=q, k=k, v=v, dout=dout, causal=bool(causal)):
            out = attnkit.attention(q, k, v, causal=causal, impl=impl)
            if not forward_only:
                torch.autograd.grad(out, (q, k, v), dout)

        for _ in range(3):
            step()
        steps.append(step)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def summarize(path: str, top: int) -> None:
    """Print the summary of each kernel launch in a `--page source --csv --print-source
    sass` (one section per launch the profile holds, each under its "Kernel Name" row)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    starts = [i for i, row in enumerate(rows) if row and row[0] == "Kernel Name"] or [0]
    for launch, (start, end) in enumerate(zip(starts, starts[1:] + [len(rows)], strict=True)):
        name = rows[start][1] if rows[start] and rows[start][0] == "Kernel Name" else path
        _summarize_launch(f"{path} ({name}, launch {launch + 1})", rows[start:end], top)


def _summarize_launch(title: str, rows: list[list[str]], top: int) -> None:
    """summarize's print-out for one launch's rows (its header row, then one per SASS
    line)."""
    header = next(r for r in rows if "Source" in r)
    data = rows[rows.index(header) + 1:]
    col = {name: i for i, name in enumerate(header)}

    def value(row, name):
        try:
            return float(row[col[name]].replace(",", ""))
        except (KeyError, ValueError):
            return 0.0

    def opcode(row):
        words = [w for w in row[col["Source"]].split() if not w.startswith("@")]
        return words[0].split(".")[0] if words else ""

    samples = "Warp Stall Sampling (All Samples)"
    total_samples = sum(value(r, samples) for r in data) or 1.0
    wavefronts = collections.Counter()
    for row in data:
        wavefronts[opcode(row)] += value(row, "L1 Wavefronts Shared")
    total_wavefronts = sum(wavefronts.values()) or 1.0
    print(f"{title}: {len(data)} instructions, {total_wavefronts:.3g} shared-memory "
          f"wavefronts, {total_samples:.0f} stall samples")
    print("shared-memory wavefronts by opcode: " + ", ".join(
        f"{op} {n / total_wavefronts:.1%}" for op, n in wavefronts.most_common(5) if n))
    reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    by_reason = {name[6:]: sum(value(r, name) for r in data) for name in reasons}
    print("stall samples by reason: " + ", ".join(
        f"{name} {n / total_samples:.1%}"
        for name, n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:8]))
    for row in sorted(data, key=lambda r: -value(r, samples))[:top]:
        reason = max(reasons, key=lambda name: value(row, name))[6:] if reasons else ""
        print(f"  {value(row, samples) / total_samples:6.2%} {reason:14s} "
              f"{row[col['Source']].strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,S,D,CAUSAL")
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--summarize", metavar="CSV", help="summarize a source-page CSV")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.top)
    elif args.shape:
        profile_steps(args.shape, args.impl, args.forward_only)
    else:
        parser.error("give --shape (to profile) or --summarize CSV")


if __name__ == "__main__":
    main()
