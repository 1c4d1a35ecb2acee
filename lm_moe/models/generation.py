"""Autoregressive sampling with the model's KV cache: one prefill of the prompt, then one token per step."""

import torch

from lm_moe.argument_checks import (
    require_non_negative_float,
    require_non_negative_int,
    require_number,
    require_positive_int,
)
from lm_moe.layers.batch_groups import fill_groups, required_batch_multiple
from lm_moe.models.gpt import GPT


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, prefix: str = "") -> None:
    """Refuse settings `sample_next` cannot use; `prefix` qualifies the names in the error."""
    require_non_negative_float(prefix + "temperature", temperature)
    if top_k is not None:
        require_positive_int(prefix + "top_k", top_k)
    if top_p is not None:
        require_number(prefix + "top_p", top_p, lambda p: 0 < p <= 1, "a number in (0, 1] or None")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row from logits [B, V] -> [B]. temperature 0 is greedy (top_k, top_p unused)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(dim=-1)  # [B, V]
        # Drop a token once the more likely ones already hold top_p of the mass (the first always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
        drop_sorted = mass_before >= top_p  # [B, V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V], vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


def generate(
    model: GPT,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Continue input_ids [B, T0] by up to max_new_tokens tokens -> [B, T0 + n], n <= max_new_tokens.

    The whole result must fit in the context: T0 + max_new_tokens <= model.block_size. With eos_id,
    a row that produced eos continues with eos, and generation stops once every row has produced it.
    Runs in inference mode and eval mode; the model's train/eval state is restored afterwards.
    A model that mixes rows in groups (Mixture of Tokens) decodes B rounded up to whole groups, the
    added rows copies of the first ones (see fill_groups); only the B real rows are returned.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T0] with T0 >= 1, got {tuple(input_ids.shape)}")
    require_non_negative_int("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    B, T0 = input_ids.shape
    if T0 + max_new_tokens > model.block_size:
        raise ValueError(
            f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds the model's block_size {model.block_size}"
        )

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if max_new_tokens == 0:
                return input_ids.clone()
            filled = fill_groups(input_ids, required_batch_multiple(model))  # [B', T0]
            tokens = [filled]
            cache = model.new_cache(filled.shape[0])
            logits = model(filled, cache=cache).logits[:, -1]  # [B', V]
            finished = torch.zeros(filled.shape[0], dtype=torch.bool, device=input_ids.device)  # [B']
            for step in range(max_new_tokens):
                next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # [B']
                if eos_id is not None:
                    next_ids = next_ids.masked_fill(finished, eos_id)
                    finished |= next_ids == eos_id
                tokens.append(next_ids[:, None])
                if step == max_new_tokens - 1 or (eos_id is not None and finished[:B].all()):
                    break
                logits = model(next_ids[:, None], cache=cache).logits[:, -1]  # [B', V]
            return torch.cat(tokens, dim=1)[:B]  # [B, T0 + n]
    finally:
        model.train(was_training)
