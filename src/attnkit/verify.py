"""Checking implementations against the float64 oracle.

`check(impl, case)` draws fresh random inputs for one `Case`, runs `impl` and the
`reference` backend on them, and compares the outputs and the gradients by relative
error ||x - ref|| / ||ref||. The test suite and `attnkit verify` both judge with it.

`check_module(label, build, case)` does the same one level up: a whole attention module
(a textbook variant, or `MultiHeadAttention` with a pinned `impl`) loaded with one set of
weights through `attnkit.weights.convert`, against `module_oracle`, the float64 computation
of those same weights. `run_verify` runs both over everything registered, and
`print_report` renders the tables `attnkit verify` shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.markup import escape
from torch import Tensor

from attnkit.call import UnsupportedError
from attnkit.functional import attention

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Case",
    "CaseResult",
    "ModuleCase",
    "canonical_source",
    "check",
    "check_module",
    "default_cases",
    "lse_err",
    "lse_tolerance",
    "module_candidates",
    "module_cases",
    "module_oracle",
    "print_report",
    "rel_err",
    "run_verify",
    "tolerance",
    "unknown_filters",
    "write_json",
]

# Backends whose float32 matmuls run on TF32 tensor cores on a GPU.
TF32_BACKENDS = frozenset({"triton", "flex"})


def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64.

    NaN or inf anywhere in x gives inf; an all-zero ref compares absolutely.
    """
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
    (B, Hq, Sq, Skv)), "padding" (the BERT-style additive (B, 1, 1, Skv) mask) or "lowest"
    (Hugging Face's: 0 on a random prefix of keys, the lowest value of the mask's dtype
    after it, which hides those keys as -inf does; the mask is in the case's dtype, or in
    float32 where that is float16, whose lowest value, -65504, is a number like any other).
    dead_rows: make some queries see no key at all (a zero key length, an all-False mask
    row, a mask that hides every key of batch element 0).
    scale: the softmax scale (None: 1 / sqrt(head_dim)); a large one makes large logits.
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
    scale: float | None = None
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
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
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
        if self.scale is not None:
            kwargs["scale"] = self.scale
        def drawn_lengths() -> Tensor:
            """Keys kept per batch element, in [1, Skv]; none for element 0 with dead_rows."""
            lengths = torch.randint(1, skv + 1, (b,), generator=generator)
            if self.dead_rows:
                lengths[0] = 0
            return lengths

        if self.key_lengths or (self.dead_rows and self.mask is None):
            kwargs["key_lengths"] = drawn_lengths().to(device)
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
        elif self.mask == "lowest":
            mask_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
            padded = torch.arange(skv)[None, :] >= drawn_lengths()[:, None]
            bias = torch.zeros(b, 1, 1, skv, dtype=mask_dtype)
            bias[padded[:, None, None, :]] = torch.finfo(mask_dtype).min
            kwargs["attn_mask"] = bias.to(device)
        elif self.mask is not None:
            raise ValueError(
                f"mask must be None, 'bool', 'additive', 'padding' or 'lowest', got {self.mask!r}"
            )
        return q, k, v, kwargs


@dataclass
class CaseResult:
    """How one implementation did on one case; `skipped` holds the reason it could not run."""

    impl: str
    case: Case | ModuleCase
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
        lse_ok = math.isnan(self.lse_err) or self.lse_err <= lse_tolerance(self.tol)
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
        result.lse_err = lse_err(lse, lse_ref)
    if case.grad:
        grad_out = torch.randn(out_ref.shape, generator=generator).to(device, case.dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
        grads_ref = torch.autograd.grad(out_ref, (q, k, v), grad_out)
        if any(g is None for g in grads):
            result.errors.append("some gradient is missing")
        else:
            result.grad_err = max(rel_err(g, r) for g, r in zip(grads, grads_ref, strict=True))
    if out.shape != out_ref.shape or out.dtype != case.dtype:
        result.errors.append(f"output {tuple(out.shape)} {out.dtype}, expected "
                             f"{tuple(out_ref.shape)} {case.dtype}")
    return result


def lse_tolerance(tol: float) -> float:
    """The bound on lse_err beside an output tolerance tol: 1e-3, or tol where looser (a
    log-sum-exp from half-precision scores is only as good as the dtype)."""
    return max(1e-3, tol)


def lse_err(lse: Tensor, ref: Tensor) -> float:
    """rel_err of a float32 log-sum-exp (B, H, Sq) over its finite entries; inf unless
    its -inf entries (rows that see no key) are ref's."""
    if lse.dtype != torch.float32 or lse.shape != ref.shape:
        return math.inf
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(lse)) or torch.isnan(lse).any():
        return math.inf
    if not finite.any():
        return 0.0
    return rel_err(lse[finite], ref[finite])


