"""What ``generate`` keeps of a target model between calls on the fixed-shape path, so that a later call
replays the decoding steps an earlier one captured as CUDA graphs, instead of warming up and capturing
them again (tens of milliseconds a call: as long as a short reply takes to generate).

A captured step records buffer addresses, so what is kept is the buffers themselves: the sequences, the
KV cache and the counters, sized for rows that end by a column rounded up to ``ROUND``, as transformers
keeps a static cache on a model between ``generate`` calls. Every later call that fits (same batch size and
weights, rows no longer) empties them in place and reuses them; one that does not fit replaces them, and
the graphs with them. The graphs are kept per *recipe*: what a step depends on besides these buffers (the
drafter's ``graph_key``, the sampling settings, compilation), the ``MAX_RECIPES`` most recent ones.
``release(model)`` frees it all; so does deleting the model.

A call that starts while another is running on the same model (in another thread, or from a streamer's
callback) gets buffers of its own, not kept.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .cache import TreeCache, release_kept
from .graphs import addresses
from .sequences import Sequences

ROUND = 256
MAX_RECIPES = 8

_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass
class Session:
    seqs: Sequences
    cache: TreeCache
    counters: torch.Tensor
    weights: tuple = ()  # ``addresses`` of the target: what the kept graphs recorded of it
    recipes: dict = field(default_factory=dict)  # recipe -> ``StepGraphs.captured``, least recently used first
    busy: bool = False

    @classmethod
    def around(cls, seqs: Sequences, counters: int, past_key_values=None, weights: tuple = ()) -> "Session":
        """A cache as wide as ``seqs`` (a copy of ``past_key_values``, a checked ``DynamicCache``, when given)
        and ``counters`` zeroed counters on its device."""
        capacity = seqs.tokens.shape[1]
        cache = TreeCache(capacity) if past_key_values is None else TreeCache.from_dynamic(past_key_values, capacity)
        return cls(seqs, cache, torch.zeros(counters, dtype=torch.long, device=seqs.end.device), weights)

    @classmethod
    def fresh(cls, input_ids, attention_mask, max_new_tokens: int, counters: int, past_key_values=None) -> "Session":
        """Buffers for this call alone, rows as long as it needs."""
        return cls.around(Sequences.from_prompt(input_ids, attention_mask, max_new_tokens), counters, past_key_values)

    def captured(self, recipe) -> dict:
        """The graphs kept for ``recipe`` (an empty dict for this call alone when it is None)."""
        if recipe is None:
            return {}
        graphs = self.recipes.pop(recipe, {})
        self.recipes[recipe] = graphs
        while len(self.recipes) > MAX_RECIPES:
            del self.recipes[next(iter(self.recipes))]
        return graphs


def kept(model, input_ids, attention_mask, max_new_tokens: int, counters: int) -> Session:
    """``model``'s session, emptied and filled with this call's prompt, or a new one that is kept from now on
    (a fresh one while the kept one is busy). Mark it busy until the call ends."""
    with _lock:  # another thread may be taking or replacing it at the same moment
        session = _sessions.get(model)
        if session is not None and session.busy:
            return Session.fresh(input_ids, attention_mask, max_new_tokens, counters)
        batch, width = input_ids.shape
        weights = addresses(model)
        if (session is None or session.weights != weights or session.seqs.tokens.shape[0] != batch
                or session.seqs.tokens.device != input_ids.device or session.seqs.limit < width + max_new_tokens):
            _sessions.pop(model, None)
            del session  # its buffers and graphs go before the new ones are allocated
            seqs = Sequences.empty(batch, -(-(width + max_new_tokens) // ROUND) * ROUND, input_ids.device)
            session = _sessions[model] = Session.around(seqs, counters, weights=weights)
        session.busy = True
    session.seqs.fill(input_ids, attention_mask, max_new_tokens)
    session.cache.reset()
    session.counters.zero_()
    return session


def release(model) -> None:
    """Free what ``generate`` keeps for ``model`` between calls: its session as a target (buffers and captured
    steps), and its KV cache as a draft model or head."""
    _sessions.pop(model, None)
    release_kept(model)
