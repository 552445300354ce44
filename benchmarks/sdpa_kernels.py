"""Which CUDA kernels plain SDPA runs for a training step, on a GPU.

    python benchmarks/sdpa_kernels.py [--seq 8192]

`impl="auto"` tries plain `F.scaled_dot_product_attention` first on CUDA
(functional.AUTO_ORDER), on the premise that PyTorch itself picks cuDNN there. This
prints the CUDA kernels of one forward+backward (bf16, B*S = 16k tokens, 2048 // D
heads) per head dim and causality, under the profiler, after two warm-up steps, so the
premise can be checked on the machine at hand (cuDNN's are named `cudnn_generated_*sdpa*`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    batch = max(1, 16384 // args.seq)
    for head_dim in (64, 128):
        for causal in (False, True):
            q, k, v = (torch.randn(batch, 2048 // head_dim, args.seq, head_dim, device="cuda",
                                   dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            for _ in range(2):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
                torch.cuda.synchronize()
            names = sorted({event.name[:110] for event in prof.events()
                            if event.device_type.name == "CUDA"})
            print(f"D={head_dim} causal={causal}:", *names, sep="\n  ")


if __name__ == "__main__":
    main()
