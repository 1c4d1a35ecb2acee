"""Shared checks of a layer under bf16 autocast: what must stay fp32, and how close bf16 stays."""

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


def check_bf16_training_step(layer: torch.nn.Module, x: torch.Tensor, routing_parameter: torch.nn.Parameter):
    """Forward and backward under CPU bf16 autocast: the output is bf16 and close to fp32's, the aux
    loss fp32, the gradients finite and those of the (fp32) routing parameters fp32."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and aux.loss.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and routing_parameter.grad.dtype == torch.float32
    y32, _ = layer(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    return y, aux
