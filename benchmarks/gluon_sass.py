"""The Gluon kernels compiled for sm_90 on any machine (no GPU needed), to compare their
machine code before and after a change.

    PYTHONPATH=src python benchmarks/gluon_sass.py [--kernel forward|dkdv|dq] [--head-dim 128]
        [--causal] [--lengths] [--dropout] [--config 128,2,2,1] [--head-group 1] [--sass FILE]

Needs a Triton the kernels were checked under (hopper_forward.CHECKED_RELEASES: 3.6;
`pip install triton==3.6.0` in a side environment). The kernel is specialised as a
launch on contiguous bfloat16 (B, H, S, D) tensors would be, with Sq and Skv multiples of
16; its constexprs and launch options are the ones hopper_forward.launch,
hopper_backward.launch_dq and launch_dkdv pass, taken from them on small CPU tensors.
Prints the instruction count, the local-memory instructions (LDL/STL: spills), the
shared memory per program and how many instructions write a register of a wgmma still
in flight (inflight_writes; right is none); --sass writes the SASS without its
addresses, so that two builds (git stash, or a worktree of another commit on PYTHONPATH)
diff line by line.
--dropout builds the backward kernels with dropout (p = 0.1, the seed in a tensor, as
fused_triton.run passes it).
Without --config: the forward's routed config for the head dim and causality
(fused_triton._HOPPER_ROUTES, its longest), the dK/dV kernel's launch_dkdv default
(the head dim's hopper_backward.DKDV_CONFIG, or DKDV_DROPOUT_CONFIG with dropout) and
the head dim's DQ_CONFIG.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget

from attnkit.backends import fused_triton, hopper_backward, hopper_forward

TYPES = {"qk_scale": "fp32", "scale": "fp32", "drop_p": "fp32", "seed": "*i64",
         "LSE": "*fp32", "DELTA": "*fp32",
         "LENGTHS": "*i64", "COUNTER": "*i32",
         **dict.fromkeys(("DQ", "DK", "DV", "Out"), "*bf16")}  # else i32


def source(fn, args: tuple, constexprs: dict):
    """fn's GluonASTSource for a launch with these arguments: tensors bfloat16, pointers
    and strides divisible by 16, host descriptors by their box and layout."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(args[i], hopper_forward.TensorDescriptor):
            signature[name] = f"tensordesc<bf16{list(args[i].block_shape)},{args[i].layout!r}>"
        else:
            signature[name] = TYPES.get(name, "i32")
            if (signature[name].startswith("*") or name.startswith("stride")
                    or name in ("Sq", "Skv")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def call_tensors(head_dim: int, lengths: bool) -> tuple:
    """q, k, v, out, dout, lse, delta and key_lengths (or None) of a small bfloat16 call on
    the CPU, for the launch functions to work out their arguments from."""
    q, k, v, out, dout = (torch.randn(1, 2, 256, head_dim, dtype=torch.bfloat16)
                          for _ in range(5))
    lse, delta = torch.zeros(1, 2, 256), torch.zeros(1, 2, 256)
    return q, k, v, out, dout, lse, delta, torch.tensor([200]) if lengths else None


def captured(launch, tensors: tuple, **kwargs):
    """(source, launch options) of the kernel that launch(*tensors, **kwargs) (a
    hopper_forward or hopper_backward launch function) runs: its launcher is handed the
    kernel, arguments, constexprs and options (maxnreg) and runs nothing, so that they
    come from the launch itself rather than a copy here."""
    seen = []

    def launcher(kernel, grid, args, constexprs, options):
        seen.append((source(kernel, args, constexprs), options))

    # the grid is not compiled, and the CPU has no multiprocessor count to size it by
    with mock.patch.object(hopper_forward, "multiprocessors", lambda device: 1):
        launch(*tensors, **kwargs, launcher=launcher)
    return seen[0]


def forward(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
            head_group: int):
    """(source, options) of hopper_forward.forward_kernel, as launch launches it."""
    q, k, v, out, _, lse, _, key_lengths = call_tensors(head_dim, lengths)
    if config is None:
        config = fused_triton._HOPPER_ROUTES[(hopper_forward.head_block(head_dim), causal)][0][1]
    return captured(hopper_forward.launch, (q, k, v, out, lse, key_lengths), causal=causal,
                    scale=0.1, config=config, head_group=head_group)


def dropout_args(dropout: bool) -> dict:
    """launch_dkdv's and launch_dq's dropout arguments: a tensor seed and p = 0.1, or none."""
    return {"seed": torch.tensor(5), "dropout_p": 0.1} if dropout else {}


def dkdv(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
         head_group: int, dropout: bool = False):
    """(source, options) of hopper_backward.dkdv_kernel, as launch_dkdv launches it."""
    q, k, v, _, dout, lse, delta, key_lengths = call_tensors(head_dim, lengths)
    return captured(hopper_backward.launch_dkdv, (q, k, v, dout, lse, delta, k.clone(),
                                                  v.clone(), key_lengths),
                    causal=causal, scale=0.1, config=config,
                    head_group=head_group, **dropout_args(dropout))


def dq(head_dim: int, causal: bool, lengths: bool, config: tuple[int, ...] | None,
       head_group: int, dropout: bool = False):
    """(source, options) of hopper_backward.dq_kernel, as launch_dq launches it."""
    q, k, v, out, dout, lse, delta, key_lengths = call_tensors(head_dim, lengths)
    return captured(hopper_backward.launch_dq, (q, k, v, out, dout, lse, delta, q.clone(),
                                                key_lengths),
                    causal=causal, scale=0.1, config=config,
                    head_group=head_group, **dropout_args(dropout))


def _written(instruction: str) -> set[int]:
    """The general registers an instruction writes: its first operand when that is one
    (a store's or a reduction's first operand is an address in brackets); one register,
    two for .64 and .WIDE results, four for .128."""
    op, _, operands = re.sub(r"^@!?P\w+\s+", "", instruction).partition(" ")
    first = re.match(r"\s*R(\d+)\b", operands)
    if first is None:
        return set()
    width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
    return set(range(int(first.group(1)), int(first.group(1)) + width))


def inflight_writes(instructions: list[str]) -> list[str]:
    """Instructions that write a register of an asynchronous wgmma still in flight: its
    accumulator or its A operand in registers, between the HGMMA and the
    WARPGROUP.DEPBAR that retires its group. ptxas should never emit one; a build that
    computes wrong results with no bad access would show it here. Read in program order
    (branches not followed; an LDSM's four results count as one), so a heuristic: run 43
    found none in any build of the three kernels it read, dK/dV (64, 3) included."""
    groups: list[set[int]] = []  # committed, oldest first; then the one being issued
    issuing: set[int] | None = None
    found = []
    for instruction in instructions:
        if instruction.startswith("HGMMA"):
            shape, _, rest = instruction.partition(" ")
            operands = [o.strip() for o in rest.split(",")]
            # HGMMA.64xNx16: a 64 x N float32 accumulator over 128 threads, N / 2 each
            columns = int(re.match(r"HGMMA\.64x(\d+)x", shape).group(1))
            accumulator = int(operands[0][1:])
            regs = set(range(accumulator, accumulator + columns // 2))
            if operands[1].startswith("R"):
                a_operand = int(operands[1][1:])
                regs |= set(range(a_operand, a_operand + 4))
            issuing = (issuing or set()) | regs
            if "gsb0" in instruction:
                groups.append(issuing)
                issuing = None
            continue
        waited = re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", instruction)
        if waited:
            keep = int(waited.group(1), 16)
            groups = groups[len(groups) - keep:] if keep else []
            continue
        busy = set().union(*groups, issuing or set())
        if _written(instruction) & busy:
            found.append(instruction)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=("forward", "dkdv", "dq"), default="forward")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="up to 256; the tiles are the next of 64, 128, 256 wide "
                             f"(fused_triton routes {fused_triton._gluon_dims_text()})")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--lengths", action="store_true", help="with key_lengths")
    parser.add_argument("--dropout", action="store_true",
                        help="the backward kernels with dropout (p = 0.1, a tensor seed)")
    parser.add_argument("--config", default=None,
                        help="forward: BLOCK_N,STAGES,WARPGROUPS[,O_TMA[,OWN_RANGES]]; "
                             "dkdv: BLOCK_M,STAGES[,KV_REGS]; dq: BLOCK_N,STAGES")
    parser.add_argument("--head-group", type=int, default=1)
    parser.add_argument("--sass", default=None, help="write the SASS here")
    args = parser.parse_args()
    if not hopper_forward.available():
        raise SystemExit(f"Triton {triton.__version__}: the Gluon kernels are offered under "
                         f"{hopper_forward.CHECKED_RELEASES} only")
    if hopper_forward.head_block(args.head_dim) not in hopper_forward.CONFIGS:
        parser.error(f"--head-dim {args.head_dim}: the kernels' tiles are "
                     f"{tuple(hopper_forward.CONFIGS)} wide")
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    if args.dropout and args.kernel == "forward":
        parser.error("--dropout: the Gluon forward does not drop (fused_triton's does)")
    build = {"forward": forward, "dkdv": dkdv, "dq": dq}[args.kernel]
    extra = {"dropout": True} if args.dropout else {}
    src, options = build(args.head_dim, args.causal, args.lengths, config, args.head_group,
                         **extra)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
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
          f"{compiled.metadata.shared} bytes shared, "
          f"{len(inflight_writes(instructions))} writes into an in-flight wgmma's registers")
    if args.sass:
        with open(args.sass, "w") as f:
            f.write("\n".join(instructions) + "\n")


if __name__ == "__main__":
    main()
