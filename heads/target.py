"""What a head takes from its target: borrowed modules, and the fingerprint that ties saved heads to it."""

from __future__ import annotations

import torch
from torch import nn


class Borrowed(nn.Module):
    """Calls one of the target's modules without registering it, so the head's parameters, state dict and
    ``.to()`` never include (or move) the target's weights."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["module"] = module

    def forward(self, x):
        return self.module(x)


def feature_size(target) -> int:
    """Width of the target's features: what its LM head reads."""
    return target.get_output_embeddings().in_features


def fingerprint(target) -> dict:
    """What saved heads record of their target. The LM head sample is 64 weights at fixed places, rounded
    to bf16, so the same model loaded in fp32, fp16 or bf16 matches and any other model does not. The places
    are float32 steps, as saved heads recorded them; past 2**24 weights the last one rounds beyond the end,
    hence the clamp."""
    weight = target.get_output_embeddings().weight.detach()
    flat = weight.reshape(-1)
    places = torch.linspace(0, flat.numel() - 1, 64, device=flat.device).long().clamp_(max=flat.numel() - 1)
    return {
        "architecture": type(target).__name__,
        "hidden_size": feature_size(target),
        "vocab_size": weight.shape[0],
        "lm_head_sample": flat[places].to(torch.bfloat16).float().tolist(),
    }


def check_fingerprint(saved: dict, target, what: str) -> None:
    """Refuse a target other than the one ``saved`` describes, naming what differs."""
    ours = fingerprint(target)
    for key in ("architecture", "hidden_size", "vocab_size"):
        if saved[key] != ours[key]:
            raise ValueError(
                f"{what} were trained for a target with {key}={saved[key]!r}, but this target has "
                f"{key}={ours[key]!r}; load heads trained for this model, or train new ones."
            )
    a, b = torch.tensor(saved["lm_head_sample"]), torch.tensor(ours["lm_head_sample"])
    if not torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(a.abs().max().clamp(min=1e-6))):
        raise ValueError(
            f"{what} were trained for another {ours['architecture']} with the same shapes: its LM head "
            f"weights differ from this target's. Load heads trained for this model, or train new ones."
        )


def check_device(head, target) -> None:
    device = next(head.parameters()).device
    if device != target.device:
        raise ValueError(f"The head is on {device} but the target is on {target.device}; move the head with "
                         f"`.to({str(target.device)!r})`.")
