"""What the two training systems (LanguageModel, ImageClassifier) share around their `model`: the
MoE layers' once-per-step updates, the checkpoint shape check, the fine-tuning report, AdamW with
its schedule, and gradient clipping that also holds under expert parallelism."""

import pytorch_lightning as pl

from lm_moe.layers.feed_forward_layer import end_of_step
from lm_moe.lit.checkpoints import require_matching_state
from lm_moe.lit.expert_parallel_strategy import clip_gradient_norm, sharded_layers
from lm_moe.lit.fine_tuning import report_trainable
from lm_moe.lit.optim import configure_adamw


class MoEModule(pl.LightningModule):
    """A LightningModule whose network is `self.model`, built by the subclass.

    The fine-tuning settings both subclasses take (lm_moe.lit.fine_tuning, docs/fine_tuning.md):
    `init_from`, a checkpoint file or export folder whose weights a new `fit` starts from (fresh
    optimizer, schedule and steps); `upcycle_from`, a dense model's checkpoint whose MLPs every
    expert starts as a copy of (lm_moe.lit.upcycling), with relative noise `upcycle_noise`;
    `freeze`, parts that do not train (experts, router, shared_experts, dense_ffn, attention,
    embeddings, norms, head, non_moe); `lr_scale`, a learning-rate multiplier per part.
    """

    def on_fit_start(self) -> None:
        report_trainable(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after all its micro-batches (and before clipping): sharded
        experts' gradients averaged over their replicas, then the layers' per-step updates."""
        end_of_step(self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning loads the weights: a clear error instead of a wall of missing keys.
        require_matching_state(checkpoint["state_dict"], self.state_dict())

    def configure_optimizers(self) -> dict:
        return configure_adamw(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except with sharded experts: the norm is the whole model's, so
        every rank scales by the same factor (a rank's own norm would part the replicas)."""
        if gradient_clip_val and sharded_layers(self.model):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: with sharded experts, "
                                 "gradients are clipped by norm only")
            clip_gradient_norm(self.model, gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
