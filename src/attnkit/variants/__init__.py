"""The textbook module variants: the notebook's nine forms and the ttnn tutorial's two.

Every class takes `(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *,
causal=True)` and `forward(x (B, S, d_in), attn_mask=None) -> (B, S, d_out)`, with the mask
as in `attnkit.attention` (bool True = may attend, or additive; broadcastable to
(B, H, S, S)). All compute the same function as `attnkit.MultiHeadAttention` on the same
weights (`attnkit.weights.convert` moves them); the notebook's bugs are not copied. One
exception, kept so that they are measured as their seeds wrote them: a floating mask is
added as given, so an entry below masks.HIDDEN_BELOW does not hide its key by the rule
alone (on a row with a key to see it weighs 0 all the same; a row it covers whole gets
whatever the variant's kernel gives).
Sequences longer than context_length work everywhere (see `_common`).
"""

from __future__ import annotations

from torch import nn

from attnkit.variants.flex import FlexAttention
from attnkit.variants.sdpa import SDPA, SDPAExplicitMask
from attnkit.variants.textbook import CausalHead, CombinedQKV, Einsum, HeadWrapper, SeparateQKV
from attnkit.variants.torch_mha import TorchMHA, TorchMHANoWeights
from attnkit.variants.ttnn import TTNNFused, TTNNSixOp

__all__ = [
    "REGISTRY",
    "SDPA",
    "CausalHead",
    "CombinedQKV",
    "Einsum",
    "FlexAttention",
    "HeadWrapper",
    "SDPAExplicitMask",
    "SeparateQKV",
    "TTNNFused",
    "TTNNSixOp",
    "TorchMHA",
    "TorchMHANoWeights",
]

# The notebook's order (1-9), then the tutorial's two forms.
REGISTRY: dict[str, type[nn.Module]] = {
    "wrapper": HeadWrapper,
    "separate_qkv": SeparateQKV,
    "combined_qkv": CombinedQKV,
    "einsum": Einsum,
    "sdpa": SDPA,
    "sdpa_mask": SDPAExplicitMask,
    "torch_mha": TorchMHA,
    "torch_mha_noweights": TorchMHANoWeights,
    "flex": FlexAttention,
    "ttnn_six_op": TTNNSixOp,
    "ttnn_fused": TTNNFused,
}
