"""Two-layer feed-forward networks: the stacked weights of E experts, and the dense FFN (E = 1).

Experts live in two stacked tensors, never in a list of modules, so that all experts run in one
batched or grouped matmul and every expert always receives a gradient.

    w_in  [E, D, H]   (gelu)   or  [E, D, 2H]  (swiglu: gate and up projections side by side)
    w_out [E, H, D]
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_choice, require_fraction, require_positive_int
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.numerics import compute_dtype

ACTIVATIONS = ("gelu", "swiglu")

# Dtypes the grouped-matmul kernel accepts; anything else (float64 in tests), and widths whose
# rows are not a multiple of 16 bytes long, run one matmul per expert.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# On the CPU, bf16 and fp16 matmuls run in oneDNN, which builds a kernel for every new shape (about
# 2 ms each, then cached): with a new number of tokens per expert at every step, the grouped matmul
# would build one per expert and step. Padding each expert's rows to a multiple of this keeps the
# shapes to a few dozen, all built in the first steps, for about 6% more expert FLOPs with 8 experts.
CPU_LOW_PRECISION_ROW_MULTIPLE = 64


def default_hidden_dim(dim: int, activation: str) -> int:
    """The dense MLP width with the FLOPs of a 4 * dim GELU MLP: 4 * dim for GELU; for SwiGLU,
    whose three matrices cost 1.5x as much per unit of width, 8 * dim / 3 rounded up to a
    multiple of 16 (688 for dim 256)."""
    if activation == "swiglu":
        return math.ceil(8 * dim / 3 / 16) * 16
    return 4 * dim


def _grouped_mm_usable(x: torch.Tensor, widths: tuple[int, ...]) -> bool:
    """Whether the grouped-matmul kernel takes x and expert weights whose rows are `widths` long."""
    if not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if any(width * x.element_size() % 16 for width in widths):  # the kernel wants 16-byte aligned strides
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # the compiler's shape rule wants bf16
        return False
    if x.device.type == "cuda":  # the CUDA kernel needs bf16 on compute capability >= 8.0
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the grouped-matmul backward
    rejects expanded (stride 0) gradients, such as the one `y.sum().backward()` sends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ExpertWeights(nn.Module):
    """E independent two-layer FFN experts `w_out(act(w_in x))` held as stacked weight tensors.

    init_scale: each weight starts this many times larger than in one FFN (here and in the
        models' inits). A layer that runs a convex mix of its experts' weights sets sqrt(E): the
        mix of E independent draws shrinks by sqrt(E) at even weights, and so starts at the scale
        of one FFN instead of 1/sqrt(E) of it (for both matrices: 1/E of the output).
    dropout: in training, dropout on the hidden activations (the MoE layers' `expert_dropout`:
        sparse models overfit sooner than dense ones, and ST-MoE drops more inside the experts
        than elsewhere).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu", init_scale: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        self.init_scale = init_scale
        self.dropout = require_fraction("expert_dropout", dropout)
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.dim = require_positive_int("dim", dim)
        self.hidden_dim = require_positive_int("hidden_dim", hidden_dim)
        require_choice("activation", activation, ACTIVATIONS)
        self.activation = activation
        in_width = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    @property
    def parameters_per_expert(self) -> int:
        """The parameters of one expert: its rows of w_in and w_out."""
        return (self.w_in.numel() + self.w_out.numel()) // self.num_experts

    def reset_parameters(self) -> None:
        # The bounds nn.Linear uses: uniform in +-1/sqrt(fan_in), times init_scale.
        for weight, fan_in in ((self.w_in, self.dim), (self.w_out, self.hidden_dim)):
            bound = self.init_scale / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)

    @torch.no_grad()
    def copy_from(self, source: "ExpertWeights", noise: float = 0.0) -> None:
        """Make every expert a copy of `source`'s one expert (sparse upcycling), each copy with
        Gaussian noise of `noise` times the standard deviation of each source matrix added. The
        widths and activation must match: a ValueError says which differ."""
        if (source.num_experts, source.dim, source.hidden_dim, source.activation) != (1, self.dim, self.hidden_dim,
                                                                                      self.activation):
            raise ValueError(f"the dense MLP ({source.activation}, width {source.hidden_dim}, dim {source.dim}) does not "
                             f"fit experts of {self.activation}, width {self.hidden_dim}, dim {self.dim}")
        for weight, trained in ((self.w_in, source.w_in), (self.w_out, source.w_out)):
            weight.copy_(trained.expand_as(weight))
            if noise:
                weight.add_(torch.randn_like(weight) * (noise * trained.std()))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The nonlinearity between w_in and w_out, then the dropout: h [..., H or 2H] -> [..., H]."""
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its own rows: x [E, n, D] -> [E, n, D]."""
        h = self.activate(torch.bmm(x, self.w_in))  # [E, n, H]
        return torch.bmm(h, self.w_out)  # [E, n, D]

    def forward_grouped(self, x: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, `rows_per_expert[e]` of them for expert e: x [M, D] -> [M, D]."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        if _grouped_mm_usable(x, (self.dim, self.w_in.shape[-1], self.hidden_dim)):
            if x.device.type == "cpu" and dtype != torch.float32 and not torch.compiler.is_compiling():
                return self._grouped_in_padded_groups(x, rows_per_expert)
            return self._grouped(x, rows_per_expert)
        pieces = x.split(rows_per_expert.tolist())
        outputs = [
            self.activate(piece @ self.w_in[e].to(dtype)) @ self.w_out[e].to(dtype)
            for e, piece in enumerate(pieces)
        ]
        return torch.cat(outputs)  # [M, D]

    def _grouped(self, x: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        """`forward_grouped` as two grouped matmuls: x [M, D] in the compute dtype -> [M, D]."""
        offsets = rows_per_expert.cumsum(0).to(torch.int32)  # [E], end of each expert's rows
        h = self.activate(F.grouped_mm(x, self.w_in.to(x.dtype), offs=offsets))  # [M, H]
        return _ContiguousGrad.apply(F.grouped_mm(h, self.w_out.to(x.dtype), offs=offsets))  # [M, D]

    def _grouped_in_padded_groups(self, x: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        """`_grouped` with every expert's rows padded with zeros to a multiple of
        CPU_LOW_PRECISION_ROW_MULTIPLE: x [M, D] -> [M, D]. Zero rows add nothing to the weight
        gradients, and their outputs are dropped."""
        M, D = x.shape
        multiple = CPU_LOW_PRECISION_ROW_MULTIPLE
        padded_rows = (rows_per_expert + multiple - 1) // multiple * multiple  # [E]
        # How far each expert's rows move: the padded start of its group minus the unpadded one.
        shift = (padded_rows.cumsum(0) - padded_rows) - (rows_per_expert.cumsum(0) - rows_per_expert)  # [E]
        positions = torch.arange(M, device=x.device) + shift.repeat_interleave(rows_per_expert, output_size=M)  # [M]
        padded = x.new_zeros(int(padded_rows.sum()), D).index_copy(0, positions, x)  # [M', D]
        return self._grouped(padded, padded_rows).index_select(0, positions)  # [M, D]


class DenseFFN(FeedForwardLayer):
    """The dense MLP baseline with the MoE layer contract: x [B, T, D] -> (y [B, T, D], LayerAux)."""

    is_causal = True  # per token

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        self.expert = ExpertWeights(1, dim, hidden_dim, activation)

    def parameter_parts(self) -> dict[str, str]:
        return {name: "dense_ffn" for name, _ in self.named_parameters()}

    def upcycle_from_dense(self, dense: "ExpertWeights", noise: float = 0.0) -> None:
        """A dense block of an upcycled model keeps the trained MLP as it is."""
        self.expert.copy_from(dense)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        """`mask` [B, T] (True = real token): padded positions output 0, as in every MoE layer."""
        check_layer_input(x, mask, self.expert.dim)
        y = self.expert.forward_batched(x.reshape(1, -1, x.shape[-1])).reshape(x.shape)  # [B, T, D]
        if mask is not None:
            y = y * mask.unsqueeze(-1)
        return y, LayerAux.empty(x)

    def parameter_macs_per_token(self) -> float:
        """Every parameter once per token."""
        return self.expert.parameters_per_expert
