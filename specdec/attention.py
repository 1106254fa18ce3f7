"""Which attention the verifier uses: the Triton tree kernel, or the reference 4D mask.

The kernel plugs in through transformers' attention interface: it is registered as ``"specdec_tree"``,
and for the length of one forward pass the model's config names it, so every layer of every model that
dispatches through ``ALL_ATTENTION_FUNCTIONS`` calls it with the tree description as a keyword argument.
No mask is built (transformers builds none for an implementation without a mask function). The
reference path, a dense float mask handed to the model's own eager/SDPA attention, stays for CPUs and
for checking: ``with specdec.attention.backend("mask"): ...``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

KERNEL = "specdec_tree"
BACKENDS = ("auto", "kernel", "mask")
MAX_HEAD_DIM = 256
_backend: ContextVar[str] = ContextVar("specdec_attention_backend", default="auto")
_one_pass_at_a_time = threading.RLock()


@contextlib.contextmanager
def backend(name: str):
    """Choose the verifier's attention inside the block: ``"auto"`` (the kernel on CUDA, else the mask),
    ``"kernel"`` (always; on CPU tensors it needs ``TRITON_INTERPRET=1`` set before specdec is imported)
    or ``"mask"`` (always the reference)."""
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}.")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def head_dim(config) -> int:
    """The widest attention head of any layer (a per-layer config, as Gemma 4's, sizes them by layer)."""
    try:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return max(head_dim(config.per_layer_config[i]) for i in range(config.num_hidden_layers))


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_kernel(device: torch.device, head_dim: int) -> bool:
    """Whether to run the kernels on these tensors (raises if ``"kernel"`` is forced but cannot run).
    Asked once per forward pass and once per cache compaction, so it does no lookups itself."""
    choice = _backend.get()
    if choice == "mask":
        return False
    reason = None
    if not _triton_installed():
        reason = "triton is not installed"
    elif head_dim > MAX_HEAD_DIM:
        reason = f"head dim {head_dim} exceeds {MAX_HEAD_DIM}"
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if choice == "kernel" and reason:
        raise RuntimeError(f"specdec.attention.backend('kernel') cannot run: {reason}.")
    return choice == "kernel" or (reason is None and device.type == "cuda")


@dataclass
class TreeInputs:
    """What the kernel needs besides Q, K and V; built once per forward pass, shared by all layers."""

    start: torch.Tensor  # (B,) prefix columns [start, end)
    end: torch.Tensor
    region_start: int
    bits: torch.Tensor  # (B, Q, ceil(R / 32)) packed region visibility
    q_pos: torch.Tensor  # (B, Q)
    region_pos: torch.Tensor  # (B, R)

    @classmethod
    def build(cls, start, end, region_start, region_visible, q_pos, region_pos) -> "TreeInputs":
        from specdec.kernels.tree_attention import pack_visibility

        return cls(start.contiguous(), end.contiguous(), region_start, pack_visibility(region_visible),
                   q_pos.contiguous(), region_pos.contiguous())


@torch.library.custom_op("specdec::tree_attention", mutates_args=())
def _tree_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor,
                       end: torch.Tensor, region_start: int, bits: torch.Tensor, q_pos: torch.Tensor,
                       region_pos: torch.Tensor, scale: float | None, window: int | None,
                       softcap: float | None) -> torch.Tensor:
    """The kernel as an operator that ``torch.compile`` treats as opaque: Dynamo cannot trace a Triton
    launch under ``TRITON_INTERPRET=1``, and needs no more than the output's shape."""
    from specdec.kernels.tree_attention import tree_attention

    return tree_attention(query, key, value, start, end, region_start, bits, q_pos, region_pos, scale=scale,
                          window=window, softcap=softcap)


@_tree_attention_op.register_fake
def _(query, key, value, start, end, region_start, bits, q_pos, region_pos, scale, window, softcap):
    batch, heads, t, head_dim = query.shape
    return query.new_empty(batch, t, heads, head_dim)


def tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           sliding_window=None, softcap=None, tree: TreeInputs | None = None, **kwargs):
    """transformers' attention-function signature; returns ((B, Q, Hq, D) output, no weights). Eager calls
    skip the operator's dispatch (tens of microseconds per layer on a slow host)."""
    from specdec.kernels.tree_attention import tree_attention

    if tree is None:
        raise RuntimeError(f"attn_implementation={KERNEL!r} only runs inside specdec's verifier.")
    if dropout:
        raise RuntimeError("attention dropout is active: call model.eval() before speculative decoding.")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the tree-attention kernel.")
    args = (query, key, value, tree.start, tree.end, tree.region_start, tree.bits, tree.q_pos, tree.region_pos)
    if torch.compiler.is_compiling():
        return _tree_attention_op(*args, scaling, sliding_window, softcap), None
    return tree_attention(*args, scale=scaling, window=sliding_window, softcap=softcap), None


@contextlib.contextmanager
def kernel_attention(model):
    """Point ``model``'s config (and sub-configs) at the kernel for one forward pass, then restore them.

    The config is shared by every thread using the model, so such passes take turns: two that overlapped
    restored each other's setting, one finishing without the kernel and the config left naming it. (A pass
    only launches kernels, which the GPU runs in order anyway.)"""
    with _one_pass_at_a_time:
        config = model.config
        saved = {"": config._attn_implementation}
        for name in config.sub_configs:
            sub = getattr(config, name, None)
            if sub is not None:
                saved[name] = sub._attn_implementation
        config._attn_implementation = KERNEL
        try:
            yield
        finally:
            config._attn_implementation = saved


AttentionInterface.register(KERNEL, tree_attention_forward)
