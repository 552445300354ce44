"""The one-pass backward on a GPU: the same bits twice and no add late, per switch set.

    PYTHONPATH=src python benchmarks/one_pass_check.py [--switch ATTR=VALUE ...]

Runs fused_triton._backward(one_pass=True) twice on b4 h16 S=4096 D=128 (full and
causal) and b2 h8/2 S=3000 D=64 causal with key lengths, random bf16 data, under the
given fused_triton module switches, and prints whether the dq, dk, dv of the two runs
are equal bit for bit, the late-add count of each, and the error of dq against the
two-kernel backward's.
"""

import argparse

import torch

from attnkit.backends import fused_triton as ft
from attnkit.call import make_call
from attnkit.verify import rel_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", action="append", default=[], metavar="ATTR=VALUE")
    args = parser.parse_args()
    for item in args.switch:
        attr, _, value = item.partition("=")
        assert hasattr(ft, attr), attr
        setattr(ft, attr, int(value))
    made, locks = ft._one_pass_buffers, []
    ft._one_pass_buffers = lambda call: (lambda m: locks.append(m[1]) or m)(made(call))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, hq, hkv, s, d, causal, lengths in [(4, 16, 16, 4096, 128, False, False),
                                              (4, 16, 16, 4096, 128, True, False),
                                              (2, 8, 2, 3000, 64, True, True)]:
        q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        key_lengths = torch.tensor([s - 777, s][:b] * (b // 2), device="cuda") if lengths else None
        call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
        out, lse = ft._forward(call, 0)
        dout = torch.randn_like(out)
        runs = [ft._backward(call, 0, out, lse, dout, one_pass=True) for _ in range(2)]
        two = ft._backward(call, 0, out, lse, dout, one_pass=False)
        same = all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
        late = [int(lock[0]) for lock in locks[-2:]]
        errs = [rel_err(x, y) for x, y in zip(runs[0], two, strict=True)]
        print(f"b{b} h{hq}/{hkv} s{s} d{d} causal={causal} lengths={lengths}: same bits "
              f"{same}, late {late}, rel err vs two kernels dq/dk/dv "
              + " ".join(f"{e:.1e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