def default_cases(dtype: torch.dtype = torch.float32, *, large: bool = True,
                  long: bool = False) -> list[Case]:
    """The verification matrix: masks, grouped heads, odd lengths and head dims, dead rows.
    large adds 1000-long sequences; long adds 4096 queries against 4096 keys at D=128,
    where `triton` on Hopper runs its Gluon forward (too slow for a CPU's oracle)."""
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
        # A block of new queries against a cache, grouped: FlexAttention's decoding kernel
        # packs Sq * group = 160 rows, more than one block of its block mask.
        replace(base, heads_q=8, heads_kv=2, seq_q=40, seq_kv=300, causal=True),
        # Logits of a few tens: scores rounded to half precision before the softmax put
        # naive and einsum 2.7% off in bfloat16 (fixed in run 52).
        replace(base, seq_q=32, seq_kv=300, causal=True, scale=4.0),
        # Hugging Face's padding mask, hiding batch element 0 whole (masks.HIDDEN_BELOW):
        # the oracle gave the uniform row there and the fused GPU kernels zeros (run 54).
        replace(base, mask="lowest", dead_rows=True),
    ]
    if large:
        cases += [
            replace(base, batch=1, seq_q=1000, seq_kv=1000, causal=True),
            replace(base, batch=1, seq_q=1000, seq_kv=1000, key_lengths=True, head_dim=80),
        ]
    if long:
        cases.append(replace(base, batch=1, seq_q=4096, seq_kv=4096, head_dim=128,
                             causal=True, key_lengths=True))
    return cases


# --------------------------------------------------------------------------- modules
#
# One level up from `check`: whole attention modules (x (B, S, d) -> (B, S, d)) on one set
# of weights, against the float64 computation of those same weights.


def problem_label(sizes: list[str], causal: bool, qkv_bias: bool, mask: str | None) -> str:
    """"b8 s1024 d768 h12 causal bias padding-mask": the sizes, then the options that are on."""
    parts = [*sizes, "causal" if causal else "full"]
    if qkv_bias:
        parts.append("bias")
    if mask:
        parts.append("key-lengths" if mask == "lengths" else f"{mask}-mask")
    return " ".join(parts)


@dataclass(frozen=True)
class ModuleCase:
    """One whole-module problem: x (B, S, d_model) through an attention module with `heads`.

    mask: None or "padding", the BERT-style additive (B, 1, 1, S) mask (see `padding_mask`).
    """

    batch: int = 2
    seq: int = 17
    d_model: int = 64
    heads: int = 2  # head dim 32: compiled flex on a CPU refuses anything narrower
    causal: bool = True
    qkv_bias: bool = False
    mask: str | None = None
    dtype: torch.dtype = torch.float32
    grad: bool = True

    @property
    def name(self) -> str:
        sizes = [f"b{self.batch}", f"s{self.seq}", f"d{self.d_model}", f"h{self.heads}"]
        return problem_label(sizes, self.causal, self.qkv_bias, self.mask)

    def make_inputs(
        self, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Random x (B, S, d_model) (requires_grad when self.grad) and the attn_mask or None."""
        device = torch.device(device)
        x = torch.randn(self.batch, self.seq, self.d_model, generator=generator)
        x = x.to(device=device, dtype=self.dtype).requires_grad_(self.grad)
        if self.mask is None:
            return x, None
        if self.mask != "padding":
            raise ValueError(f"mask must be None or 'padding', got {self.mask!r}")
        return x, padding_mask(self.batch, self.seq, self.dtype, device, generator)


def padding_mask(
    batch: int,
    seq: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Additive (B, 1, 1, S) padding mask: 0 for the first L_b keys, -10000 after them.

    L_b is drawn in [S/2, S], so no query loses every key. -10000 (BERT's value) rather
    than -inf keeps the mask finite, as a padding mask from a tokenizer pipeline is.
    """
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=generator)
    padded = torch.arange(seq)[None, :] >= lengths[:, None]  # (B, S)
    bias = torch.zeros(batch, 1, 1, seq)
    bias[padded[:, None, None, :]] = -10000.0
    return bias.to(device=device, dtype=dtype)


