"""The Gluon kernels compiled for sm_90 on any machine (no GPU needed), to compare their
machine code before and after a change.

    PYTHONPATH=src python benchmarks/gluon_sass.py [--kernel forward|dkdv|dq] [--head-dim 128]
        [--causal] [--lengths] [--config 128,2,2,1] [--head-group 1] [--sass FILE]

Needs a Triton the kernels were checked under (hopper_forward.CHECKED_RELEASES: 3.6;
`pip install triton==3.6.0` in a side environment). The kernel is specialised as a
launch on contiguous bfloat16 (B, H, S, D) tensors would be, with Sq and Skv multiples of
16. Prints the instruction count, the local-memory instructions (LDL/STL: spills) and the
shared memory per program; --sass writes the SASS without its addresses, so that two
builds (git stash, or a worktree of another commit on PYTHONPATH) diff line by line.
Without --config: the forward's routed config for the head dim and causality
(fused_triton._HOPPER_ROUTES, its longest), hopper_backward.DKDV_CONFIG and DQ_CONFIG
for the backward kernels.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from attnkit.backends import fused_triton, hopper_backward, hopper_forward

TYPES = {"qk_scale": "fp32", "scale": "fp32", "LSE": "*fp32", "DELTA": "*fp32",
         "LENGTHS": "*i64", "COUNTER": "*i32",
         **dict.fromkeys(("Q", "K", "V", "DO", "DQ", "DK", "DV", "Out"), "*bf16")}  # else i32


def descriptor_type(rows: int, head_dim: int) -> str:
    """The signature type of a hopper_forward._descriptor of a bfloat16 tensor."""
    layout = hopper_forward._box_layout(rows, head_dim, torch.bfloat16)
    return f"tensordesc<bf16[1, 1, {rows}, {head_dim}],{layout!r}>"


def source(fn, constexprs: dict, descriptors: dict[str, str]):
    """fn's GluonASTSource: tensors bfloat16, pointers and strides divisible by 16."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = descriptors[name]
        else:
            signature[name] = TYPES.get(name, "i32")
            if (signature[name].startswith("*") or name.startswith("stride")
                    or name in ("Sq", "Skv")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def forward(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
            head_group: int):
    """(source, maxnreg) of hopper_forward.forward_kernel."""
    if config is None:
        routes = fused_triton._HOPPER_ROUTES[(head_dim, causal)]
        config = routes[0][1]
    block_n, stages, warpgroups, o_tma, own_ranges = hopper_forward.Config(*config)
    constexprs = dict(HEAD_D=head_dim, CAUSAL=causal, HAS_LENGTHS=lengths, BLOCK_N=block_n,
                      STAGES=stages, WARPGROUPS=warpgroups,
                      Q_BUFFERS=hopper_forward.q_buffer_count(config, head_dim, 2),
                      O_TMA=bool(o_tma), OWN_RANGES=bool(own_ranges), HEAD_GROUP=head_group)
    descriptors = {"q_desc": descriptor_type(64, head_dim), "o_desc": descriptor_type(64, head_dim),
                   "k_desc": descriptor_type(block_n, head_dim),
                   "v_desc": descriptor_type(block_n, head_dim)}
    return (source(hopper_forward.forward_kernel, constexprs, descriptors),
            hopper_forward._MAXNREG[warpgroups])


def dkdv(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
         head_group: int):
    """(source, maxnreg) of hopper_backward.dkdv_kernel, as launch_dkdv launches it."""
    block_m, stages = config or hopper_backward.DKDV_CONFIG
    constexprs = dict(HEAD_D=head_dim, CAUSAL=causal, HAS_LENGTHS=lengths, BLOCK_M=block_m,
                      STAGES=stages, HEAD_GROUP=head_group)
    return source(hopper_backward.dkdv_kernel, constexprs, {}), 168


def dq(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
       head_group: int):
    """(source, maxnreg) of hopper_backward.dq_kernel, as launch_dq launches it."""
    block_n, stages = config or hopper_backward.DQ_CONFIG
    constexprs = dict(HEAD_D=head_dim, CAUSAL=causal, HAS_LENGTHS=lengths, BLOCK_N=block_n,
                      STAGES=stages, HEAD_GROUP=head_group)
    return source(hopper_backward.dq_kernel, constexprs, {}), 168


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=("forward", "dkdv", "dq"), default="forward")
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--lengths", action="store_true", help="with key_lengths")
    parser.add_argument("--config", default=None,
                        help="forward: BLOCK_N,STAGES,WARPGROUPS[,O_TMA[,OWN_RANGES]]; "
                             "dkdv: BLOCK_M,STAGES; dq: BLOCK_N,STAGES")
    parser.add_argument("--head-group", type=int, default=1)
    parser.add_argument("--sass", default=None, help="write the SASS here")
    args = parser.parse_args()
    if not hopper_forward.available():
        raise SystemExit(f"Triton {triton.__version__}: the Gluon kernels are offered under "
                         f"{hopper_forward.CHECKED_RELEASES} only")
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    build = {"forward": forward, "dkdv": dkdv, "dq": dq}[args.kernel]
    src, maxnreg = build(args.head_dim, args.causal, args.lengths, config, args.head_group)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "maxnreg": maxnreg})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    # "/*0a30*/  FFMA R1, R2, R3, R4 ;" -> "FFMA R1, R2, R3, R4"
    instructions = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s*([^;]*?)\s*;", text, re.M)
    spills = sum(1 for i in instructions if re.match(r"(LDL|STL)\b", i))
    print(f"{args.kernel} D={args.head_dim}{' causal' if args.causal else ''}"
          f"{' lengths' if args.lengths else ''} config {config or 'default'} head group "
          f"{args.head_group}: {len(instructions)} instructions, {spills} local-memory, "
          f"{compiled.metadata.shared} bytes shared")
    if args.sass:
        with open(args.sass, "w") as f:
            f.write("\n".join(instructions) + "\n")


if __name__ == "__main__":
    main()
