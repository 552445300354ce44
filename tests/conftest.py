import os
import re

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# torch.compile over the backends is checked from torch 2.11 on (the GPU machine's 2.11, CI's
# 2.13). torch 2.5's dynamo cannot trace some of them in one graph (sdpa's kernel choice, a
# context manager; chunked's autograd.Function taking an AttentionCall), and eager calls
# there are what the package promises (run 50).
_TORCH = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
compile_checked = pytest.mark.skipif(
    _TORCH < (2, 11), reason=f"torch.compile paths are checked from torch 2.11, found "
                             f"{torch.__version__}")


def masks_past_the_threshold(seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (2, 2, 9, 16) and a general float32 (2, 2, 9, 12) mask, on DEVICE, whose
    entries below masks.HIDDEN_BELOW hide: row 0 of every (batch, head) wholly at -2.4e38
    (above bfloat16's lowest value, below the bound), row 1 at float32's lowest, row 2 at
    -inf; elsewhere random scores with a third of the keys at one of the three. Returns
    q, k, v, the mask and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    q, grad = (torch.randn(2, 2, 9, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, 12, 16, generator=gen) for _ in range(2))
    hides = torch.tensor([-2.4e38, torch.finfo(torch.float32).min, -torch.inf])
    mask = torch.randn(2, 2, 9, 12, generator=gen)
    some = torch.rand(2, 2, 9, 12, generator=gen) < 1 / 3
    mask[some] = hides[torch.randint(0, 3, (int(some.sum()),), generator=gen)]
    mask[:, :, :3] = hides[:, None]
    return tuple(t.to(DEVICE) for t in (q, k, v, mask, grad))


def skip_if_unavailable(name: str, device: torch.device = DEVICE) -> None:
    """Skips the test where backend `name` cannot run on `device` at all, saying why."""
    from attnkit import backends

    reason = backends.get(name).available(device)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


def assert_dropout_only_in_training(m: torch.nn.Module, plain: torch.nn.Module,
                                    x: torch.Tensor) -> None:
    """m (dropout on) equals `plain` (same weights, no dropout) in eval; in training it
    differs from it and repeats itself under the same seed."""
    from attnkit.verify import rel_err

    m.eval()
    torch.testing.assert_close(m(x), plain(x))
    m.train()
    torch.manual_seed(0)
    first = m(x)
    torch.manual_seed(0)
    torch.testing.assert_close(m(x), first)
    assert rel_err(first, plain(x)) > 1e-3


def benchmark_script(name: str, monkeypatch):
    """benchmarks/NAME.py as a module (the folder on sys.path for the test only)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
