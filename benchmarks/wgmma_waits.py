"""Where Triton waits on Hopper's asynchronous matmuls in an attention loop, on any machine.

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/wgmma_waits.py

FA3 hides the softmax's exp2 behind the tensor cores by issuing the next block's Q K^T
before the current block's softmax, and by two warpgroups taking turns. This compiles
three forms of the forward's inner loop for sm_90 (no GPU needed) and prints, in loop
order, each matmul Triton issues (`dot`), each wait on them with how many it leaves in
flight (`wait(N)`), and each exp2: `plain` (the loop as fused_triton writes it),
`rotated` (block j+1's Q K^T issued before block j's softmax, its result carried to the
next iteration) and `halves` (the query rows as two half-tiles, both Q K^T issued before
either softmax). A wait(0) between a dot and the next exp2 means the softmax cannot run
while that matmul does.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, v):
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _tiles(K, V, j, BLOCK_N: tl.constexpr, D: tl.constexpr):
    rows = (j * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * D + tl.arange(0, D)[None, :]
    return tl.load(K + rows), tl.load(V + rows)


@triton.jit
def _start(Q, first_row, ROWS: tl.constexpr, D: tl.constexpr):
    """Offsets of query rows [first_row, first_row + ROWS), their tile, and the running
    max, sum and output accumulator of an online softmax over them."""
    rows = (first_row + tl.arange(0, ROWS))[:, None] * D + tl.arange(0, D)[None, :]
    return (rows, tl.load(Q + rows), tl.full([ROWS], float("-inf"), tl.float32),
            tl.zeros([ROWS], tl.float32), tl.zeros([ROWS, D], tl.float32))


@triton.jit
def _finish(Out, rows, acc, l_i):
    tl.store(Out + rows, (acc / l_i[:, None]).to(tl.bfloat16))


@triton.jit
def plain(Q, K, V, Out, n_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          D: tl.constexpr):
    rows, q, m_i, l_i, acc = _start(Q, 0, BLOCK_M, D)
    for j in range(0, n_blocks):
        k, v = _tiles(K, V, j, BLOCK_N, D)
        m_i, l_i, acc = _softmax_step(tl.dot(q, tl.trans(k)), m_i, l_i, acc, v)
    _finish(Out, rows, acc, l_i)


@triton.jit
def rotated(Q, K, V, Out, n_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            D: tl.constexpr):
    rows, q, m_i, l_i, acc = _start(Q, 0, BLOCK_M, D)
    k, v = _tiles(K, V, 0, BLOCK_N, D)
    qk = tl.dot(q, tl.trans(k))
    for j in range(1, n_blocks):
        k_next, v_next = _tiles(K, V, j, BLOCK_N, D)
        qk_next = tl.dot(q, tl.trans(k_next))  # in flight during block j-1's softmax?
        m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, v)
        qk, v = qk_next, v_next
    m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, v)
    _finish(Out, rows, acc, l_i)


@triton.jit
def halves(Q, K, V, Out, n_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           D: tl.constexpr):
    HALF: tl.constexpr = BLOCK_M // 2
    rows_a, qa, ma, la, acca = _start(Q, 0, HALF, D)
    rows_b, qb, mb, lb, accb = _start(Q, HALF, HALF, D)
    for j in range(0, n_blocks):
        k, v = _tiles(K, V, j, BLOCK_N, D)
        qka = tl.dot(qa, tl.trans(k))
        qkb = tl.dot(qb, tl.trans(k))  # in flight during half a's softmax?
        ma, la, acca = _softmax_step(qka, ma, la, acca, v)
        mb, lb, accb = _softmax_step(qkb, mb, lb, accb, v)
    _finish(Out, rows_a, acca, la)
    _finish(Out, rows_b, accb, lb)


def loop_events(fn, warps: int = 4, stages: int = 3) -> list[str]:
    """dot / wait(N) / exp2, in the order the compiled inner loop has them."""
    signature = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "n_blocks": "i32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr"}
    source = triton.compiler.ASTSource(fn=fn, signature=signature,
                                       constexprs={"BLOCK_M": 128, "BLOCK_N": 64, "D": 64})
    ttgir = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages}).asm["ttgir"]
    body = ttgir[ttgir.index("scf.for"):]
    body = body[:body.index("scf.yield")]
    events = re.findall(r"ttng\.warp_group_dot_wait [^\n]*?pendings = (\d+)"
                        r"|(ttng\.warp_group_dot) |(math\.exp2)", body)
    return [f"wait({w})" if w else "dot" if dot else "exp2" for w, dot, _ in events]


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, BLOCK_M 128, BLOCK_N 64, D 64, 4 warps")
    for fn in (plain, rotated, halves):
        print(f"{fn.__name__:8s} " + " ".join(loop_events(fn)))


if __name__ == "__main__":
    main()
