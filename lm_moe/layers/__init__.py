"""Feed-forward layers with one contract (`FeedForwardLayer`): `y, aux = layer(x, mask=None)`, x and y [B, T, D].

Every layer decodes incrementally, `y, state = layer.decode(x_new, state)`: the layers that mix
tokens over time carry a state, the others run on the new tokens alone. A layer of your own
subclasses `FeedForwardLayer`, checks its input with `check_layer_input` and returns a `LayerAux`.
"""

from lm_moe.layers.cumulative_soft_moe import CumulativeSoftMoE
from lm_moe.layers.expert_choice import ExpertChoiceMoE
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ACTIVATIONS, DenseFFN, ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.lagged_chunk_soft_moe import LaggedChunkSoftMoE
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.mixture_of_tokens import MixtureOfTokens
from lm_moe.layers.remoe import ReMoE
from lm_moe.layers.segment_merged_moe import SegmentMergedMoE
from lm_moe.layers.soft_moe import SoftMoE
from lm_moe.layers.sparse_moe import TopKMoE

__all__ = [
    "ACTIVATIONS",
    "CumulativeSoftMoE",
    "DenseFFN",
    "ExpertChoiceMoE",
    "ExpertWeights",
    "FeedForwardLayer",
    "LaggedChunkSoftMoE",
    "LayerAux",
    "MixtureOfTokens",
    "ReMoE",
    "SegmentMergedMoE",
    "SoftMoE",
    "TopKMoE",
    "check_layer_input",
]
