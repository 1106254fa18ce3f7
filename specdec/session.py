"""One owner for everything a ``generate`` call keeps: the sequences, the target's KV cache and the device
counters; each drafter's kept state (a draft model's or head's KV cache, Medusa's tree layout on the device);
the steps captured as CUDA graphs; and the fused projection groups the call runs with.

Whoever allocates the buffers owns them, as in gpt-fast and vLLM: a captured step records buffer addresses, so
a graph is valid exactly as long as the session that allocated what it reads, for the same tree shape. A
session on the fixed-shape path is kept on the target between calls (as transformers keeps a static cache),
with rows that end by a column rounded up to ``ROUND``; a later call that fits (same batch size and device,
rows no longer) empties its buffers in place and replays the graphs captured before, with no warm-up or
capture (tens of milliseconds: as long as a short reply takes). One that does not fit replaces it. Graphs are
kept per *recipe*, what a step depends on besides the session's buffers (the drafter and its settings, the
sampling settings, compilation), the ``MAX_RECIPES`` most recent ones.

The one thing a session cannot own is the weights. Once per call it checks that the target's and each
drafter's weights are still where its graphs recorded them, and starts over if they moved (``model.to``).

A call that overlaps one running on the same target (another thread, or a nested call from a streamer) gets a
session of its own, not kept, and drafts with its own copy of the drafter: it gets the text it would get
alone. ``release(model)`` frees what is kept; so does deleting the model.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from . import adaptive, fusion
from .cache import TreeCache
from .sequences import Sequences

if TYPE_CHECKING:
    from .drafters.base import Drafter

ROUND = 256
MAX_RECIPES = 8

_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def weights_of(module: torch.nn.Module) -> tuple:
    """Where ``module``'s parameters and buffers are: what a captured step recorded of them."""
    return tuple((x.data_ptr(), x.dtype, tuple(x.shape)) for x in (*module.parameters(), *module.buffers()))


class Kept:
    """What one drafter model or head keeps in a session: its KV cache and named device tensors (Medusa's
    layout). Steps captured with its drafting read these, so they stay where they are for the session's life."""

    def __init__(self, owner: torch.nn.Module):
        self.weights = weights_of(owner)
        self.cache: TreeCache | None = None
        self.tensors: dict = {}

    def tree_cache(self, seqs: Sequences) -> TreeCache:
        """The drafter's cache, reset, as wide as ``seqs``; ``ends`` (B,) zero."""
        if self.cache is None:
            self.cache = TreeCache(seqs.tokens.shape[1])
            self.cache.ends = torch.zeros_like(seqs.end)
        self.cache.reset()
        return self.cache

    def get(self, name, make):
        """The tensors kept under ``name``, made by ``make()`` the first time."""
        if name not in self.tensors:
            self.tensors[name] = make()
        return self.tensors[name]


class Session:
    """A call's buffers (``seqs``, ``cache``, ``counters``), its drafters' ``Kept`` state, and its graphs."""

    def __init__(self, model, seqs: Sequences, counters: int, past_key_values=None, fuse_projections: bool = True):
        capacity = seqs.tokens.shape[1]
        self.seqs = seqs
        self.cache = TreeCache(capacity) if past_key_values is None else TreeCache.from_dynamic(past_key_values, capacity)
        self.counters = torch.zeros(counters, dtype=torch.long, device=seqs.end.device)
        self.projections = fusion.prepare(model) if fuse_projections else fusion.NONE  # before weights_of: they move
        self.weights = weights_of(model)
        self.kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # drafter model or head -> Kept
        self.recipes: dict = {}  # recipe -> {graph key: ``StepGraphs`` capture}, least recently used first
        self.speculation: dict = {}  # the costs and acceptance ``speculation="auto"`` measured (specdec.adaptive)
        self.busy = False

    def fits(self, model, batch: int, rows: int, device, fuse_projections: bool) -> bool:
        """Whether a call with ``batch`` rows ending by column ``rows`` can run in this kept session."""
        return (self.seqs.tokens.shape[0] == batch and self.seqs.tokens.device == device and self.seqs.limit >= rows
                and (self.projections is not fusion.NONE) == fuse_projections and self.weights == weights_of(model))

    def drafter(self, drafter: "Drafter | None") -> "Drafter | None":
        """This call's copy of ``drafter``, with ``kept`` its state in this session: per-call attributes set on
        the copy meet no other call's, and a drafter whose weights moved starts over with the graphs."""
        if drafter is None:
            return None
        drafter = copy.copy(drafter)
        owner = drafter.owner
        kept = None if owner is None else self.kept.get(owner)
        if owner is not None and (kept is None or kept.weights != weights_of(owner)):
            if kept is not None:
                self.recipes.clear()
                self.speculation.clear()
            kept = self.kept[owner] = Kept(owner)
        drafter.kept = kept
        return drafter

    def graphs(self, recipe) -> dict:
        """The graphs kept for ``recipe`` (an empty dict for this call alone when it is None)."""
        if recipe is None:
            return {}
        graphs = self.recipes.pop(recipe, {})
        self.recipes[recipe] = graphs
        while len(self.recipes) > MAX_RECIPES:
            del self.recipes[next(iter(self.recipes))]
        return graphs

    def sizes(self) -> tuple:
        """The sizes of the buffers a step may grow (growing moves them): part of every graph's key."""
        caches = [self.cache, *(k.cache for k in self.kept.values() if k.cache is not None)]
        return (self.seqs.tokens.shape[1], *(c.capacity for c in caches))

    def __enter__(self) -> "Session":
        self.projections.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.projections.leave()
        self.busy = False


def open_session(model, input_ids, attention_mask, max_new_tokens: int, counters: int, keep: bool,
                 past_key_values=None, fuse_projections: bool = True) -> Session:
    """A session for one call: ``model``'s kept one, emptied and filled with this call's prompt, when ``keep``
    and it fits and is free; else a new one, kept from now on when ``keep`` (unless the kept one is busy).
    It is busy until the call leaves it."""
    if not keep or past_key_values is not None:
        seqs = Sequences.from_prompt(input_ids, attention_mask, max_new_tokens)
        return Session(model, seqs, counters, past_key_values, fuse_projections)
    batch, width = input_ids.shape
    with _lock:  # another thread may be taking or replacing it at the same moment
        session = _sessions.get(model)
        if session is not None and session.busy:
            return open_session(model, input_ids, attention_mask, max_new_tokens, counters, False, None,
                                fuse_projections)
        if session is None or not session.fits(model, batch, width + max_new_tokens, input_ids.device, fuse_projections):
            _sessions.pop(model, None)
            del session  # its buffers and graphs go before the new ones are allocated
            seqs = Sequences.empty(batch, -(-(width + max_new_tokens) // ROUND) * ROUND, input_ids.device)
            session = _sessions[model] = Session(model, seqs, counters, fuse_projections=fuse_projections)
        session.busy = True
    session.seqs.fill(input_ids, attention_mask, max_new_tokens)
    session.cache.reset()
    session.counters.zero_()
    return session


def measured_costs(model) -> dict:
    """The seconds per step ``speculation="auto"`` has measured in ``model``'s kept session, by recipe (see
    ``generate._Call.recipe``); empty where there is none."""
    session = _sessions.get(model)
    return {} if session is None else adaptive.costs(session.speculation)


def release(model) -> None:
    """Free what ``generate`` keeps for ``model``: its session as a target (buffers and captured steps), and its
    state in every kept session as a draft model or head."""
    with _lock:
        _sessions.pop(model, None)
        for session in list(_sessions.values()):
            session.kept.pop(model, None)
