"""Run the Triton kernels, forward and backward, on a few awkward shapes: for memcheck.
On an sm_90 GPU, also the Gluon kernels, forced onto shapes shorter than their routes
(--gluon-only: those alone).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 benchmarks/memcheck.py

Caching is turned off so that every tensor is its own allocation and a read past its end
is caught instead of landing in the allocator's pool. The shapes are odd on purpose (tile
edges in every dimension), and each one also checks the result against the oracle, so a
clean run says "no bad access" and "right answer" together. Autotuning is left on: every
candidate config is launched, so every one is checked.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from attnkit import attention
from attnkit.verify import Case, check

# bfloat16 on a GPU; float16 where the script is tried under Triton's CPU interpreter,
# which cannot multiply bfloat16.
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float16
BASE = Case(dtype=DTYPE, batch=2, heads_q=4, heads_kv=2)
CASES = [
    replace(BASE, seq_q=17, seq_kv=65, head_dim=80, causal=True, key_lengths=True,
            dead_rows=True),
    replace(BASE, seq_q=1, seq_kv=300, head_dim=128, mask="additive"),
    replace(BASE, seq_q=130, seq_kv=130, head_dim=256, window=(5, 0), causal=True),
    replace(BASE, seq_q=33, seq_kv=33, head_dim=16, head_dim_v=32, mask="bool",
            dead_rows=True),
    replace(BASE, seq_q=1000, seq_kv=1000, head_dim=64, mask="padding", heads_kv=1),
]


def with_dropout(device: str, heads: tuple[int, int] = (3, 3), seq: tuple[int, int] = (70, 70),
                 head_dim: int = 48, causal: bool = True, key_lengths=None) -> None:
    """Dropout has no oracle to check against; run it forward and backward for memcheck,
    on B=2 and heads (query, key/value) heads, seq (Sq, Skv)."""
    q = torch.randn(2, heads[0], seq[0], head_dim, device=device, dtype=DTYPE,
                    requires_grad=True)
    k, v = (torch.randn(2, heads[1], seq[1], head_dim, device=device, dtype=DTYPE,
                        requires_grad=True) for _ in range(2))
    lengths = None if key_lengths is None else torch.tensor(key_lengths, device=device)
    out = attention(q, k, v, causal=causal, key_lengths=lengths, dropout_p=0.2,
                    impl="triton")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


# The Gluon kernels for Hopper (hopper_forward, hopper_backward), all three forced on for
# every call that they cover (their routes start at 256-1536 queries or keys): D=64 and
# 128, causal or not, key lengths with a zero one, grouped heads, lengths that end
# mid-block; D=256 (wide_dkdv_kernel for dK/dV); and head dims on a wider power of two's
# tiles (48, 96, 192: TMA boxes wider than the rows). With dropout, main() runs its own calls.
GLUON_CASES = [
    replace(BASE, seq_q=300, seq_kv=700, head_dim=128, key_lengths=True, dead_rows=True),
    replace(BASE, seq_q=1000, seq_kv=1000, head_dim=128, causal=True),
    replace(BASE, seq_q=700, seq_kv=17, head_dim=64, causal=True, key_lengths=True),
    replace(BASE, seq_q=17, seq_kv=1000, head_dim=64, heads_kv=1),
    replace(BASE, seq_q=300, seq_kv=1000, head_dim=256, causal=True, key_lengths=True,
            dead_rows=True),
    replace(BASE, seq_q=300, seq_kv=700, head_dim=96, key_lengths=True, dead_rows=True),
    replace(BASE, seq_q=1000, seq_kv=300, head_dim=192, causal=True, heads_kv=1),
    replace(BASE, seq_q=17, seq_kv=1000, head_dim=48),
]


def _replace(obj, name: str, value) -> None:
    """setattr for an attribute obj already has: one renamed fails here, as under
    pytest's monkeypatch.setattr, instead of leaving the old one in use."""
    getattr(obj, name)
    setattr(obj, name, value)


def watch_gluon_launches(set_attr=_replace) -> list[tuple[str, object]]:
    """The Gluon launch functions, each wrapped (through set_attr) to note (its name, the
    launcher it was given) in the returned list before it runs."""
    from attnkit.backends import hopper_backward as hb
    from attnkit.backends import hopper_forward as hf

    launched: list[tuple[str, object]] = []

    def watched(name, launch):
        def run(*args, **kwargs):
            launched.append((name, kwargs.get("launcher")))
            launch(*args, **kwargs)
        return run

    for module, name in ((hf, "launch"), (hb, "launch_dq"), (hb, "launch_dkdv")):
        set_attr(module, name, watched(name, getattr(module, name)))
    return launched


