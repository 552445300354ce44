"""Registers and spills of each Triton kernel per tile config, compiled for sm_90 (or
--arch) on any machine (no GPU needed: Triton's frontend and the ptxas it bundles run on
the CPU).

    TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=src python benchmarks/triton_registers.py \
        [--head-dim 128] [--causal] [--grouped] [--dropout] [--lengths] \
        [--mask bool|additive|additive-rows] [--kernel dkdv] \
        [--config M,N,WARPS,STAGES ...] [--counts] [--arch 86] \
        [--out DIR]

Compiles the forward, dK/dV and dQ kernels under every config of their autotune lists
(with --tma, the forward's TMA list; or only the --config ones), specialised as a launch
on contiguous (B, H, S, D) tensors would be: head-dim strides equal to 1, pointers and the
other strides divisible by 16.
Prints registers per thread, stack bytes per thread (spills: local-memory traffic inside
the loops) and shared memory per program, from `cuobjdump -res-usage`. The numbers are
the installed Triton's, which need not be the GPU machine's version. A tile that ptxas
rejects or crashes on is reported as such and the rest go on: under the device's Triton
(3.6) this is how to see, with no GPU, which tiles a kernel change leaves unbuildable.
--counts also prints what a kernel change moved in a build without spilling: layout
conversions (TTGIR), barriers, Philox's multiplies (PTX mul.hi) and PTX lines.
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.errors import PTXASError

import attnkit.backends.fused_triton as ft

KERNELS = {"fwd": (ft._fwd_kernel, ft._FWD_CONFIGS),
           "dkdv": (ft._bwd_dkdv_kernel, ft._DKDV_CONFIGS),
           "dq": (ft._bwd_dq_kernel, ft._DQ_CONFIGS)}
# --mask: (kernel_flags' mask_kind, mask_rows)
MASKS = {"bool": (1, False), "additive": (2, False), "additive-rows": (2, True)}


def source(fn, flags: dict) -> triton.compiler.ASTSource:
    """fn specialised like a launch on contiguous tensors with 16-aligned sizes."""
    signature, constexprs = ft.arg_types(fn, mask_kind=flags["MASK_KIND"]), dict(flags)
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name.startswith("stride_") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1
        elif signature[name].startswith("*") or name.startswith("stride_") or name in (
                "Sq", "Skv"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    used = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=used, attrs=attrs)


def resources(cubin: bytes) -> dict[str, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK):(\d+)", text)}


def instruction_counts(asm: dict) -> dict[str, int]:
    """--counts: a build's layout conversions (each one a trip through shared memory or
    shuffles), barriers, high multiplies (Philox's rounds) and PTX lines."""
    ptx = asm["ptx"]
    return {"convert_layout": asm["ttgir"].count("ttg.convert_layout"),
            "bar": len(re.findall(r"\b(?:bar|barrier)\.sync", ptx)),
            "mul_hi": len(re.findall(r"\bmul\.hi\.", ptx)), "ptx_lines": ptx.count("\n")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--grouped", action="store_true",
                        help="the dK/dV kernel for grouped heads (its loop over a group)")
    parser.add_argument("--tma", action="store_true",
                        help="the forward loading K and V through TMA descriptors")
    parser.add_argument("--dropout", action="store_true", help="the kernels with dropout")
    parser.add_argument("--lengths", action="store_true", help="the kernels with key_lengths")
    parser.add_argument("--mask", choices=list(MASKS), default=None,
                        help="the kernels with an attn_mask: bool or additive, a (B, 1, 1, "
                             "Skv) padding mask, or additive-rows, one of (B, H, Sq, Skv)")
    parser.add_argument("--config", action="append", default=[], metavar="M,N,WARPS,STAGES")
    parser.add_argument("--kernel", action="append", choices=list(KERNELS), default=[],
                        help="only these kernels (repeatable; default: all three)")
    parser.add_argument("--counts", action="store_true",
                        help="also count layout conversions, barriers, mul.hi, PTX lines")
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability to build for, e.g. 86: whether a tile's "
                             "shared memory fits a GPU with 99 KB a block (run 43)")
    parser.add_argument("--out", default=None, help="also write DIR/triton_registers.json")
    args = parser.parse_args()
    d = args.head_dim
    mask_kind, mask_rows = MASKS[args.mask] if args.mask else (0, False)
    flags = ft.kernel_flags(d, d, has_left=False, has_right=args.causal,
                            has_lengths=args.lengths, mask_kind=mask_kind, mask_rows=mask_rows,
                            dropout=args.dropout)
    flags.update(GROUPED=args.grouped, TMA_OK=args.tma, TMA=args.tma)
    chosen = [tuple(int(x) for x in c.split(",")) for c in args.config]
    rows = []
    print(f"sm_{args.arch}, Triton {triton.__version__}, head dim {d}, "
          f"{'causal' if args.causal else 'full'}{', TMA' if args.tma else ''}"
          f"{', dropout' if args.dropout else ''}{', key lengths' if args.lengths else ''}"
          f"{f', {args.mask} mask' if args.mask else ''}")
    for name, (kernel, configs) in KERNELS.items():
        if args.kernel and name not in args.kernel:
            continue
        if name == "fwd" and args.tma:
            configs = ft._FWD_TMA_CONFIGS  # the tiles the autotuner tries with TMA loads
        for m, n, warps, stages in chosen or configs:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # ptxas' failures print PTX
                    compiled = triton.compile(
                        source(kernel.fn, {**flags, "BLOCK_M": m, "BLOCK_N": n}),
                        target=GPUTarget("cuda", args.arch, 32),
                        options={"num_warps": warps, "num_stages": stages})
            except PTXASError as error:  # a tile ptxas rejects, or crashes on: the rest go on
                rows.append({"kernel": name, "config": [m, n, warps, stages],
                             "ptxas_error": str(error).splitlines()[0]})
                print(f"{name:5s} {str((m, n, warps, stages)):18s} "
                      f"{rows[-1]['ptxas_error']}", flush=True)
                continue
            row = {"kernel": name, "config": [m, n, warps, stages],
                   "shared": compiled.metadata.shared, **resources(compiled.asm["cubin"])}
            counts = instruction_counts(compiled.asm) if args.counts else {}
            rows.append(row | counts)
            print(f"{name:5s} {str((m, n, warps, stages)):18s} registers {row['reg']:3d}  "
                  f"stack {row['stack']:5d} B  shared {row['shared']:6d} B"
                  + "".join(f"  {key} {value}" for key, value in counts.items()), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "triton_registers.json"), "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "head_dim": d,
                       "causal": args.causal, "mask": args.mask,
                       "grouped": args.grouped, "tma": args.tma, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
