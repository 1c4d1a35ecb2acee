"""Parameter counts of a GPT: total, and active per token.

"Active parameters" is well defined for a dense FFN (all of them) and for top-k (the router and
the k chosen experts), but not for the Soft MoE variants: there every token's output mixes the
outputs of all experts, while its cost is a fraction of them. So the count used here is the one
that means "cost" for every layer alike:

    active = parameters outside the FFNs + the FFNs' multiply-adds with parameters per token

(a dense weight matrix used once per token costs one multiply-add per parameter, so this is the
plain parameter count for dense layers and the touched parameters for top-k). Each FFN layer
states its own rule in its `parameter_macs_per_token` (`FeedForwardLayer`).

Dispatch and combine (weighted sums of activations, no parameters) are left out: under 2% of an
FFN's cost at the configs' sizes.
"""

from lm_moe.models.gpt import GPT


def parameter_counts(model: GPT) -> dict[str, float]:
    """total: every parameter (the tied embedding once); ffn_macs_per_token: summed over blocks;
    active: parameters outside the FFNs + ffn_macs_per_token."""
    ffns = [block.ffn for block in model.blocks]
    total = model.num_parameters()
    macs = sum(ffn.parameter_macs_per_token() for ffn in ffns)
    ffn_parameters = sum(p.numel() for ffn in ffns for p in ffn.parameters())
    return {"params_total": total, "params_active": total - ffn_parameters + macs, "ffn_macs_per_token": macs}
