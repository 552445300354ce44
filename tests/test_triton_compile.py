"""The Triton kernels compile for Hopper (sm_90) on a machine with no GPU.

Triton's CPU interpreter runs the kernels' Python, which lets through what the compiler
rejects (pointer/int arithmetic, constexpr misuse, tuple returns). Triton's own frontend
and the ptxas it bundles need no GPU, so each kernel is compiled here for a few flag sets
that cover the code paths: head dims 64/80/128/256, window sides, key lengths, additive
and bool masks, dropout, grouped heads, key ranges, a kv group's heads packed in one
tile. The compile runs in a child process, because the test session has
TRITON_INTERPRET=1 set, and with it triton.jit builds interpreted functions.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from attnkit.backends import fused_triton  # noqa: E402  (after the skip without triton)

if old_triton := fused_triton.too_old_triton("cuda"):
    pytest.skip(old_triton, allow_module_level=True)

# (head dim, (left bounded, right bounded), key lengths, mask kind: 0 none/1 bool/2 add, dropout)
FLAG_SETS = [
    (64, (False, False), False, 0, False),
    (128, (False, True), True, 1, False),
    (80, (True, True), True, 2, True),
    (256, (False, True), False, 0, False),
]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # three kernels a set, the wide set's forward on its own tile too, and the merge
    assert f"compiled {3 * len(FLAG_SETS) + 2} kernels" in done.stdout


@pytest.mark.parametrize("mask_kind", [1, 2])
def test_mask_pointer_type_is_the_launched_one(mask_kind):
    """arg_types builds each mask path with the pointer type a launch passes: a bool
    mask goes in as _mask_args' uint8 view of it."""
    import inspect

    import torch
    from triton.runtime.jit import JITFunction, mangle_type

    import attnkit.backends.fused_triton as ft
    from attnkit.call import make_call

    q = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    mask = torch.rand(1, 1, 1, 5) > 0.5
    call = make_call(q, q, q, attn_mask=mask if mask_kind == 1 else mask.to(q.dtype))
    launched, _ = ft._mask_args(call)
    source = ft._fwd_kernel  # an autotuner, jitted or interpreted function: its Python
    while not inspect.isfunction(source):
        source = source.fn
    assert ft.arg_types(JITFunction(source), mask_kind)["MASK"] == mangle_type(launched)


def _compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner

    import attnkit.backends.fused_triton as ft

    def compile_one(kernel, constexprs, num_warps, num_stages, mask_kind):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        used = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=ft.arg_types(fn, mask_kind),
                                           constexprs=used)
        triton.compile(source, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})

    count = 0
    for d, (left, right), lengths, mask_kind, dropout in FLAG_SETS:
        flags = ft.kernel_flags(d, d, has_left=left, has_right=right, has_lengths=lengths,
                                mask_kind=mask_kind, dropout=dropout,
                                neg_scale=dropout)  # rides on dropout's sets: both compiled
        flags.update(GROUPED=lengths,  # dK/dV's loop over a kv group's heads: on lengths
                     TMA_OK=not lengths,
                     TMA=not lengths,  # the forward's TMA loads: both values compiled
                     SPLIT=dropout,  # the forward over key ranges: with dropout's sets
                     PACKED=mask_kind != 1)  # a kv group's heads in a tile: with TMA, bool mask
        wide = d > 128  # _prune's small tiles for wide heads
        tiles = ((ft._fwd_kernel, ft._FWD_CONFIGS), (ft._bwd_dkdv_kernel, ft._DKDV_CONFIGS),
                 (ft._bwd_dq_kernel, ft._DQ_CONFIGS))
        for kernel, configs in tiles:
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            assert [p.name for p in fn.params if p.do_not_specialize] == ["seed"], fn
            m, n, warps, stages = configs[-1]
            if wide:  # the forward's tile for few rows (the set is PACKED), dQ's own
                m, n, warps, stages = {ft._fwd_kernel: ft._WIDE_DECODE_TILE,
                                       ft._bwd_dq_kernel: ft._WIDE_DQ_TILE}.get(
                                           kernel, ft._WIDE_TILES[-1])
            compile_one(kernel, {**flags, "BLOCK_M": m, "BLOCK_N": n}, warps, stages, mask_kind)
            count += 1
        if wide:  # the forward's own tile for more rows, here through TMA
            assert flags["TMA"]
            m, n, warps, stages = ft._WIDE_FWD_TILE
            compile_one(ft._fwd_kernel, {**flags, "BLOCK_M": m, "BLOCK_N": n, "PACKED": False},
                        warps, stages, mask_kind)
            count += 1
    # the merge of the key ranges' partial results
    compile_one(ft._merge_kernel, {"HEAD_DV": 80, "BLOCK_DV": 128, "BLOCK_S": 8}, 4, 1, 0)
    return count + 1


if __name__ == "__main__":
    print(f"compiled {_compile_all()} kernels for sm_90")
