"""What the layer tests watch under bf16 autocast: the dtypes a routing function returns."""

import torch


def record_dtypes(monkeypatch, owner, name: str) -> list[torch.dtype]:
    """Wrap `owner.name` so that the dtypes of the tensors it returns are recorded, call by call."""
    seen = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.extend(tensor.dtype for tensor in (result if isinstance(result, tuple) else (result,)))
        return result

    monkeypatch.setattr(owner, name, recording)
    return seen