def force_gluon_kernels(set_attr=_replace) -> list[tuple[str, object]]:
    """Route every call the Gluon kernels cover to all three of them, whatever its length
    (through set_attr: a test passes monkeypatch.setattr to undo it); returns
    watch_gluon_launches's list."""
    from attnkit.backends import fused_triton as ft

    launched = watch_gluon_launches(set_attr)
    # every (head dim, causal) that either backward kernel has a route for, from length 1
    everywhere = {key: (1, 1) for key in ft._HOPPER_DKDV_REACH | ft._HOPPER_DQ_REACH}
    # each route table's key takes the config of its shortest route, from length 1
    for table in ("_HOPPER_ROUTES", "_HOPPER_ALL_SEEN_ROUTES"):
        set_attr(ft, table, {key: (((1, 1), routes[-1][1]),)
                             for key, routes in getattr(ft, table).items()})
    set_attr(ft, "_HOPPER_DKDV_REACH", everywhere)
    set_attr(ft, "_HOPPER_DQ_REACH", everywhere)
    # the Gluon forward runs unsplit calls only
    set_attr(ft, "_kv_splits", lambda call, packed: 1)
    return launched


def made(launched: list[tuple[str, object]]) -> list[str]:
    """The names in watch_gluon_launches's list of the launches that ran a kernel, not
    those that a call's first run only collects to count its builds (fused_triton's
    _stand_in_backward, through a _Collector)."""
    from attnkit.backends import fused_triton as ft

    return [name for name, launcher in launched if not isinstance(launcher, ft._Collector)]


def launch_counts(launched: list[tuple[str, object]], names: tuple[str, ...]) -> dict[str, int]:
    """How many of watch_gluon_launches's launches of each of `names` ran a kernel (made)."""
    ran = made(launched)
    return {name: ran.count(name) for name in names}


def run_cases(cases: list[Case], device: str) -> int:
    """Each case three times (from the third launch of a specialization on, a kernel is
    launched straight through its compiled form, fused_triton._FAST_LAUNCH); returns how
    many failed."""
    failed = 0
    for case in [case for case in cases for _ in range(3)]:
        result = check("triton", case, device)
        ok = result.skipped is None and result.passed
        detail = result.skipped or (f"out {result.out_err:.1e}  grads {result.grad_err:.1e}  "
                                    f"(tolerance {result.tol:.0e})")
        print(f"{'ok  ' if ok else 'FAIL'} {case.name}: {detail}", flush=True)
        failed += not ok
    return failed


def main(gluon_only: bool = False) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    failed = 0
    if not gluon_only:
        failed += run_cases(CASES, device)
        with_dropout(device)
        print("ok   dropout forward and backward ran", flush=True)
    from attnkit.backends import hopper_forward as hf

    if device == "cuda" and torch.cuda.get_device_capability() == (9, 0) and hf.available():
        launched = force_gluon_kernels()
        failed += run_cases(GLUON_CASES, device)
        counts = launch_counts(launched, ("launch", "launch_dq", "launch_dkdv"))
        print(f"Gluon launches: {counts}", flush=True)
        # each of the three kernels three times a case
        failed += any(count != 3 * len(GLUON_CASES) for count in counts.values())
        # with dropout: grouped heads, a batch that sees no key, lengths mid-block; D=256
        # (wide_dkdv_kernel); D=96 on 128 columns
        launched.clear()
        dropout_calls = [((4, 2), (300, 700), 128, True, [700, 0]),
                         ((4, 4), (1000, 1000), 64, False),
                         ((4, 2), (300, 700), 256, True, [700, 0]),
                         ((4, 2), (300, 700), 96, False, [700, 3])]
        for call in dropout_calls:
            with_dropout(device, *call)
        counts = launch_counts(launched, ("launch_dq", "launch_dkdv"))
        print(f"Gluon launches with dropout: {counts}", flush=True)
        # each backward kernel once a call
        failed += any(count != len(dropout_calls) for count in counts.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(gluon_only="--gluon-only" in sys.argv[1:]))
