"""Feed-forward layers with one contract (`FeedForwardLayer`): `y, aux = layer(x, mask=None)`, x and y [B, T, D].

Causal layers that mix tokens also decode incrementally: `y, state = layer.decode(x_new, state)`.
"""

from lm_moe.layers.cumulative_soft_moe import CumulativeSoftMoE
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ACTIVATIONS, DenseFFN, ExpertWeights
from lm_moe.layers.lagged_chunk_soft_moe import LaggedChunkSoftMoE
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.mixture_of_tokens import MixtureOfTokens
from lm_moe.layers.segment_merged_moe import SegmentMergedMoE
from lm_moe.layers.soft_moe import SoftMoE
from lm_moe.layers.sparse_moe import TopKMoE

__all__ = [
    "ACTIVATIONS",
    "CumulativeSoftMoE",
    "DenseFFN",
    "ExpertWeights",
    "FeedForwardLayer",
    "LaggedChunkSoftMoE",
    "LayerAux",
    "MixtureOfTokens",
    "SegmentMergedMoE",
    "SoftMoE",
    "TopKMoE",
]
