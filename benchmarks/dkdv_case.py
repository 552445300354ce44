"""One of gluon_dkdv.py's check cases, split in two processes so that ConSan sees only the
Gluon dK/dV kernel, on a GPU.

    PYTHONPATH=src:benchmarks python benchmarks/dkdv_case.py save PATH [INDEX]
    PYTHONPATH=src:benchmarks python benchmarks/consan.py benchmarks/dkdv_case.py \
        run PATH BLOCK_M,STAGES[,KV_REGS] ...

`save` builds gluon_dkdv.CASES[INDEX] (default: the last, 300 x 300 causal at D=64, the
smallest case (64, 3) fails on) as the check does: the Triton forward's lse, the Triton
dQ kernel's delta, a random dO, and the Triton dK/dV kernel's dk, dv as the answer.
`run` launches the Gluon dK/dV kernel once per config on those inputs and prints its
relative errors against that answer.

Why two processes: ConSan instruments every kernel built under it, Triton-language ones
too, and on fused_triton's forward (a TMA config, Triton 3.6, H200) it asserted
"Deadlock detected: all active threads are waiting on mbarriers", on a kernel that runs
and checks right without it (NOTES run 43). So the inputs come from a plain process.
"""

from __future__ import annotations

import sys

import torch
from gluon_dkdv import CASES, _inputs, gluon_dkdv, triton_dkdv

from attnkit.call import make_call
from attnkit.verify import rel_err


def save(path: str, index: int) -> None:
    case = CASES[index]
    gen = torch.Generator(device="cuda").manual_seed(1)
    call, lse, dout, delta = _inputs(*case, gen)
    dk, dv = triton_dkdv(call, lse, dout, delta)
    torch.save({"case": case, "q": call.q, "k": call.k, "v": call.v, "causal": call.causal,
                "key_lengths": call.key_lengths, "lse": lse, "dout": dout, "delta": delta,
                "dk": dk, "dv": dv}, path)
    print("saved", case, "to", path)


def run(path: str, configs: list[tuple[int, ...]]) -> None:
    saved = torch.load(path)
    call = make_call(saved["q"], saved["k"], saved["v"], causal=saved["causal"],
                     key_lengths=saved["key_lengths"])
    for config in configs:
        dk, dv = gluon_dkdv(call, saved["lse"], saved["dout"], saved["delta"], config)
        torch.cuda.synchronize()
        print(saved["case"], config, f"dk {rel_err(dk, saved['dk']):.2e}",
              f"dv {rel_err(dv, saved['dv']):.2e}", flush=True)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "run"):
        raise SystemExit(__doc__.split("\n\n")[1])
    mode, path, *rest = sys.argv[1:]
    if mode == "save":
        save(path, int(rest[0]) if rest else -1)
    else:
        if not rest:
            raise SystemExit("run needs at least one BLOCK_M,STAGES[,KV_REGS] config")
        run(path, [tuple(int(x) for x in text.split(",")) for text in rest])


if __name__ == "__main__":
    main()
