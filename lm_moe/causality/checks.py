"""The leakage checks (docs/causality.md, "The checks"), each measuring a maximum difference.

Every check runs on a subject (`subjects.py`) in float64, so a causal subject shows differences
at rounding level (<= `tolerance`) and a leak shows up as a difference of the size of the outputs.
The forward checks come first: gradient tests are blind to stop-gradient and to discrete
decisions (top-k, capacity), a changed future is not.

1. future perturbation  outputs up to t ignore any change after t, and outputs after t do change
2. jacobian             d y_t / d x_tau = 0 for tau > t (w.r.t. the inputs, or a model's embeddings)
3. prefix consistency   f(x[:, :l]) = f(x)[:, :l] for lengths that are not multiples of C, N, G
4. decode equivalence   prefill + incremental steps, in several splits, reproduce f(x)
5. batch independence   a row ignores its batch-mates (Mixture of Tokens mixes rows by design)
6. cross-row future     batch-mates' futures never reach a row's past (all subjects)
7. padding              padding at the end of a row leaves its valid outputs unchanged
and 1-2 again in train mode, with every random draw seeded alike.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

PASS, LEAK, VACUOUS, ERROR, NOT_APPLICABLE = "PASS", "LEAK", "VACUOUS", "ERROR", "n/a"


@dataclass
class CheckResult:
    check: str
    mode: str  # "eval" or "train"
    max_diff: float  # the largest difference where there must be none (nan where not measured)
    verdict: str  # PASS, LEAK, VACUOUS (the check could not have failed), ERROR (refused to run) or n/a
    note: str = ""

    @property
    def leaks(self) -> bool:
        return self.verdict in (LEAK, VACUOUS, ERROR)


@dataclass
class CheckSettings:
    length: int = 0  # 0 = chosen from the subject: three chunks and a bit, at least 64; else >= 2
    seeds: tuple[int, ...] = (0, 1, 2)
    tolerance: float = 1e-10
    rows: int = 2  # sequences per batch (times the subject's group size)


def probe_positions(length: int, boundaries: set[int]) -> list[int]:
    """t = 0, 1, kC-1, kC, kC+1 for every chunk/segment length C, and the last t with a future."""
    probes = {0, 1, length - 2}
    for chunk in boundaries:
        for k in range(1, length // chunk + 1):
            probes |= {k * chunk - 1, k * chunk, k * chunk + 1}
    return sorted(t for t in probes if 0 <= t <= length - 2)


def awkward_lengths(length: int, boundaries: set[int], batch_multiple: int) -> list[int]:
    """Prefix lengths that avoid multiples of the chunk, group and small expert counts."""
    structure = set(boundaries) | {batch_multiple, 2, 4, 8}
    lengths = [n for n in range(1, length) if all(n % m for m in structure if m > 1)]
    picks = lengths[:3] + lengths[len(lengths) // 2 : len(lengths) // 2 + 1] + lengths[-2:]
    return sorted(set(picks))


def decode_splits(length: int, boundaries: set[int]) -> list[list[int]]:
    """One prefill; prefill then one-token steps; a prefill in uneven pieces across boundaries."""
    chunk = min(boundaries) if boundaries else 5
    first = min(length - 1, chunk + 1)
    uneven, total, step = [], 0, 0
    while total < length:
        piece = min((3, 1, chunk + 2, 2)[step % 4], length - total)
        uneven.append(piece)
        total, step = total + piece, step + 1
    return [[length], [first] + [1] * (length - first), uneven]


def _max_abs(difference: torch.Tensor) -> float:
    return float(difference.abs().max()) if difference.numel() else 0.0


class Checker:
    """Runs the checks on one subject; `results()` gives them all."""

    def __init__(self, subject, settings: CheckSettings | None = None):
        self.subject = subject
        self.settings = settings or CheckSettings()
        boundaries = subject.boundaries
        requested = self.settings.length
        if requested == 1 or requested < 0:
            raise ValueError(f"length must be 0 (chosen from the subject) or at least 2, got {requested}: "
                             "a check needs a position with a future")
        if requested and subject.max_length is not None and requested > subject.max_length:
            raise ValueError(f"length {requested} is longer than the model's context (block_size={subject.max_length})")
        length = requested or max(64, 3 * max(boundaries, default=0) + 3)
        if subject.max_length is not None:
            length = min(length, subject.max_length)
        if length < 2:
            raise ValueError(f"the checks need sequences of at least 2 tokens; the model's context is {length}")
        self.length = length
        self.batch = self.settings.rows * subject.batch_multiple
        self.probes = probe_positions(length, boundaries)

    # ---- helpers ----

    def _inputs(self, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        generator = torch.Generator().manual_seed(seed)
        return self.subject.inputs(self.batch, self.length, generator), generator

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        torch.manual_seed(0)  # the same random draws (router jitter, dropout) for every call
        with torch.no_grad():
            return self.subject.run(x, mask)

    def _verdict(self, max_diff: float) -> str:
        return PASS if max_diff <= self.settings.tolerance else LEAK

    # ---- the checks ----

    def future_perturbation(self, mode: str) -> CheckResult:
        worst_past, least_future = 0.0, float("inf")
        for seed in self.settings.seeds:
            x, generator = self._inputs(seed)
            base = self._run(x)
            for t in self.probes:
                changed = self._run(self.subject.replace_future(x, t, generator))
                worst_past = max(worst_past, _max_abs(changed[:, : t + 1] - base[:, : t + 1]))
                least_future = min(least_future, _max_abs(changed[:, t + 1 :] - base[:, t + 1 :]))
        probes = f"t in {self.probes}, {len(self.settings.seeds)} seeds"
        if worst_past <= self.settings.tolerance and least_future <= self.settings.tolerance:
            return CheckResult("future perturbation", mode, worst_past, VACUOUS, f"the future never changed the output; {probes}")
        return CheckResult("future perturbation", mode, worst_past, self._verdict(worst_past), probes)

    def jacobian(self, mode: str) -> CheckResult:
        worst = 0.0
        x, generator = self._inputs(self.settings.seeds[0])
        for t in self.probes:
            torch.manual_seed(0)
            with torch.enable_grad():
                leaf, outputs = self.subject.differentiable_view(x)
                direction = torch.randn(outputs[:, t].shape, generator=generator, dtype=outputs.dtype)
                (grad,) = torch.autograd.grad((outputs[:, t] * direction).sum(), leaf)
            worst = max(worst, _max_abs(grad[:, t + 1 :]))
        return CheckResult("jacobian", mode, worst, self._verdict(worst), f"d y_t / d x_tau for tau > t, t in {self.probes}")

    def prefix_consistency(self) -> CheckResult:
        worst = 0.0
        lengths = awkward_lengths(self.length, self.subject.boundaries, self.subject.batch_multiple)
        for seed in self.settings.seeds:
            x, _ = self._inputs(seed)
            full = self._run(x)
            for length in lengths:
                worst = max(worst, _max_abs(self._run(x[:, :length]) - full[:, :length]))
        return CheckResult("prefix consistency", "eval", worst, self._verdict(worst), f"lengths {lengths}")

    def decode_equivalence(self) -> CheckResult:
        worst = 0.0
        splits = decode_splits(self.length, self.subject.boundaries)
        for seed in self.settings.seeds:
            x, _ = self._inputs(seed)
            full = self._run(x)
            with torch.no_grad():
                for pieces in splits:
                    try:
                        decoded = self.subject.decode(x, pieces)
                    except ValueError as error:  # e.g. a layer that cannot decode without the future
                        return CheckResult("decode equivalence", "eval", float("nan"), ERROR, f"decoding refused: {error}")
                    worst = max(worst, _max_abs(decoded - full))
        return CheckResult("decode equivalence", "eval", worst, self._verdict(worst), f"batch {self.batch}, splits {splits[1][:3]}..., {splits[2][:4]}...")

    def batch_independence(self) -> CheckResult:
        worst = 0.0
        for seed in self.settings.seeds:
            x, generator = self._inputs(seed)
            other_mates = x.clone()
            other_mates[1:] = self.subject.inputs(self.batch - 1, self.length, generator)
            worst = max(worst, _max_abs(self._run(other_mates)[0] - self._run(x)[0]))
        if not self.subject.per_example:
            return CheckResult("batch independence", "eval", worst, NOT_APPLICABLE, "mixes the rows of a group by design")
        return CheckResult("batch independence", "eval", worst, self._verdict(worst), "row 0 with other batch-mates")

    def cross_row_future(self) -> CheckResult:
        worst = 0.0
        for seed in self.settings.seeds:
            x, generator = self._inputs(seed)
            base = self._run(x)
            for t in self.probes:
                changed = self._run(self.subject.replace_future(x, t, generator, rows=slice(1, None)))
                worst = max(worst, _max_abs(changed[0, : t + 1] - base[0, : t + 1]))
        return CheckResult("cross-row future", "eval", worst, self._verdict(worst), "batch-mates' futures vs row 0's past")

    def padding(self) -> CheckResult:
        if not self.subject.supports_padding():
            return CheckResult("padding", "eval", float("nan"), NOT_APPLICABLE, "no padding mask; right padding is the future")
        worst = 0.0
        for seed in self.settings.seeds:
            x, generator = self._inputs(seed)
            junk = self.subject.inputs(self.batch, 5, generator)
            padded = torch.cat([x, junk], dim=1)  # [B, T + 5, ...]
            mask = torch.ones(padded.shape[:2], dtype=torch.bool)
            mask[:, self.length :] = False
            worst = max(worst, _max_abs(self._run(padded, mask)[:, : self.length] - self._run(x)))
        return CheckResult("padding", "eval", worst, self._verdict(worst), "5 junk positions masked at the end")

    def results(self, on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
        """Every check, in eval mode, then the forward and gradient checks again in train mode."""
        plan = [
            ("eval", lambda: self.future_perturbation("eval")),
            ("eval", lambda: self.jacobian("eval")),
            ("eval", self.prefix_consistency),
            ("eval", self.decode_equivalence),
            ("eval", self.batch_independence),
            ("eval", self.cross_row_future),
            ("eval", self.padding),
            ("train", lambda: self.future_perturbation("train")),
            ("train", lambda: self.jacobian("train")),
        ]
        module = self.subject.modules()
        was_training = module.training
        results = []
        try:
            for mode, check in plan:
                module.train(mode == "train")
                results.append(check())
                if on_result is not None:
                    on_result(results[-1])
        finally:
            module.train(was_training)
        return results
