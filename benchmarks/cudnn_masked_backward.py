"""Where cuDNN's SDPA backward with an explicit attn_mask is wrong, on a GPU.

    python benchmarks/cudnn_masked_backward.py [--seqs 17 64 192 ...] [--head-dims 64 128]
        [--dtype bfloat16|float16] [--out DIR]

pytorch/pytorch#196678: with a mask, cuDNN's backward scores the padded half of a last
128-key tile 0, and for a row whose log-sum-exp is below -88.7 dq comes out NaN.
`attnkit`'s `sdpa` keeps cuDNN off masked backwards at Skv % 128 == 64 on the strength of
run 53's sweep on an H200 (torch 2.11, cuDNN 9.19); this is that sweep, to run again on
another GPU or release. Each call goes through SDPA pinned to cuDNN, pinned to the
memory-efficient kernel, and pinned to the math kernel in float32 on the same rounded
inputs (the answer the other two are held to), over key lengths, head dims, bool,
additive and materialized (B, 1, Sq, Skv) masks, Sq = Skv and Sq = Skv / 3, and three
kinds of rows:

- none: every row sees keys at ordinary logits;
- softdead: a -10000 padding mask hides every key of batch element 1 (its rows' lse is
  near -10000; a bool mask cannot hide softly, so there that element sees every key);
- logits: every logit near -120 (the issue's own reproduction). Those calls are
  ill-conditioned for every kernel (dq is a difference of terms of -120 * sqrt(D)), so a
  kernel is judged against the efficient kernel's error there, not an absolute bound.

A call is wrong for cuDNN when its gradients are not finite, or off by more than 0.02
and 3 times the efficient kernel's error. Prints the key lengths where cuDNN was wrong,
writes DIR/cudnn_masked_backward.json, and exits 1 if cuDNN was wrong at a key length
where attnkit lets it run a masked backward (attnkit.backends.sdpa's
cudnn_masked_grad_fails_at).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.backends.sdpa import cudnn_masked_grad_fails_at
from attnkit.bench import environment

SEQS = [17, 40, 64, 100, 127, 128, 129, 192, 200, 256, 320, 383, 384, 385, 448, 512, 640,
        704, 1000, 1024, 1088]
ROWS = ("none", "softdead", "logits")


def gradients(kernel: SDPBackend, q, k, v, mask, grad, upcast: bool):
    """(output, [dq, dk, dv]) of SDPA pinned to `kernel`, in float32; upcast: the inputs
    (and an additive mask) in float32 first."""
    leaves = [(t.float() if upcast else t).detach().requires_grad_() for t in (q, k, v)]
    if upcast and mask.dtype != torch.bool:
        mask = mask.float()
    with sdpa_kernel(kernel):
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    out.backward(grad.float() if upcast else grad)
    return out.detach().float(), [t.grad.float() for t in leaves]


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; inf where got is not finite."""
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def inputs(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int, kind: str,
           rows: str, dtype: torch.dtype, seed: int):
    """q, k, v, the mask and the output gradient of one call."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q, k, v = randn(batch, heads, seq_q, head_dim), *(
        randn(batch, heads, seq_kv, head_dim) for _ in range(2))
    if rows == "logits":
        q[..., 0] = 1.0
        k[..., 0] = -120 * math.sqrt(head_dim)
    lengths = torch.tensor([seq_kv] + [max(1, seq_kv // 2 + i) for i in range(1, batch)],
                           device="cuda")
    if rows == "softdead":
        lengths[1] = 0
    hidden = torch.arange(seq_kv, device="cuda")[None, :] >= lengths[:, None]  # (B, Skv)
    if kind == "additive":
        mask = torch.zeros(batch, 1, 1, seq_kv, device="cuda").masked_fill(
            hidden[:, None, None, :], -10000.0).to(dtype)
    else:
        mask = ~hidden[:, None, None, :]
        if kind == "bool-full":
            mask = mask.expand(batch, 1, seq_q, seq_kv).contiguous()
        if rows == "softdead":
            mask[1] = True
    return q, k, v, mask, randn(batch, heads, seq_q, head_dim)


def check(case: dict, dtype: torch.dtype) -> dict:
    """case with cuDNN's output and gradient errors and the efficient kernel's worst, or
    with why cuDNN refused it."""
    q, k, v, mask, grad = inputs(dtype=dtype, **{key: case[key] for key in (
        "batch", "heads", "seq_q", "seq_kv", "head_dim", "kind", "rows", "seed")})
    try:
        out, got = gradients(SDPBackend.CUDNN_ATTENTION, q, k, v, mask, grad, upcast=False)
    except RuntimeError as exc:
        return {**case, "refused": str(exc).splitlines()[0][:200]}
    want_out, want = gradients(SDPBackend.MATH, q, k, v, mask, grad, upcast=True)
    _, efficient = gradients(SDPBackend.EFFICIENT_ATTENTION, q, k, v, mask, grad, upcast=False)
    return {**case, "out": max_rel(out, want_out),
            **{name: max_rel(g, w)
               for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True)},
            "efficient": max(max_rel(g, w) for g, w in zip(efficient, want, strict=True))}


def wrong(result: dict) -> bool:
    """Whether cuDNN's gradients were off for this call (see the module docstring)."""
    if "refused" in result:
        return False
    worst = max(result["dq"], result["dk"], result["dv"])
    return worst == math.inf or worst > max(0.02, 3 * result["efficient"])


def cases(seqs: list[int], head_dims: list[int]) -> list[dict]:
    found = []
    for skv in seqs:
        for d in head_dims:
            for kind in ("additive", "bool"):
                found += [dict(batch=2, heads=4, seq_q=skv, seq_kv=skv, head_dim=d, kind=kind,
                               rows=rows, seed=skv * 7 + d) for rows in ROWS]
        for rows in ROWS:  # fewer queries than keys, and the materialized mask, at D=64
            found.append(dict(batch=2, heads=4, seq_q=max(1, skv // 3), seq_kv=skv,
                              head_dim=64, kind="additive", rows=rows, seed=skv))
            found.append(dict(batch=2, heads=4, seq_q=skv, seq_kv=skv, head_dim=64,
                              kind="bool-full", rows=rows, seed=skv + 1))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=SEQS, metavar="SKV")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], metavar="D")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device with cuDNN attention")
    dtype = getattr(torch, args.dtype)
    results = [check(case, dtype) for case in cases(args.seqs, args.head_dims)]
    bad = [r for r in results if wrong(r)]
    refused = [r for r in results if "refused" in r]
    print(f"{len(results)} calls, cuDNN wrong in {len(bad)}, refused {len(refused)}")
    for label, kept in (("where attnkit keeps it off (Skv % 128 == 64)", False),
                        ("where attnkit lets it run", True)):
        lengths = sorted({r["seq_kv"] for r in bad
                          if cudnn_masked_grad_fails_at(r["seq_kv"]) != kept})
        print(f"  wrong {label}: Skv {lengths or 'none'}")
    for rows in ROWS:
        fine = [max(r["dq"], r["dk"], r["dv"]) for r in results
                if r.get("rows") == rows and "refused" not in r and not wrong(r)]
        if fine:
            print(f"  rows {rows}: worst error where right {max(fine):.2g}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cudnn_masked_backward.json").write_text(json.dumps(
            {"environment": environment(torch.device("cuda")), "dtype": args.dtype,
             "results": results}, indent=0))
    return 1 if any(not cudnn_masked_grad_fails_at(r["seq_kv"]) for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
