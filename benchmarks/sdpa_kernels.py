"""Which CUDA kernels plain SDPA runs for a training step, on a GPU.

    python benchmarks/sdpa_kernels.py [--seq 8192]

`impl="auto"` tries plain `F.scaled_dot_product_attention` first on CUDA
(functional.AUTO_ORDER), on the premise that PyTorch itself picks cuDNN there. This
prints the CUDA kernels of one forward+backward (bf16, the `core` preset's sizes at one
S: attnkit.bench.preset_configs) per head dim and causality, under the profiler, after
two warm-up steps, so the premise can be checked on the machine at hand (cuDNN's are
named `cudnn_generated_*sdpa*`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from attnkit.bench import preset_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    for config in preset_configs("core", seq=args.seq):  # each head dim, causal or not
        causal = config.causal
        q, k, v = (torch.randn(config.batch, config.heads, config.seq, config.head_dim,
                               device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            torch.cuda.synchronize()
        names = sorted({event.name[:110] for event in prof.events()
                        if event.device_type.name == "CUDA"})
        print(f"D={config.head_dim} causal={causal}:", *names, sep="\n  ")


if __name__ == "__main__":
    main()
