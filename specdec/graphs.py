"""Decoding steps captured as CUDA graphs and replayed, so that a step costs the GPU's time, not the host's.

A transformers forward pass launches a few hundred small kernels from Python; for models up to a few
billion parameters that host work, not the GPU, sets the pace of each step. A step whose shapes are fixed
and that never reads the device (``step.verify_step`` with the cache held at a fixed length) can be
recorded once and replayed with a single launch.

Per tree shape: the first step runs eagerly on a side stream (which compiles the Triton kernels and warms
cuBLAS and the caching allocator, and is a real step), the second is captured and replayed, and so is
every later one; only the tree is copied into the graph's input buffers. A graph records buffer addresses,
so the graphs belong to the session that owns the buffers (:mod:`specdec.session`), keyed by the tree's
shape and the buffers' sizes (which only grow, and move when they do). A step that cannot be captured (a
model whose forward reads the device, say) is run eagerly instead, after the caller's ``on_failure`` (the
loop lets go of the fixed shapes there); graphs are off for the rest of the call, and a warning says why,
once.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Callable

import torch

from .tree import Tree

_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


TREE_TENSORS = ("tokens", "parents", "valid", "draft_probs")


def _inputs(tree: Tree) -> Tree:
    """Fresh copies of the tree's tensors, to become the graph's input buffers."""
    return replace(tree, **{name: getattr(tree, name).clone() for name in TREE_TENSORS
                            if getattr(tree, name) is not None})


def _end_generator_capture() -> None:
    """A capture that fails never reaches the end that takes the CUDA generator out of capture mode, and
    every later random draw in the process then fails ("Offset increment outside graph capture"). A clone
    of its state keeps the seed and offset without that flag."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


class StepGraphs:
    """Runs ``step(tree)``, replaying a graph captured for ``key`` where one exists. ``tree`` is copied into
    the graph's input buffers; with ``tree=None`` the step drafts its own tree (a drafter whose ``propose``
    is device work alone), and drafting is captured with verification. ``captured`` holds the graphs (None
    for a key warmed up but not captured yet); a caller keeps it to replay them in a later call."""

    def __init__(self, enabled: bool, on_failure: Callable[[], None] = lambda: None, captured: dict | None = None):
        self.enabled = enabled
        self.on_failure = on_failure
        self.captured = {} if captured is None else captured

    def run(self, step: Callable[[Tree | None], tuple], key: tuple, tree: Tree | None = None) -> tuple:
        if not self.enabled:
            return step(tree)
        if self.captured.get(key) is None:
            if key not in self.captured:
                self.captured[key] = None
                # In the input buffers' layout, as the capture will see it: a compiled step guards on strides,
                # and recompiling inside the capture fails it (an expanded tree tensor, cloned dense).
                return self._eager_on_side_stream(step, None if tree is None else _inputs(tree))
            try:
                self.captured[key] = self._capture(step, tree)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run without graphs
                _end_generator_capture()
                self.enabled = False
                say_once(f"specdec: this model's decoding step cannot be captured as a CUDA graph "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); using the dynamic path.")
                self.on_failure()
                return step(tree)
        graph, inputs, outputs = self.captured[key]
        if inputs is not None:
            for name in TREE_TENSORS:
                if getattr(inputs, name) is not None:
                    getattr(inputs, name).copy_(getattr(tree, name))
        graph.replay()
        return outputs

    @staticmethod
    def _eager_on_side_stream(step, tree):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = step(tree)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    @staticmethod
    def _capture(step, tree):
        inputs = None if tree is None else _inputs(tree)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            # A fresh Tree: its cached properties (ancestors, depth) must be computed inside the graph.
            outputs = step(None if inputs is None else replace(inputs))
        return graph, inputs, outputs
