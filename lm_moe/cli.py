"""`python -m lm_moe {fit,validate,test,predict} -c config.yaml`: the Lightning CLI."""

from pytorch_lightning.cli import LightningCLI

from lm_moe.data.text import TextDataModule
from lm_moe.lit.language_model import LanguageModel


class LanguageModelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Given once, in the data section: the tokenizer fixes the vocabulary, the data the context.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size", apply_on="instantiate")


def main(args=None) -> LanguageModelCLI:
    return LanguageModelCLI(
        LanguageModel,
        TextDataModule,
        args=args,
        auto_configure_optimizers=False,  # LanguageModel brings its own AdamW + schedule
        save_config_kwargs={"overwrite": True},
    )
