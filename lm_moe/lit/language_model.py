"""The language-model training system: next-token loss + MoE aux losses, AdamW, metrics, logging."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchmetrics

from lm_moe.argument_checks import require_non_negative_int, require_positive_int
from lm_moe.layers.batch_groups import fill_groups, required_batch_multiple
from lm_moe.lit.fine_tuning import apply_part_settings, check_starting_weights
from lm_moe.lit.moe_module import MoEModule
from lm_moe.lit.moe_metrics import log_moe_stats
from lm_moe.lit.optim import check_adamw_settings
from lm_moe.models.generation import check_sampling, generate
from lm_moe.models.gpt import GPT


@dataclass
class SamplingSettings:
    """What `python -m lm_moe predict` generates: continuations of the first `prompt_tokens`
    tokens of each validation block (temperature 0 = greedy)."""

    prompt_tokens: int = 32
    new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        require_positive_int("sampling.prompt_tokens", self.prompt_tokens)
        require_non_negative_int("sampling.new_tokens", self.new_tokens)
        check_sampling(self.temperature, self.top_k, self.top_p, prefix="sampling.")


class LanguageModel(MoEModule):
    """Trains `GPT` on batches {"input_ids": [B, T], "targets": [B, T]}.

    loss = cross-entropy (fp32) + the sum of the MoE layers' aux losses. `vocab_size` and
    `block_size` come from the data module (the CLI links them); the model arguments are GPT's.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        sampling: SamplingSettings = SamplingSettings(),
        compile: bool = False,
        init_from: str | None = None,
        upcycle_from: str | None = None,
        upcycle_noise: float = 0.0,
        freeze: list[str] | None = None,
        lr_scale: dict[str, float] | None = None,
        **gpt_kwargs,
    ):
        """`gpt_kwargs` are GPT's arguments (n_layer, dim, ffn, moe_blocks, ...); the CLI shows them.
        `compile=True` runs the training forward through torch.compile.
        `init_from`, `upcycle_from`, `upcycle_noise`, `freeze`, `lr_scale`: see `MoEModule`."""
        super().__init__()
        check_adamw_settings(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        # Checkpoints store the settings as a dict; rebuild the dataclass when loading one.
        self.sampling = sampling if isinstance(sampling, SamplingSettings) else SamplingSettings(**sampling)
        self.model = GPT(vocab_size, block_size, **gpt_kwargs)
        check_starting_weights(init_from, upcycle_from, upcycle_noise)
        apply_part_settings(self.model, freeze, lr_scale)
        # Mixture of Tokens mixes groups of rows: a short last evaluation batch is filled up to whole groups.
        self.batch_multiple = required_batch_multiple(self.model)
        # torch.compile for the training and evaluation forward only: decoding with a growing cache
        # would recompile at every length. The weights stay where they are (checkpoints unchanged).
        self._forward = torch.compile(self.model.forward) if compile else self.model.forward
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()
        self.val_unigram = torchmetrics.MeanMetric()  # the baseline on the batches val/loss covers

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    def _loss(self, input_ids: torch.Tensor, targets: torch.Tensor):
        """Cross-entropy of targets [B, T] given input_ids [B', T], B' >= B: rows past B (filling
        groups, see fill_groups) only keep the real rows' company."""
        output = self._forward(input_ids)
        logits = output.logits[: targets.shape[0]].float()  # [B, T, V] cross-entropy in fp32 also under autocast
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return cross_entropy, output

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cross_entropy, output = self._loss(batch["input_ids"], batch["targets"])
        loss = cross_entropy + output.aux_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/cross_entropy": cross_entropy, "train/aux_loss": output.aux_loss}, sync_dist=True)
        log_moe_stats(self, output.layer_stats)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(self.val_loss, batch)
        log_probs = getattr(self.trainer.datamodule, "unigram_log_probs", None)  # [V], the train split's
        if log_probs is not None:
            targets = batch["targets"]  # [B, T]
            unigram = -log_probs.to(targets.device)[targets.long()].mean()
            self.val_unigram.update(unigram, weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        metrics = self._loss_and_perplexity(self.val_loss, "val")
        # torchmetrics already synchronised the values: sync_dist only tells Lightning so.
        self.log_dict({**metrics, "hp_metric": metrics["val/loss"]}, prog_bar=True, sync_dist=True)
        if self.val_unigram.update_count:  # none without the data module's token frequencies
            self.log("val/unigram_baseline", self.val_unigram.compute(), sync_dist=True)
            self.val_unigram.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(self.test_loss, batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._loss_and_perplexity(self.test_loss, "test"), sync_dist=True)

    def _accumulate(self, metric: torchmetrics.MeanMetric, batch: dict[str, torch.Tensor]) -> None:
        """Token-weighted mean cross-entropy over the epoch (synchronised across ranks)."""
        cross_entropy, _ = self._loss(fill_groups(batch["input_ids"], self.batch_multiple), batch["targets"])
        metric.update(cross_entropy, weight=batch["targets"].numel())

    @staticmethod
    def _loss_and_perplexity(metric: torchmetrics.MeanMetric, stage: str) -> dict[str, torch.Tensor]:
        loss = metric.compute()
        metric.reset()
        return {f"{stage}/loss": loss, f"{stage}/ppl": torch.exp(loss)}

    def check_predict_settings(self) -> None:
        """Refuse prompts and continuations that do not fit the context (the CLI asks before any data work)."""
        sampling = self.sampling
        if sampling.prompt_tokens + sampling.new_tokens > self.model.block_size:
            raise ValueError(
                f"sampling.prompt_tokens {sampling.prompt_tokens} + sampling.new_tokens {sampling.new_tokens} "
                f"exceed the model's block_size {self.model.block_size}"
            )

    def on_predict_start(self) -> None:
        self.check_predict_settings()
        self._sampling_generator = torch.Generator(device=self.device).manual_seed(self.sampling.seed)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        sampling = self.sampling
        prompt = batch["input_ids"][:, : sampling.prompt_tokens]  # [B, P]
        tokens = generate(
            self.model,
            prompt,
            sampling.new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generator=self._sampling_generator,
        )  # [B, P + new]
        return {"prompt_ids": prompt, "generated_ids": tokens[:, prompt.shape[1] :]}

