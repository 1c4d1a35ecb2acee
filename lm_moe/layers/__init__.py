"""Feed-forward layers with one contract: `y, aux = layer(x, mask=None)`, x and y [B, T, D]."""

from lm_moe.layers.ffn import ACTIVATIONS, DenseFFN, ExpertWeights
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.soft_moe import SoftMoE
from lm_moe.layers.sparse_moe import TopKMoE

__all__ = ["ACTIVATIONS", "DenseFFN", "ExpertWeights", "LayerAux", "SoftMoE", "TopKMoE"]
