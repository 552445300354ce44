"""Checking implementations against the float64 oracle.

`check(impl, case)` draws fresh random inputs for one `Case`, runs `impl` and the
`reference` backend on them, and compares the outputs and the gradients by relative
error ||x - ref|| / ||ref||. The test suite and `attnkit verify` both judge with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from attnkit.call import UnsupportedError
from attnkit.functional import attention

__all__ = ["Case", "CaseResult", "check", "default_cases", "rel_err", "tolerance"]

# Backends whose float32 matmuls run on TF32 tensor cores on a GPU.
TF32_BACKENDS = frozenset({"triton", "flex"})


def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf, an all-zero ref compares absolutely."""
    x64, ref64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(x64).all():
        return math.inf
    denom = ref64.norm().item()
    diff = (x64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def tolerance(dtype: torch.dtype, device: torch.device, impl: str = "") -> float:
    """The largest relative error DESIGN.md allows for this dtype, device and backend."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    tf32 = device.type == "cuda" and (
        impl in TF32_BACKENDS or torch.backends.cuda.matmul.allow_tf32
    )
    if dtype == torch.float32:
        return 1e-3 if tf32 else 1e-5
    return 1e-10


@dataclass(frozen=True)
class Case:
    """One attention problem to verify; inputs are drawn fresh by `make_inputs`.

    mask: None, "bool" (random (B, 1, Sq, Skv) pattern), "additive" (random floats,
    (B, Hq, Sq, Skv)) or "padding" (the BERT-style additive (B, 1, 1, Skv) mask).
    dead_rows: make some queries see no key at all (a zero key length, an all-False mask row).
    """

    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    seq_q: int = 17
    seq_kv: int = 17
    head_dim: int = 64
    head_dim_v: int | None = None
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    key_lengths: bool = False
    mask: str | None = None
    dead_rows: bool = False
    dtype: torch.dtype = torch.float32
    grad: bool = True

    @property
    def name(self) -> str:
        parts = [
            f"b{self.batch}",
            f"h{self.heads_q}/{self.heads_kv}",
            f"s{self.seq_q}x{self.seq_kv}",
            f"d{self.head_dim}" + (f"v{self.head_dim_v}" if self.head_dim_v else ""),
        ]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.key_lengths:
            parts.append("lens")
        if self.mask:
            parts.append(f"{self.mask}-mask")
        if self.dead_rows:
            parts.append("dead-rows")
        return " ".join(parts)

    def make_inputs(
        self, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Random q, k, v (requires_grad when self.grad) and the keyword arguments."""
        device = torch.device(device)

        def randn(*shape: int) -> Tensor:
            t = torch.randn(*shape, generator=generator, dtype=torch.float32)
            return t.to(device=device, dtype=self.dtype).requires_grad_(self.grad)

        b, sq, skv = self.batch, self.seq_q, self.seq_kv
        q = randn(b, self.heads_q, sq, self.head_dim)
        k = randn(b, self.heads_kv, skv, self.head_dim)
        v = randn(b, self.heads_kv, skv, self.head_dim_v or self.head_dim)
        kwargs: dict = {"causal": self.causal, "window": self.window}
        if self.key_lengths or (self.dead_rows and self.mask is None):
            lengths = torch.randint(1, skv + 1, (b,), generator=generator)
            if self.dead_rows:
                lengths[0] = 0
            kwargs["key_lengths"] = lengths.to(device)
        if self.mask == "bool":
            allowed = torch.rand(b, 1, sq, skv, generator=generator) > 0.3
            if self.dead_rows:
                allowed[:, :, 0, :] = False
            kwargs["attn_mask"] = allowed.to(device)
        elif self.mask == "additive":
            bias = torch.randn(b, self.heads_q, sq, skv, generator=generator)
            if self.dead_rows:
                bias[:, :, 0, :] = -math.inf
            kwargs["attn_mask"] = bias.to(device=device, dtype=self.dtype)
        elif self.mask == "padding":
            bias = torch.randn(b, 1, 1, skv, generator=generator)
            if self.dead_rows:
                bias[0] = -math.inf
            kwargs["attn_mask"] = bias.to(device=device, dtype=self.dtype)
        elif self.mask is not None:
            raise ValueError(f"mask must be None, 'bool', 'additive' or 'padding', got {self.mask!r}")
        return q, k, v, kwargs


@dataclass
class CaseResult:
    """How one implementation did on one case; `skipped` holds the reason it could not run."""

    impl: str
    case: Case
    out_err: float = math.nan
    lse_err: float = math.nan
    grad_err: float = math.nan
    tol: float = math.nan
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        if self.skipped is not None:
            return True
        measured = [e for e in (self.out_err, self.grad_err) if not math.isnan(e)]
        lse_ok = math.isnan(self.lse_err) or self.lse_err <= 1e-3
        return not self.errors and lse_ok and all(e <= self.tol for e in measured)


def check(
    impl: str,
    case: Case,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    with_lse: bool = True,
) -> CaseResult:
    """Run `impl` and the oracle on fresh random inputs of `case` and compare them.

    The output error, the error of (dq, dk, dv) stacked (when case.grad), and, when the
    backend returns it, the log-sum-exp error (finite entries; the -inf pattern must match).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    q, k, v, kwargs = case.make_inputs(device, generator)
    result = CaseResult(impl=impl, case=case, tol=tolerance(case.dtype, device, impl))

    try:
        got = attention(q, k, v, impl=impl, return_lse=with_lse, **kwargs)
    except UnsupportedError as exc:
        if with_lse:  # the backend may run the call without the log-sum-exp
            return check(impl, case, device, seed=seed, with_lse=False)
        result.skipped = str(exc).split(": ", 1)[-1]
        return result
    want = attention(q, k, v, impl="reference", return_lse=True, **kwargs)
    out, lse = got if with_lse else (got, None)
    out_ref, lse_ref = want

    result.out_err = rel_err(out, out_ref)
    if lse is not None:
        result.lse_err = _lse_err(lse, lse_ref)
    if case.grad:
        grad_out = torch.randn(out_ref.shape, generator=generator).to(device, case.dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
        grads_ref = torch.autograd.grad(out_ref, (q, k, v), grad_out)
        if any(g is None for g in grads):
            result.errors.append("some gradient is missing")
        else:
            result.grad_err = max(rel_err(g, r) for g, r in zip(grads, grads_ref))
    if out.shape != out_ref.shape or out.dtype != case.dtype:
        result.errors.append(f"output {tuple(out.shape)} {out.dtype}, expected "
                             f"{tuple(out_ref.shape)} {case.dtype}")
    return result


def _lse_err(lse: Tensor, ref: Tensor) -> float:
    if lse.dtype != torch.float32 or lse.shape != ref.shape:
        return math.inf
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(lse)) or torch.isnan(lse).any():
        return math.inf
    if not finite.any():
        return 0.0
    return rel_err(lse[finite], ref[finite])


def default_cases(dtype: torch.dtype = torch.float32, *, large: bool = True) -> list[Case]:
    """The verification matrix: masks, grouped heads, odd lengths and head dims, dead rows."""
    base = Case(dtype=dtype)
    cases = [
        base,
        replace(base, causal=True),
        replace(base, heads_q=4, heads_kv=1, causal=True),  # multi-query
        replace(base, seq_q=1, seq_kv=17, causal=True),  # one query against a cache
        replace(base, seq_q=17, seq_kv=5, causal=True, dead_rows=False),  # early rows see nothing
        replace(base, head_dim=16),
        replace(base, head_dim=80, causal=True),
        replace(base, head_dim=128, heads_kv=4),
        replace(base, head_dim_v=32),
        replace(base, window=(4, 2)),
        replace(base, window=(5, 0), causal=True),
        replace(base, key_lengths=True),
        replace(base, key_lengths=True, dead_rows=True, causal=True),
        replace(base, mask="bool", dead_rows=True),
        replace(base, mask="additive"),
        replace(base, mask="padding"),
        replace(base, mask="padding", dead_rows=True),
    ]
    if large:
        cases += [
            replace(base, batch=1, seq_q=1000, seq_kv=1000, causal=True),
            replace(base, batch=1, seq_q=1000, seq_kv=1000, key_lengths=True, head_dim=80),
        ]
    return cases
