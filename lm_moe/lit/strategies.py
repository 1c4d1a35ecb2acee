"""Distributed strategies tuned to these models."""

from pathlib import Path

from pytorch_lightning.strategies import FSDPStrategy

from lm_moe.layers.block import TransformerBlock
from lm_moe.lit.safe_loading import require_safe_pickle


class BlockFSDPStrategy(FSDPStrategy):
    """FSDP that shards each transformer block as its own unit (the embeddings and the head form
    the outer unit), so only one block's full weights are gathered at a time. Other arguments
    are FSDPStrategy's (sharding_strategy, state_dict_type, activation_checkpointing_policy, ...)."""

    def __init__(self, **kwargs):
        if kwargs.get("auto_wrap_policy") is None:  # the CLI passes every argument, None included
            kwargs["auto_wrap_policy"] = {TransformerBlock}
        super().__init__(**kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        # FSDP unpickles a full state dict file itself, past the trainer's checkpoint IO (where
        # the CLI put the safe loading): the same check first.
        if Path(checkpoint_path).is_file():
            require_safe_pickle(checkpoint_path, getattr(self.checkpoint_io, "allow_unsafe_pickle", False))
        return super().load_checkpoint(checkpoint_path, weights_only)