def module_cases(dtype: torch.dtype = torch.float32) -> list[ModuleCase]:
    """The module matrix: the notebook's causal form, the tutorial's BERT form, both at once."""
    base = ModuleCase(dtype=dtype)
    return [
        base,
        replace(base, causal=False, qkv_bias=True, mask="padding"),
        replace(base, seq=40, qkv_bias=True, mask="padding"),
    ]


def canonical_source(
    d_model: int,
    heads: int,
    *,
    causal: bool,
    qkv_bias: bool,
    dtype: torch.dtype,
    seed: int = 0,
) -> torch.nn.Module:
    """A float64 CPU `MultiHeadAttention` with random weights exactly representable in `dtype`.

    Every module under test gets these weights through `weights.convert`; rounding them
    through `dtype` first means the oracle sees the very weights a low-precision copy holds,
    so the comparison measures the computation, not the rounding of the weights.
    Without qkv_bias the output bias is zero too: `torch.nn.MultiheadAttention` has one
    bias flag for both projections, and a zero bias is one that every variant can hold.
    Raises ImportError when `attnkit.module` is not there.
    """
    from attnkit.module import MultiHeadAttention

    generator = torch.Generator().manual_seed(seed)
    source = MultiHeadAttention(
        d_model, d_model, heads, causal=causal, qkv_bias=qkv_bias, out_bias=True,
        impl="reference", dtype=torch.float64,
    )
    with torch.no_grad():
        for param in source.parameters():
            # Redrawn rather than left at the module's init, which may zero the biases.
            fan_in = param.shape[-1] if param.dim() > 1 else 10.0
            fresh = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((fresh / math.sqrt(fan_in)).to(dtype).to(torch.float64))
        if not qkv_bias and source.out_proj.bias is not None:
            source.out_proj.bias.zero_()
    return source.eval()


def module_oracle(
    source: torch.nn.Module,
    x: Tensor,
    *,
    heads: int,
    kv_heads: int | None = None,
    causal: bool,
    attn_mask: Tensor | None = None,
    key_lengths: Tensor | None = None,
) -> Tensor:
    """The float64 function every module must compute, from `source`'s weights; (B, S, d_out).

    out_proj(attention(q, k, v)) with q, k, v split from source.qkv(x) in DESIGN.md's
    layout: the first Hq*hd output rows are the queries, then Hkv*hd keys, then Hkv*hd
    values, each head's hd rows contiguous. Written out here rather than by calling
    `source`, so that a mistake in the module cannot hide in its own yardstick.
    x: (B, S, d_in); differentiable with respect to x (not to the weights).
    """
    kv_heads = kv_heads or heads
    weight = source.qkv.weight.detach().to(device=x.device, dtype=torch.float64)
    bias = source.qkv.bias
    bias = None if bias is None else bias.detach().to(device=x.device, dtype=torch.float64)
    b, s, _ = x.shape
    qkv = torch.nn.functional.linear(x.to(torch.float64), weight, bias)  # (B, S, (Hq+2Hkv)*hd)
    hd = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q = q.reshape(b, s, heads, hd).transpose(1, 2)  # (B, Hq, S, hd)
    k = k.reshape(b, s, kv_heads, hd).transpose(1, 2)  # (B, Hkv, S, hd)
    v = v.reshape(b, s, kv_heads, hd).transpose(1, 2)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(torch.float64)
    out = attention(q, k, v, causal=causal, attn_mask=attn_mask, key_lengths=key_lengths,
                    impl="reference")
    out = out.transpose(1, 2).reshape(b, s, heads * hd)  # (B, S, Hq*hd)
    proj = source.out_proj
    out_bias = None if proj.bias is None else proj.bias.detach().to(x.device, torch.float64)
    return torch.nn.functional.linear(
        out, proj.weight.detach().to(x.device, torch.float64), out_bias
    )


def selected(
    label: str, impls: Iterable[str] | None, exclude: Iterable[str] | None = None
) -> bool:
    """Whether `label` passes the --impl / --exclude filters.

    A filter entry matches the full label ("variant:einsum", "module:sdpa") or the part
    after the colon, so `sdpa` picks the backend, `module:sdpa` and a variant named sdpa.
    With no --impl everything runs except the oracle itself, which runs only when named.
    """
    names = {label, label.split(":", 1)[-1]}
    if exclude and names & set(exclude):
        return False
    if not impls:
        return "reference" not in names
    return bool(names & set(impls))


