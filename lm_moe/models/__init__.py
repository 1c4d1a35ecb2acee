"""Models built from lm_moe layers; they take the FFN choice from their arguments and hold no training logic."""

from lm_moe.models.generation import generate, sample_next
from lm_moe.models.gpt import GPT, GPTCache, GPTOutput

__all__ = ["GPT", "GPTCache", "GPTOutput", "generate", "sample_next"]
