"""Projections that read the same input run as one GEMM while specdec runs a model: an attention's q, k and v,
an MLP's gate and up.

At verification shapes (one to a few dozen rows) cuBLAS reads a small weight matrix well below the memory
bandwidth and gives it a split-K reduction kernel of its own: an 8B Llama's q, k and v took 31.4 µs a layer as
three GEMMs and 21.3 µs as one (H100, 16 rows; ``benchmarks/fused_projections.py``). So the weights of each
group move once into one buffer, each module's weight becoming a view of its rows: the same Parameter objects,
names and values, and no extra memory, but the caller's model does change where its weights live
(``fuse_projections=False`` opts out). During a call, the group's first module computes every member's
output and the others return their columns, if they are called on the same input; otherwise each runs alone.
Outside specdec's calls the modules run as nn.Linear does, on their views. Modules are matched by the names
transformers gives them; a member that is not exactly an ``nn.Linear`` (PEFT's LoRA layers), or that another
library hooks (accelerate's offloading, forward hooks), leaves its group unfused.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _hooked(module: nn.Module) -> bool:
    """Whether another library acts on ``module``'s calls: accelerate replaces ``forward`` and sets
    ``_hf_hook``; anyone may register forward hooks. Such a module runs as it is, unfused."""
    return ("forward" in vars(module) or hasattr(module, "_hf_hook") or bool(module._forward_hooks)
            or bool(module._forward_pre_hooks))


class _Group:
    """Linear modules that project one input, their weights (and biases) rows of one buffer."""

    def __init__(self, members: list[nn.Linear]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.weight = self.bias = None  # during a call: views of the whole buffers (nothing held between calls)
        self.pending = None  # (input, outputs) from the first member, until the last one takes its columns
        self.forwards = [functools.partial(self.project, i) for i in range(len(members))]  # stable, for guards

    @staticmethod
    def fusable(members) -> bool:
        first = members[0]
        return all(
            type(m) is nn.Linear and not _hooked(m) and m.in_features == first.in_features
            and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
            and (m.bias is None) == (first.bias is None)
            for m in members
        )

    def _adjacent(self, name: str) -> bool:
        """Whether the members' ``name`` tensors are consecutive rows of one buffer."""
        parts = [getattr(m, name) for m in self.members]
        first = parts[0]
        offset = first.storage_offset()
        for p in parts:
            if (not p.is_contiguous() or p.dtype != first.dtype or p.device != first.device
                    or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                    or p.storage_offset() != offset):
                return False
            offset += p.numel()
        return True

    @torch.no_grad()
    def fuse(self) -> None:
        """Move the weights into one buffer, unless they are there already (``model.to`` moves them apart)."""
        for name in ("weight", "bias"):
            if getattr(self.members[0], name) is None or self._adjacent(name):
                continue
            whole = torch.cat([getattr(m, name).detach() for m in self.members])
            for m, part in zip(self.members, whole.split(self.sizes)):
                getattr(m, name).data = part

    @torch.no_grad()
    def whole(self, name: str) -> torch.Tensor | None:
        """The buffer behind the members' ``name`` tensors, as one tensor (a view: no copy)."""
        first = getattr(self.members[0], name)
        return None if first is None else first.as_strided((sum(self.sizes), *first.shape[1:]), first.stride())

    def project(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            outputs = F.linear(x, self.weight, self.bias).split(self.sizes, -1)
            self.pending = (x, outputs)
            return outputs[0]
        pending = self.pending
        if pending is None or pending[0] is not x:
            return F.linear(x, self.members[i].weight, self.members[i].bias)
        if i == len(self.members) - 1:
            self.pending = None
        return pending[1][i]


class Projections:
    """A model's fusable groups, and how many calls run with them fused (calls can nest)."""

    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self.depth = 0
        self.lock = threading.Lock()  # calls in other threads enter and leave too

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                for group in self.groups:
                    group.weight, group.bias = group.whole("weight"), group.whole("bias")
                    for member, forward in zip(group.members, group.forwards):
                        member.forward = forward
            self.depth += 1

    def leave(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for group in self.groups:
                    group.weight = group.bias = group.pending = None
                    for member in group.members:
                        del member.forward


_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
NONE = Projections([])


def prepare(model: nn.Module) -> Projections:
    """``model``'s fusable groups, their weights moved into one buffer each (once; again if they were moved
    apart since). Call it before anything records weight addresses, as captured steps do."""
    found = _projections.get(model)
    if found is None:
        groups = []
        for module in model.modules():
            for names in GROUPS:
                members = [getattr(module, name, None) for name in names]
                if all(isinstance(m, nn.Module) for m in members) and _Group.fusable(members):
                    groups.append(_Group(members))
        found = _projections[model] = Projections(groups)
    if found.depth == 0:
        for group in found.groups:
            group.fuse()
    return found


@contextlib.contextmanager
def fused(model: nn.Module):
    """Run ``model``'s fusable projections fused inside the block, as ``specdec.generate`` does during a call:
    for loops of one's own, and benchmarks."""
    projections = prepare(model)
    projections.enter()
    try:
        yield projections
    finally:
        projections.leave()