def unknown_filters(names: Iterable[str] | None) -> list[str]:
    """The --impl / --exclude entries that `selected` matches to no label: every backend and
    "auto" (the functional rows), "module:BACKEND" and "variant:NAME"."""
    from attnkit.backends import BACKENDS

    try:
        from attnkit.variants import REGISTRY
    except ImportError:
        REGISTRY = {}
    labels = [*BACKENDS, "auto", *(f"module:{name}" for name in BACKENDS),
              *(f"variant:{name}" for name in REGISTRY)]
    return [name for name in names or ()
            if not any(selected(label, [name]) for label in labels)]


def module_candidates(
    *,
    d_model: int,
    heads: int,
    seq: int,
    causal: bool,
    qkv_bias: bool,
    device: torch.device | str,
    impls: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, Callable[[], torch.nn.Module] | str]:
    """Every module implementation, label -> a builder of a fresh float64 CPU module, or why not.

    Labels: "variant:NAME" for each class in `attnkit.variants.REGISTRY`, "module:NAME" for
    `MultiHeadAttention(impl=NAME)` per backend (the reason when the backend is unavailable
    on `device`). Raises ImportError when `attnkit.module` or `attnkit.weights` is
    missing; variants are
    optional, so that this works with whatever subset of the package exists.
    """
    from attnkit.backends import BACKENDS
    from attnkit.module import MultiHeadAttention
    from attnkit.weights import convert  # noqa: F401 (no weights, no module checks: say so)

    try:
        from attnkit.variants import REGISTRY
    except ImportError:
        REGISTRY = {}

    device = torch.device(device)
    found: dict[str, Callable[[], torch.nn.Module] | str] = {}
    for name, cls in REGISTRY.items():
        found[f"variant:{name}"] = (
            lambda cls=cls: cls(d_model, d_model, seq, 0.0, heads, qkv_bias, causal=causal)
        )
    for name, backend in BACKENDS.items():
        reason = backend.available(device)
        found[f"module:{name}"] = reason or (
            lambda name=name: MultiHeadAttention(
                d_model, d_model, heads, causal=causal, qkv_bias=qkv_bias, out_bias=True,
                impl=name, dtype=torch.float64,
            )
        )
    return {label: build for label, build in found.items() if selected(label, impls, exclude)}


