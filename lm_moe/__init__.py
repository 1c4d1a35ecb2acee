"""lm_moe: Mixture-of-Experts layers for ViT classifiers and GPT-style language models."""

__version__ = "0.1.0"
