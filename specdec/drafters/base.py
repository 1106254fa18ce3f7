"""The one interface every drafter implements (as transformers' ``CandidateGenerator`` does)."""

from __future__ import annotations

from .. import cache as caches
from ..sampling import Sampling
from ..sequences import Sequences
from ..tree import Tree


def require_positive(**counts) -> None:
    """Refuse a count that is not a positive integer, naming the argument."""
    for name, value in counts.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be positive (an integer), got {value!r}.")


class Drafter:
    """Proposes a token tree rooted at each row's last token.

    ``check`` runs before anything else and must raise on a target this drafter cannot serve; ``begin``
    sets up per-call state. A call that overlaps another using the same drafter object (in another thread,
    or nested in a streamer) runs on a shallow copy of it, so per-call attributes never meet another call's;
    ``propose`` is called once per verification step. Drafters that sample fill ``Tree.draft_probs`` with
    the distribution each node was drawn from; deterministic drafters leave it None.
    """

    forwards: int = 0  # model forward passes spent drafting in the current call
    # True for drafters that read the target's features (``Sequences.features``): the engine then
    # captures them in every target pass, the prompt's included.
    wants_features: bool = False
    # The node count of every tree, for drafters whose ``propose`` is device work alone (fixed shapes, no
    # reads of the device; per-step state lives in tensors updated in place, and Python-side state is back as
    # it was when it returns): a CUDA graph then captures drafting with verification. The loop runs such a
    # ``propose`` inside the step on every path.
    fixed_nodes: int | None = None
    # Forward passes per ``propose`` of such a drafter, which the loop counts into ``forwards`` (a replayed
    # graph runs no Python).
    forwards_per_step: int = 0

    def check(self, target) -> None:
        pass

    def begin(self, target, seqs: Sequences, sampling: Sampling) -> None:
        """Per-call setup; overrides call this first, for ``forwards`` and ``sampling``."""
        self.forwards = 0
        self.sampling = sampling

    def propose(self, seqs: Sequences) -> Tree:
        raise NotImplementedError

    def graph_key(self) -> tuple | None:
        """For a drafter with ``fixed_nodes``, asked after ``begin``: what its captured ``propose`` depends on,
        its settings and ``graphs.addresses`` of every tensor it reads or writes. A later call whose key is
        equal replays the steps captured before (their buffers must then still be where they were: keep
        per-call state across calls, as ``cache.kept_cache`` does). None, the default: capture anew each call."""
        return None

    def kept_cache(self, owner, seqs: Sequences):
        """``cache.kept_cache(owner, seqs)``, given back when this call ends (``end``)."""
        taken = caches.kept_cache(owner, seqs)
        self._taken = (*getattr(self, "_taken", ()), taken)
        return taken

    def end(self) -> None:
        """Release per-call state (caches) once the call ends, normally or not; overrides call this too."""
        for taken in getattr(self, "_taken", ()):
            caches.put_back(taken)
        self._taken = ()