def load_weights(
    source: torch.nn.Module, module: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """`module` with `source`'s weights (converted in float64 on the CPU), moved, in eval mode."""
    from attnkit.weights import convert

    convert(source, module)
    return module.to(device=device, dtype=dtype).eval()


def module_forward(module: torch.nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """module(x[, attn_mask=...]) -> (B, S, d_out); the mask is passed only when there is one."""
    out = module(x) if attn_mask is None else module(x, attn_mask=attn_mask)
    return out[0] if isinstance(out, tuple) else out


def check_module(
    label: str,
    build: Callable[[], torch.nn.Module],
    case: ModuleCase,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
) -> CaseResult:
    """Run the module `build()` makes, loaded with the canonical weights, against the oracle.

    The output error and the error of dL/dx (a layout-free gradient: parameter gradients
    live in each variant's own layout). A module that refuses autograd here with
    UnsupportedError is checked forward-only, under no_grad (the result's case.grad False).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    result = CaseResult(
        impl=label, case=case, tol=tolerance(case.dtype, device, label.split(":", 1)[-1])
    )
    source = canonical_source(
        case.d_model, case.heads, causal=case.causal, qkv_bias=case.qkv_bias,
        dtype=case.dtype, seed=seed,
    )
    x, mask = case.make_inputs(device, generator)
    module = load_weights(source, build(), device, case.dtype)
    try:
        with torch.set_grad_enabled(case.grad):
            out = module_forward(module, x, mask)
    except UnsupportedError as exc:
        if case.grad:  # no backward here (compiled flex on a CPU): check the forward alone
            return check_module(label, build, replace(case, grad=False), device, seed=seed)
        result.skipped = str(exc).split(": ", 1)[-1]
        return result
    x64 = x.detach().to(torch.float64).requires_grad_(case.grad)
    want = module_oracle(
        source, x64, heads=case.heads, causal=case.causal, attn_mask=mask
    )
    if out.shape != want.shape or out.dtype != case.dtype:
        result.errors.append(
            f"output {tuple(out.shape)} {out.dtype}, expected {tuple(want.shape)} {case.dtype}"
        )
        return result
    result.out_err = rel_err(out, want)
    if case.grad:
        grad_out = torch.randn(want.shape, generator=generator, dtype=torch.float64)
        (gx,) = torch.autograd.grad(out, x, grad_out.to(device, case.dtype))
        (gx_ref,) = torch.autograd.grad(want, x64, grad_out.to(device))
        result.grad_err = rel_err(gx, gx_ref)
    return result


# --------------------------------------------------------------------------- the job


def _failure(label: str, case: Case | ModuleCase, exc: BaseException) -> CaseResult:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return CaseResult(impl=label, case=case, errors=[f"{type(exc).__name__}: {first_line}"])


def _check_backend(name: str, case: Case, device: torch.device) -> CaseResult:
    """`check`, falling back to the forward alone where the backend has no backward here."""
    result = check(name, case, device)
    if result.skipped is not None and case.grad:
        forward = check(name, replace(case, grad=False), device)
        if forward.skipped is None:
            return forward
    return result


def run_verify(
    device: torch.device | str,
    dtype: torch.dtype,
    impls: Iterable[str] | None = None,
    large: bool = True,
    progress: bool = True,
    exclude: Iterable[str] | None = None,
    on_result: Callable[[list[CaseResult], int], None] | None = None,
) -> list[CaseResult]:
    """Every available backend over `default_cases`, every module over `module_cases`.

    impls / exclude filter by name (see `selected`). An implementation that is unavailable on the
    device is recorded as skipped with the reason; one that raises anything other than
    UnsupportedError is recorded as failed with the error, never stops the run.
    on_result(results so far, number of checks in all) is called after every check, so that
    a caller can keep what a run cut off by a time limit had finished.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from attnkit.backends import BACKENDS

    device = torch.device(device)
    impls = list(impls) if impls else None
    Job = Callable[[], CaseResult] | str  # the check to run, or why it cannot
    jobs: list[tuple[str, Case | ModuleCase, Job]] = []

    cases = default_cases(dtype, large=large, long=large and device.type == "cuda")
    for name, backend in BACKENDS.items():
        if selected(name, impls, exclude):
            reason = backend.available(device)
            for case in cases:
                jobs.append((name, case, reason or (
                    lambda n=name, c=case: _check_backend(n, c, device))))

    for mcase in module_cases(dtype):
        try:
            candidates = module_candidates(
                d_model=mcase.d_model, heads=mcase.heads, seq=mcase.seq, causal=mcase.causal,
                qkv_bias=mcase.qkv_bias, device=device, impls=impls, exclude=exclude,
            )
        except ImportError as exc:
            jobs.append(("module:*", mcase, f"module checks need {exc.name or exc}"))
            continue
        for label, build in candidates.items():
            job = build if isinstance(build, str) else (
                lambda lb=label, bd=build, c=mcase: check_module(lb, bd, c, device)
            )
            jobs.append((label, mcase, job))

    results: list[CaseResult] = []
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("verify", total=len(jobs))
        for label, case, job in jobs:
            bar.update(task, description=f"{label}  {case.name}")
            if isinstance(job, str):
                results.append(CaseResult(impl=label, case=case, skipped=job))
            else:
                try:
                    results.append(job())
                except Exception as exc:  # a broken implementation is a result, not a crash
                    results.append(_failure(label, case, exc))
            bar.advance(task)
            if on_result is not None:
                on_result(results, len(jobs))
    return results


# --------------------------------------------------------------------------- the report


def worst_err(result: CaseResult) -> float:
    """The larger of the output and gradient errors (NaN when neither was measured)."""
    measured = [e for e in (result.out_err, result.grad_err) if not math.isnan(e)]
    return max(measured) if measured else math.nan


def _cell(result: CaseResult) -> str:
    if result.skipped is not None:
        return "[yellow]skip[/]"
    err = worst_err(result)
    text = "error" if math.isnan(err) else f"{err:.1e}"
    if not result.case.grad:
        text += "ᶠ"
    return f"[green]{text}[/]" if result.passed else f"[bold red]✗ {text}[/]"


def _grid(title: str, rows: list[str], columns: list[str], cells: dict, row_header: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column(row_header, no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row, *(cells.get((row, column), "") for column in columns))
    return table


def print_report(results: list[CaseResult], console: Console | None = None) -> bool:
    """Print the verification tables; True when nothing failed.

    Functional backends: one row per case, one column per backend. Modules: one row per
    implementation, one column per module case. Each cell is max(output, gradient)
    relative error against the float64 oracle. Implementations skipped on every case
    (unavailable on this device) are listed under the tables with the reason instead of
    filling a column with "skip".
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    by_impl: dict[str, list[CaseResult]] = {}
    for r in results:
        by_impl.setdefault(r.impl, []).append(r)
    unavailable = {
        impl: rs[0].skipped
        for impl, rs in by_impl.items()
        if all(r.skipped is not None for r in rs) and len({r.skipped for r in rs}) == 1
    }
    shown = [r for r in results if r.impl not in unavailable]

    functional = [r for r in shown if isinstance(r.case, Case)]
    if functional:
        cases = list(dict.fromkeys(r.case.name for r in functional))
        impls = list(dict.fromkeys(r.impl for r in functional))
        cells = {(r.case.name, r.impl): _cell(r) for r in functional}
        console.print(_grid("attention(): relative error vs float64 oracle", cases, impls,
                            cells, "case"))
    modules = [r for r in shown if isinstance(r.case, ModuleCase)]
    if modules:
        cases = list(dict.fromkeys(r.case.name for r in modules))
        impls = list(dict.fromkeys(r.impl for r in modules))
        cells = {(r.impl, r.case.name): _cell(r) for r in modules}
        console.print(_grid("modules, one set of weights: relative error vs float64 oracle",
                            impls, cases, cells, "implementation"))
    console.print("[dim]cell: max(output, gradient) relative error ||x - ref|| / ||ref||; "
                  "the gradient of modules is dL/dx; ᶠ: forward only (no backward here)[/]")

    partial_skips = {(r.impl, r.skipped) for r in shown if r.skipped is not None}
    if unavailable or partial_skips:
        table = Table(title="skipped", title_justify="left", header_style="bold")
        table.add_column("implementation", no_wrap=True)
        table.add_column("reason")
        for impl, reason in unavailable.items():
            table.add_row(impl, f"every case: {escape(reason)}")
        for impl, reason in sorted(partial_skips):
            table.add_row(impl, f"some cases: {escape(reason)}")
        console.print(table)

    failed = [r for r in results if not r.passed]
    if failed:
        console.print("[bold red]failures[/] (errors: output, gradient, lse; tolerance)")
        for r in failed:
            errs = ", ".join(f"{e:.1e}" for e in (r.out_err, r.grad_err, r.lse_err))
            detail = "; ".join(r.errors)
            console.print(f"  [red]✗[/] {r.impl} · {r.case.name}: {errs}; tol {r.tol:.0e}"
                          + (f" — {escape(detail)}" if detail else ""), highlight=False)

    skipped = sum(r.skipped is not None for r in results)
    passed = len(results) - skipped - len(failed)
    style = "bold red" if failed else "bold green"
    console.print(f"[{style}]{len(results)} checks: {passed} passed, {len(failed)} failed, "
                  f"{skipped} skipped[/]")
    return not failed


def _number(x: float) -> float | str | None:
    # JSON has no NaN/inf: NaN (not measured) becomes null, inf (non-finite output) "inf".
    if math.isnan(x):
        return None
    return "inf" if math.isinf(x) else x


def write_json(results: list[CaseResult], path: str | Path, meta: dict) -> Path:
    """Write {"meta": ..., "results": [one row per check]} to `path` (for make_tables.py),
    through a temporary file, so that a run killed while writing leaves the last whole one."""
    rows = []
    for r in results:
        case = asdict(r.case)
        case["dtype"] = str(r.case.dtype).removeprefix("torch.")
        rows.append({
            "impl": r.impl,
            "kind": "module" if isinstance(r.case, ModuleCase) else "functional",
            "case": r.case.name,
            "case_fields": case,
            "out_err": _number(r.out_err),
            "grad_err": _number(r.grad_err),
            "lse_err": _number(r.lse_err),
            "tol": _number(r.tol),
            "skipped": r.skipped,
            "errors": r.errors,
            "passed": r.passed,
        })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str) + "\n")
    partial.replace(path)
    return path
