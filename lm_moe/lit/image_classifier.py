"""The image-classification training system: cross-entropy + MoE aux losses, AdamW, accuracy, logging."""

import torch
import torch.nn.functional as F
import torchmetrics
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger

from lm_moe.argument_checks import require_fraction, require_non_negative_int
from lm_moe.lit.fine_tuning import apply_part_settings, check_starting_weights
from lm_moe.lit.moe_module import MoEModule
from lm_moe.lit.moe_metrics import log_moe_stats
from lm_moe.lit.optim import check_adamw_settings
from lm_moe.models.vit import ViT

TOP_K = (1, 5)  # accuracies reported: val/acc_top1, val/acc_top5 (top-5 only with more than 5 classes)


class ImageClassifier(MoEModule):
    """Trains `ViT` on batches {"images": [B, C, S, S], "labels": [B]}.

    loss = cross-entropy (fp32, optional label smoothing) + the sum of the MoE layers' aux losses.
    `num_classes`, `image_size` and `channels` come from the data module (the CLI links them);
    the other model arguments are ViT's. Logged: train/loss, train/cross_entropy, train/aux_loss,
    train/acc_top1, val/loss (unsmoothed cross-entropy), val/acc_top1, val/acc_top5, test/* alike,
    hp_metric = val/acc_top1, the MoE stats under moe/block_<i>/, and a figure of
    `logged_images` validation images with their predicted and true classes (val/predictions).
    `predict` classifies the test images (ImagePredictionWriter writes predictions.jsonl).
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        channels: int,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        label_smoothing: float = 0.0,
        logged_images: int = 8,
        init_from: str | None = None,
        upcycle_from: str | None = None,
        upcycle_noise: float = 0.0,
        freeze: list[str] | None = None,
        lr_scale: dict[str, float] | None = None,
        **vit_kwargs,
    ):
        """`vit_kwargs` are ViT's arguments (patch_size, dim, depth, ffn, moe_blocks, ...); the CLI shows them.
        `init_from`, `upcycle_from`, `upcycle_noise`, `freeze`, `lr_scale`: see `MoEModule`."""
        super().__init__()
        check_adamw_settings(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
        require_fraction("label_smoothing", label_smoothing)
        require_non_negative_int("logged_images", logged_images)
        self.save_hyperparameters()
        self.model = ViT(num_classes, image_size, channels, **vit_kwargs)
        check_starting_weights(init_from, upcycle_from, upcycle_noise)
        apply_part_settings(self.model, freeze, lr_scale)
        self.accuracy_k = [k for k in TOP_K if k == 1 or k < num_classes]
        self.stage_metrics = torch.nn.ModuleDict({stage: self._metrics(num_classes) for stage in ("val", "test")})
        self._shown: dict[str, torch.Tensor] | None = None  # validation images kept for the figure

    def _metrics(self, num_classes: int) -> torchmetrics.MetricCollection:
        accuracies = {
            f"acc_top{k}": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for k in self.accuracy_k
        }
        return torchmetrics.MetricCollection({"loss": torchmetrics.MeanMetric(), **accuracies})

    def forward(self, images: torch.Tensor):
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self.model(batch["images"])
        logits = output.logits.float()  # [B, K] cross-entropy in fp32 also under autocast
        cross_entropy = F.cross_entropy(logits, batch["labels"], label_smoothing=self.hparams.label_smoothing)
        loss = cross_entropy + output.aux_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/cross_entropy", cross_entropy)
        self.log("train/aux_loss", output.aux_loss)
        self.log("train/acc_top1", (logits.argmax(dim=-1) == batch["labels"]).float().mean())
        log_moe_stats(self, output.layer_stats)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate("val", batch)
        if batch_idx == 0 and self.hparams.logged_images:
            n = self.hparams.logged_images
            self._shown = {"images": batch["images"][:n].cpu(), "labels": batch["labels"][:n].cpu(),
                           "predicted": logits[:n].argmax(dim=-1).cpu()}

    def on_validation_epoch_end(self) -> None:
        metrics = self._compute("val")
        self.log_dict({**metrics, "hp_metric": metrics["val/acc_top1"]}, prog_bar=True)
        if self._shown is not None and not self.trainer.sanity_checking:
            self._log_figure("val/predictions", self._shown)
        self._shown = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._compute("test"))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """The most probable classes of each image (up to 5) with their probabilities, and its true label."""
        probabilities = self.model(batch["images"]).logits.float().softmax(dim=-1)  # [B, K]
        top = probabilities.topk(min(max(TOP_K), probabilities.shape[-1]), dim=-1)  # [B, k] each
        return {"top_classes": top.indices, "top_probabilities": top.values, "labels": batch["labels"]}

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Update the stage's image-weighted mean cross-entropy (no smoothing) and accuracies; return the logits."""
        logits = self.model(batch["images"]).logits.float()  # [B, K]
        labels = batch["labels"]
        metrics = self.stage_metrics[stage]
        metrics["loss"].update(F.cross_entropy(logits, labels), weight=labels.numel())
        for k in self.accuracy_k:
            metrics[f"acc_top{k}"].update(logits, labels)
        return logits

    def _compute(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = self.stage_metrics[stage]
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        return values


    def _tensorboards(self):
        return [logger.experiment for logger in self.loggers if isinstance(logger, TensorBoardLogger)]

    def _log_figure(self, tag: str, shown: dict[str, torch.Tensor]) -> None:
        experiments = self._tensorboards()
        if experiments:
            figure = prediction_figure(shown, getattr(self.trainer.datamodule, "class_names", None))
            for experiment in experiments:
                experiment.add_figure(tag, figure, global_step=self.global_step, close=False)


def prediction_figure(shown: dict[str, torch.Tensor], class_names: list[str] | None = None, columns: int = 4) -> Figure:
    """A grid of images titled "predicted / true" (wrong ones in red). Each image is min-max scaled
    for display, so normalised inputs show as they were."""
    n = len(shown["labels"])
    rows = -(-n // columns)
    figure = Figure(figsize=(2 * columns, 2.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    label = (lambda c: class_names[c]) if class_names else str
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = shown["images"][i].float()  # [C, S, S]
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
        predicted, true = int(shown["predicted"][i]), int(shown["labels"][i])
        ax.set_title(f"{label(predicted)} / {label(true)}", color="black" if predicted == true else "red", fontsize=10)
    figure.suptitle("predicted / true")
    figure.tight_layout()
    return figure
