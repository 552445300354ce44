"""Seconds that `triton`'s first forward+backward on a new shape takes in a new process
with an empty Triton cache: compiling, autotuning and all, the cold start that `attnkit
verify` pays on every case.

    python benchmarks/cold_start.py [--out DIR] [--rounds N] [--variant NAME=SRC ...]

Each variant (default: this checkout's src) runs in its own child process, PYTHONPATH=SRC
and TRITON_CACHE_DIR a fresh empty folder, in turns over --rounds so that a host slowing
down reaches every variant alike. The child first builds a trivial Triton kernel and runs
a trivial backward, so that loading the compiler's backend and torch's imports on a first
backward are not charged to the first case (run 46 on), then runs each case (small shapes
of the kinds `attnkit verify` checks; a control, 100 x 100, where fused_triton._one_tile
takes out one forward tile at most; and one of verify's 1000-long cases, where every
candidate tile is built and timed) forward and backward three times, synchronizing after
each: the seconds of each call. Run 44 made two calls and timed the second at 10-28 ms,
long for a tiny warm call; the third tells whether the second still paid one-time work.
The child runs with TRITON_PRINT_AUTOTUNING=1, and each autotuning round it reports
(kernel, seconds: building and timing its candidates) is kept beside the run's times.
Writes DIR/cold_start.json and prints the median over rounds of the first call and the
last. Needs a CUDA GPU.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# what Triton's autotuner prints after a round when TRITON_PRINT_AUTOTUNING=1
_ROUND = re.compile(r"Triton autotuning for function (\w+),.*?finished after ([0-9.]+)s", re.S)

# name: (batch, heads, seq_q, seq_kv, head_dim, causal, feature)
CASES = {
    "17x17 d64 causal": (2, 4, 17, 17, 64, True, None),
    "17x17 d80 additive": (2, 4, 17, 17, 80, False, "additive"),
    "1x17 d64 causal": (2, 4, 1, 17, 64, True, None),
    "40x40 d128 lengths": (2, 4, 40, 40, 128, False, "lengths"),
    "17x17 d256": (2, 4, 17, 17, 256, False, None),
    "100x100 d64 (control)": (2, 4, 100, 100, 64, False, None),
    "1000x1000 d128 causal": (1, 4, 1000, 1000, 128, True, None),
}


def warm_up(device) -> None:
    """A process's one-time work that is not attnkit's, done before any case so that the
    first is not charged with it: loading Triton's compiler backend (a trivial kernel),
    and torch's work on a first backward given a gradient (importing sympy: 3.5 s on the
    H200 machine, whose Python compiles it from source each time: NOTES, run 46).
    first_calls.py does the same."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(x):
        tl.store(x, tl.load(x) + 1)

    _touch[(1,)](torch.zeros(1, device=device))
    ones = torch.ones(2, device=device, requires_grad=True)
    (ones * 2).backward(torch.ones_like(ones))
    torch.cuda.synchronize()


def _child() -> None:
    import torch

    import attnkit
    from attnkit.bench import environment

    device = torch.device("cuda")
    warm_up(device)
    gen = torch.Generator(device=device).manual_seed(0)
    result = {}
    for name, (b, h, sq, skv, d, causal, feature) in CASES.items():
        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

        q, k, v = (rand(b, h, s, d).requires_grad_() for s in (sq, skv, skv))
        extra = {}
        if feature == "additive":
            extra["attn_mask"] = rand(b, 1, 1, skv)
        elif feature == "lengths":
            extra["key_lengths"] = torch.randint(1, skv + 1, (b,), device=device, generator=gen)
        grad = rand(b, h, sq, d)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = attnkit.attention(q, k, v, causal=causal, impl="triton", **extra)
            out.backward(grad)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[name] = times
    print(json.dumps({**environment(device), "cases": result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=SRC: a source tree holding attnkit (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child()
        return
    variants = dict(v.split("=", 1) for v in args.variant) or {"here": str(HERE.parent / "src")}
    runs = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, src in variants.items():
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()),
                       "TRITON_CACHE_DIR": cache, "TRITON_PRINT_AUTOTUNING": "1"}
                start = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--child"], env=env,
                                      capture_output=True, text=True, check=False)
                wall = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name}, round {round_ + 1}, failed:\n{done.stderr[-4000:]}")
            child = json.loads(done.stdout.splitlines()[-1])
            rounds = [[kernel, float(s)] for kernel, s in _ROUND.findall(done.stdout)]
            runs[name].append({"process_s": wall, "cases": child.pop("cases"),
                               "autotuning": rounds})
            firsts = ", ".join(f"{case} {times[0]:.1f}"
                               for case, times in runs[name][-1]["cases"].items())
            tuning = sum(s for _, s in rounds)
            print(f"round {round_ + 1} {name}: {wall:.1f} s, {len(rounds)} autotuning rounds "
                  f"{tuning:.1f} s ({firsts})", flush=True)
            if args.out:  # after every run, so that a run cut short keeps what it finished
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "cold_start.json").write_text(json.dumps({
                    **child, "cases": CASES, "rounds": args.rounds, "variants": variants,
                    "runs": runs}, indent=1))
    print(f"\nmedian over {args.rounds} rounds, seconds: first call / last call")
    print("case".ljust(26) + "".join(name.rjust(22) for name in variants))
    for case in CASES:
        cells = []
        for name in variants:
            first = statistics.median(r["cases"][case][0] for r in runs[name])
            last = statistics.median(r["cases"][case][-1] for r in runs[name])
            cells.append(f"{first:8.2f} / {last:.4f}".rjust(22))
        print(case.ljust(26) + "".join(cells))
    print("process".ljust(26) + "".join(
        f"{statistics.median(r['process_s'] for r in runs[name]):8.1f}".rjust(22)
        for name in variants))


if __name__ == "__main__":
    main()
