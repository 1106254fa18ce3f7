"""One verification step: the target runs once over the drafted tree, each row's accepted path is appended to
its sequence and kept in the cache, and the step's statistics are counted on the device.

The step reads nothing back from the device once the cache is held at a fixed length (``TreeCache.hold``), so
a CUDA graph can capture it whole (:mod:`specdec.graphs`), drafting included for a drafter that drafts in the
step. The acceptance rule itself is :func:`specdec.verify.verify`.
"""

from __future__ import annotations

import functools

import torch

from . import features
from .forward import Prefix, forward_tree
from .sampling import Sampling
from .sequences import Sequences
from .tree import Tree
from .verify import verify


def _new_token_count(acc, sampling: Sampling, room: torch.Tensor) -> torch.Tensor:
    """Accepted tokens each row keeps: cut after the first eos and at ``max_new_tokens``."""
    count = acc.length
    if sampling.eos_token_ids:
        steps = torch.arange(acc.tokens.shape[1], device=count.device)
        is_eos = sampling.is_eos(acc.tokens) & (steps < count[:, None])
        first = torch.where(is_eos, steps, acc.tokens.shape[1]).min(1).values
        count = torch.minimum(count, first + 1)
    return torch.minimum(count, room)


# Counters a step adds up on the device, so that keeping statistics reads nothing back per step. After them,
# ``ACCEPTED_BINS`` more: in how many steps the row furthest behind accepted 0, 1, ... drafted tokens (the last
# bin: that many or more), from which ``speculation="auto"`` predicts what a step buys the call.
COUNTERS = ("steps", "row_steps", "drafted_tokens", "accepted_tokens", "new_tokens")
ACCEPTED_BINS = 16
COUNTER_SIZE = len(COUNTERS) + ACCEPTED_BINS


def keep_accepted(tree: Tree, logits: torch.Tensor, features: torch.Tensor | None, sampling: Sampling,
                  seqs: Sequences, counters: torch.Tensor):
    """``verify_step`` after the target's pass: accept a path per row from ``logits`` (and ``features``, the
    target's hidden states, when a drafter reads them), append it to ``seqs``, count. Returns the path, how
    many of its cache columns each row keeps, the new tokens, and how many of them each row keeps.

    Every write in place and no host reads: dozens of small kernels that ``torch.compile`` fuses into a few."""
    active = ~seqs.finished
    acc = verify(tree, logits, sampling, seqs.generated[:, None] + tree.depth, seqs.end[:, None] + tree.depth)
    count = torch.where(active, _new_token_count(acc, sampling, seqs.stop - seqs.end), 0)
    if features is not None:
        seqs.write_features(seqs.end - 1, features.gather(1, acc.path[..., None].expand(-1, -1, features.shape[-1])), count)
    seqs.append(acc.tokens, count)
    seqs.finished |= (seqs.end >= seqs.stop) | (sampling.is_eos(seqs.last) & (count > 0))
    counters[: len(COUNTERS)] += torch.stack([
        active.any().long(),
        active.sum(),
        (tree.valid[:, 1:] & active[:, None]).sum(),
        torch.where(active, acc.length - 1, 0).sum(),
        count.sum(),
    ])
    # A call ends when its last row does: the row with the fewest tokens after the step, of those still open,
    # sets its pace. Its accepted length is binned; the average row's would credit a large batch with tokens
    # that rows far ahead gain while the call waits for the one behind.
    open_rows = ~seqs.finished
    behind = torch.where(open_rows, seqs.end, seqs.tokens.shape[1]).argmin().reshape(1)
    counters[len(COUNTERS):].index_add_(0, (acc.length[behind] - 1).clamp(max=ACCEPTED_BINS - 1),
                                        open_rows[behind].long())
    return acc.path, torch.where(active, acc.length, 0), acc.tokens, count


def verify_step(model, cache, seqs: Sequences, tree: Tree, sampling: Sampling, counters: torch.Tensor,
                want_features: bool, keep=keep_accepted) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification: the target runs once over ``tree``, each row's accepted path stays in ``cache``
    and is appended to ``seqs``, and ``counters`` (``COUNTER_SIZE``: see ``COUNTERS``) grow. Returns the new
    tokens (B, D) and how many of them each row keeps. ``keep``: ``keep_accepted``, or ``compiled_keep_accepted()``
    to go with a compiled ``model``.

    Every write is in place, and with the cache held at a fixed length (``TreeCache.hold``) nothing reads
    the device, so a CUDA graph can capture the whole step (:mod:`specdec.graphs`). Otherwise the tree goes
    after the cache's current length, which is then cropped to the longest row.
    """
    cache_len = cache.get_seq_length()
    dest = seqs.end - 1
    with features.capture(model, want_features) as captured:
        logits = forward_tree(model, cache, tree, Prefix(seqs.start, dest))
    path, kept, tokens, count = keep(tree, logits, captured[0] if captured else None, sampling, seqs, counters)
    cache.compact(cache_len + path, dest, kept)
    return tokens, count


@functools.cache
def allow_recompiles() -> None:
    """Under ``compile=True`` each batch size and tree shape is a graph of the target's forward, and a draft
    model or EAGLE head of the target's family runs the same transformers code: their frames share Dynamo's
    limit of 8 graphs per frame, past which it silently runs them uncompiled. Raised for the process, once."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def compile_static(fn, mode: str | None = None):
    """``fn`` (a model, a drafter's module, the acceptance) as ``compile=True`` compiles it: a static graph per
    shape (``dynamic=False``), which a CUDA graph can capture. With Dynamo's automatic dynamic shapes a second
    batch size made the batch dimension symbolic, and a third reused that graph."""
    return torch.compile(fn, mode=mode, dynamic=False)


@functools.cache
def compiled_keep_accepted():
    """``keep_accepted`` fused by ``torch.compile``, one per process (made on first use: compiling is lazy,
    but importing Dynamo is not)."""
    return compile_static(keep_accepted)
