"""The one interface every drafter implements (as transformers' ``CandidateGenerator`` does)."""

from __future__ import annotations

import copy
from typing import Callable

from ..sampling import Sampling
from ..sequences import Sequences
from ..session import Kept
from ..step import compile_static
from ..tree import Tree


def run_now(one_pass: Callable):
    """``Drafter.resync``'s default ``replay``: the pass, run eagerly."""
    return one_pass()


def require_positive(**counts) -> None:
    """Refuse a count that is not a positive integer, naming the argument."""
    for name, value in counts.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be positive (an integer), got {value!r}.")


class Drafter:
    """Proposes a token tree rooted at each row's last token.

    A call runs ``check(target)`` before anything else (it must raise on a target this drafter cannot serve),
    then on its own shallow copy of the drafter: ``begin`` once, ``propose`` once per verification step, and
    ``end``. So per-call attributes set in ``begin`` never meet another call's, and one drafter object can
    serve threads and nested calls. Drafters that sample fill ``Tree.draft_probs`` with the distribution each
    node was drawn from; deterministic drafters leave it None.

    **The capture contract.** A drafter with ``drafts_in_step`` True drafts inside the verification step, which
    a CUDA graph captures and replays: its ``propose`` is device work alone, always ``fixed_nodes`` nodes, reads
    nothing back from the device, updates per-step state in tensors in place, and leaves Python-side state as it
    found it. Every tensor it reads or writes across steps comes from the call's session through ``kept`` (see
    :class:`specdec.session.Kept`), so that a graph captured in one call replays in the next. Otherwise
    ``propose`` runs on the host before each step and its tree is copied into the graph's inputs.
    """

    drafts_in_step: bool = False
    fixed_nodes: int | None = None  # the node count of every tree, for a drafter that drafts in the step
    forwards_per_step: int = 0  # forward passes per ``propose`` in the step (a replayed graph runs no Python)
    max_depth: int | None = None  # the most drafted tokens one step can accept (its trees' depth), where known
    # True for drafters that read the target's features (``Sequences.features``): the engine then captures
    # them in every target pass, the prompt's included.
    wants_features: bool = False
    forwards: int = 0  # forward passes the drafter counted itself this call (its prompt pass; propose off the step)
    kept = None  # the call's session's ``Kept`` for ``owner``, set on the call's copy before ``begin``
    compile = False  # ``generate(compile=True)``, set on the call's copy before ``begin``: see ``compiled``

    @property
    def owner(self):
        """The module whose weights drafting reads (a draft model, heads), keeping state in the session; None
        for a drafter with no model."""
        return None

    def settings(self) -> tuple | None:
        """For a drafter that drafts in the step: what its captured ``propose`` depends on besides ``owner`` and
        the state kept for it, i.e. its options. A later call with equal settings replays the steps captured
        before. None, the default: they are captured anew in each call."""
        return None

    def kept_state(self) -> Kept:
        """``kept``; for a drafter run outside ``generate`` (by hand, or inside another drafter), a ``Kept`` of
        its own, made on first use."""
        if self.kept is None:
            self.kept = Kept(self.owner)
        return self.kept

    def compiled(self, fn):
        """``fn`` (a module, or the tensor work between its passes) for the step's fixed shapes: fused by
        ``torch.compile`` when the call compiles, as the target is, so that drafting is not hundreds of small
        kernels beside a fused verification."""
        return compile_static(fn) if self.compile else fn

    def shapes(self) -> list["Drafter"]:
        """The shapes ``speculation="auto"`` may choose among, after ``begin``: this drafter, then smaller trees
        that share its state (``reshaped``), cheaper where verifying a large tree costs more than it gains."""
        return [self]

    def reshaped(self, **options) -> "Drafter":
        """This drafter, begun, with other options: a copy sharing its per-call state, counting its own passes."""
        shape = copy.copy(self)
        for name, value in options.items():
            setattr(shape, name, value)
        shape.forwards = 0
        return shape

    def resync(self, seqs: Sequences, replay: Callable[[Callable], object] = run_now) -> None:
        """Bring what this drafter keeps (a model's cache) up to each row's accepted tokens after steps it did
        not draft (plain steps under ``speculation="auto"``, or another shape's), before its next step. On
        the host, between captured steps, in passes that read nothing from the device: ``replay(one_pass)``
        runs each (the loop replays them from a captured graph). A drafter that keeps nothing does nothing."""

    def check(self, target) -> None:
        pass

    def begin(self, target, seqs: Sequences, sampling: Sampling) -> None:
        """Per-call setup; overrides call this first, for ``forwards`` and ``sampling``."""
        self.forwards = 0
        self.sampling = sampling

    def propose(self, seqs: Sequences) -> Tree:
        raise NotImplementedError

    def end(self) -> None:
        """Release per-call state once the call ends, normally or not."""


class FixedDepth(Drafter):
    """A drafter whose trees are ``num_draft_tokens`` levels deep; ``speculation="auto"`` may also draft half as
    many (a prefix of the same chain, for a chain)."""

    num_draft_tokens: int

    @property
    def max_depth(self) -> int:
        return self.num_draft_tokens

    def shapes(self) -> list[Drafter]:
        n = self.num_draft_tokens
        return [self] + ([self.reshaped(num_draft_tokens=n // 2)] if n > 1 else [])
