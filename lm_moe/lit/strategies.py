"""Distributed strategies tuned to these models."""

from pytorch_lightning.strategies import FSDPStrategy

from lm_moe.layers.block import TransformerBlock


class BlockFSDPStrategy(FSDPStrategy):
    """FSDP that shards each transformer block as its own unit (the embeddings and the head form
    the outer unit), so only one block's full weights are gathered at a time. Other arguments
    are FSDPStrategy's (sharding_strategy, state_dict_type, activation_checkpointing_policy, ...)."""

    def __init__(self, **kwargs):
        if kwargs.get("auto_wrap_policy") is None:  # the CLI passes every argument, None included
            kwargs["auto_wrap_policy"] = {TransformerBlock}
        super().__init__(**kwargs)
