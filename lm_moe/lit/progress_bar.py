"""The training progress bar of runs set by their step count."""

from pytorch_lightning.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps towards `trainer.max_steps` when that ends
    the run. Lightning's own counts the batches of the current epoch against what is left of it,
    and shows "Epoch 0/-2" (max_epochs -1 means none) and, after a resume mid-epoch, "300/149"."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._by_steps() and self.trainer.max_epochs in (None, -1):
            return f"{f'Epoch {current_epoch}, steps':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The bar shows `batch_idx + 1`: given the step count instead, it counts optimizer steps.
        shown = trainer.global_step - 1 if self._by_steps() else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, shown)
