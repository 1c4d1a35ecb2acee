"""Inference speed of one model: prefill latency and cached decoding tokens/s of a language model,
images/s of an image classifier, and the peak memory of each.

Every measurement runs in eval mode under `torch.inference_mode()`, in fp32 or under bf16
autocast (the weights stay fp32, as in mixed-precision training). A repeat of a decoding
measurement is: a fresh cache, one prefill of the prompt (timed), then `new_tokens` greedy
decoding steps of one token each (timed together); the first `warmup` repeats are discarded and
the medians of the others reported. Memory is measured on one more, untimed run (also a warm-up).
A repeat needs a fresh prefill (decoding fills the cache), so the timing loop is written out here
rather than run through torch.utils.benchmark, whose statements must be repeatable as they are.
"""

import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lm_moe.layers.attention import KVCache
from lm_moe.layers.block import BlockCache
from lm_moe.models.generation import sample_next
from lm_moe.models.gpt import GPT, GPTCache
from lm_moe.profiling.memory import peak_memory_mb, tensor_mb

DTYPES = ("fp32", "bf16")


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16: autocast on the device (CPU or CUDA); fp32: no autocast."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def round_up(batch: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= batch (Mixture of Tokens decodes groups)."""
    return math.ceil(batch / multiple) * multiple


def decoding_cache(model: GPT, batch: int, length: int) -> GPTCache:
    """An empty cache for `length` positions. `model.new_cache` sizes its KV buffers for block_size,
    which would make the measured memory depend on the longest context of the grid, not this one."""
    return GPTCache(batch, [BlockCache(KVCache(length)) for _ in model.blocks])


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _check_repeats(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")


@dataclass
class DecodeResult:
    batch: int
    context: int  # prompt tokens of the prefill
    new_tokens: int  # decoding steps after it
    prefill_ms: float  # median time of the prefill (batch x context tokens)
    decode_ms_per_step: float  # median time of one decoding step (one token for each of the batch)
    decode_tokens_per_s: float  # batch / decode_ms_per_step
    peak_mb: float | None  # peak memory torch allocated during prefill + decoding (weights excluded)
    cache_mb: float | None  # memory the cache holds after decoding: KV buffers and FFN decode states


class Decoder:
    """One prefill and `new_tokens` cached decoding steps of `model` on a fixed random prompt."""

    def __init__(self, model: GPT, batch: int, context: int, new_tokens: int, device: torch.device, dtype: str):
        if context < 1 or new_tokens < 1:
            raise ValueError(f"context and new_tokens must be >= 1, got {context} and {new_tokens}")
        if context + new_tokens > model.block_size:
            raise ValueError(
                f"context {context} + new tokens {new_tokens} exceed the model's block_size {model.block_size}"
            )
        self.model, self.device, self.dtype = model, device, dtype
        self.new_tokens = new_tokens
        generator = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, model.vocab_size, (batch, context), generator=generator).to(device)  # [B, L]
        self.cache: GPTCache | None = None
        self._next_ids: torch.Tensor | None = None

    def prefill(self) -> None:
        self.cache = decoding_cache(self.model, self.prompt.shape[0], self.prompt.shape[1] + self.new_tokens)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.model(self.prompt, cache=self.cache).logits[:, -1]  # [B, V]
            self._next_ids = sample_next(logits, temperature=0)[:, None]  # [B, 1] greedy

    def decode(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for _ in range(self.new_tokens):
                logits = self.model(self._next_ids, cache=self.cache).logits[:, -1]  # [B, V]
                self._next_ids = sample_next(logits, temperature=0)[:, None]  # [B, 1]

    def run(self) -> None:
        self.prefill()
        self.decode()


def measure_decoding(model: GPT, batch: int, context: int, new_tokens: int, device: torch.device,
                     dtype: str = "fp32", warmup: int = 1, repeats: int = 3, memory: bool = True) -> DecodeResult:
    """Prefill latency and cached decoding speed of `model` (already on `device`, in eval mode), and
    with `memory` its peak and cache memory (one more run, under the profiler on the CPU)."""
    _check_repeats(warmup, repeats)
    decoder = Decoder(model, batch, context, new_tokens, device, dtype)
    peak = peak_memory_mb(decoder.run, device) if memory else None
    cache = tensor_mb(decoder.cache) if memory else None
    prefill, decode = [], []
    for repeat in range(warmup + repeats):
        prefill_s = _seconds(decoder.prefill, device)
        decode_s = _seconds(decoder.decode, device)
        if repeat >= warmup:
            prefill.append(prefill_s)
            decode.append(decode_s / new_tokens)
    prefill_s, step_s = statistics.median(prefill), statistics.median(decode)
    return DecodeResult(batch, context, new_tokens, 1e3 * prefill_s, 1e3 * step_s, batch / step_s, peak, cache)


@dataclass
class ImagesResult:
    batch: int
    forward_ms: float  # median time of one forward over the batch
    images_per_s: float
    peak_mb: float  # peak memory torch allocated during one forward (weights excluded)


def measure_images(model: torch.nn.Module, batch: int, device: torch.device, dtype: str = "fp32",
                   warmup: int = 1, repeats: int = 3) -> ImagesResult:
    """Forward speed of an image classifier (a ViT: `channels`, `image_size`) on random images."""
    _check_repeats(warmup, repeats)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, model.channels, model.image_size, model.image_size, generator=generator).to(device)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(images)

    peak = peak_memory_mb(forward, device)
    samples = [_seconds(forward, device) for _ in range(warmup + repeats)][warmup:]
    seconds = statistics.median(samples)
    return ImagesResult(batch, 1e3 * seconds, batch / seconds, peak)


def trace_decoding_step(model: GPT, batch: int, context: int, device: torch.device, dtype: str, path: Path) -> None:
    """Write a torch.profiler trace (Chrome trace JSON: chrome://tracing or https://ui.perfetto.dev)
    of one cached decoding step after a prefill of `context` tokens."""
    decoder = Decoder(model, batch, context, 1, device, dtype)
    decoder.run()  # warm-up: the first calls allocate and pick kernels
    decoder.prefill()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        decoder.decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
