"""N-gram prompt lookup: continue the sequence the way it continued after an earlier match of its tail.

All fixed-shape tensor work that never reads the device, so drafting can run inside a CUDA graph, in the
same few dozen kernel launches whatever the batch and wherever the matches are."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sequences import Sequences
from ..tree import Tree
from .base import FixedDepth, require_positive


class PromptLookup(FixedDepth):
    """Drafts the tokens that followed earlier occurrences of the last n tokens.

    Tries n from ``max_ngram`` down to ``min_ngram`` and takes up to ``tree_width`` distinct continuations
    of up to ``num_draft_tokens`` tokens, the longest n first and among those the most recent full-length
    continuation, merged into one tree. Duplicates are only looked for among the ``4 * tree_width`` best
    matches, which keeps the work fixed; a long loop of repeats may then leave fewer branches. No model
    runs; the drafts are deterministic, so sampling stays lossless through point-mass proposals.
    """

    drafts_in_step = True

    def __init__(self, num_draft_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1, tree_width: int = 1):
        require_positive(num_draft_tokens=num_draft_tokens, max_ngram=max_ngram, min_ngram=min_ngram, tree_width=tree_width)
        if min_ngram > max_ngram:
            raise ValueError(f"`min_ngram` ({min_ngram}) must not exceed `max_ngram` ({max_ngram}).")
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tree_width = tree_width

    @property
    def fixed_nodes(self) -> int:
        return 1 + self.tree_width * self.num_draft_tokens

    def settings(self) -> tuple:
        return self.num_draft_tokens, self.max_ngram, self.min_ngram, self.tree_width

    def propose(self, seqs: Sequences) -> Tree:
        keys = match_keys(seqs.tokens, seqs.start, seqs.end, self.min_ngram, self.max_ngram, self.num_draft_tokens)
        conts = continuations(seqs.tokens, seqs.end, keys, self.num_draft_tokens, 4 * self.tree_width)
        tree = trie(seqs.last, first_distinct(conts, self.tree_width))
        tree.valid[:, 1:] &= ~seqs.finished[:, None]
        return tree


def match_keys(tokens: torch.Tensor, start: torch.Tensor, end: torch.Tensor, min_ngram: int, max_ngram: int,
               length: int) -> torch.Tensor:
    """(B, C + 1) integers: how good column j is as the start of a continuation, higher first; -1 unless the n
    tokens before j repeat the row's last n for some n in [min_ngram, max_ngram], ending before the last token.

    Larger n first; within one n, columns with ``length`` tokens after them latest first (a match just
    before the tail has little after it), then the shorter ones longest first (``~j`` is ``-1 - j``)."""
    capacity = tokens.shape[1]
    cols = torch.arange(capacity + 1, device=tokens.device)
    before = F.pad(tokens, (max_ngram, 0)).unfold(1, max_ngram, 1).flip(-1)  # (B, C + 1, n): tokens[j - 1], ...
    tail = before.gather(1, end[:, None, None].expand(-1, 1, max_ngram))
    n = (before == tail).cumprod(-1).sum(-1).minimum(cols - start[:, None])
    order = torch.where(cols <= end[:, None] - length, cols, ~cols)
    keys = (n * 2 * capacity + capacity + order).masked_fill_((n < min_ngram) | (cols >= end[:, None]), -1)
    return keys.int() if (2 * max_ngram + 2) * (capacity + 1) < 2**31 else keys  # 32-bit selects faster


def continuations(tokens: torch.Tensor, end: torch.Tensor, keys: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """(B, count, length): the tokens after the ``count`` best columns, best first, -1 past the row's end
    (so equal rows mean equal tokens and length) and throughout where fewer columns match."""
    batch, capacity = tokens.shape
    if keys.shape[1] < count:
        keys = F.pad(keys, (0, count - keys.shape[1]), value=-1)
    best, cols = keys.topk(count, dim=1)
    at = cols[..., None] + torch.arange(length, device=tokens.device)
    found = tokens.gather(1, at.clamp(max=capacity - 1).flatten(1)).view(batch, count, length)
    return found.masked_fill_(at >= ((best >= 0) * end[:, None])[..., None], -1)


def first_distinct(conts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width, K): the first ``width`` non-empty continuations unlike any earlier one, padded with -1."""
    batch, count, length = conts.shape
    later = torch.ones(count, count, dtype=torch.bool, device=conts.device).tril(-1)
    repeated = ((conts[:, :, None] == conts[:, None]).all(-1) & later).any(-1)
    fresh = (conts[..., 0] >= 0) & ~repeated
    # The w-th fresh one is where the running count of fresh ones first reaches w + 1; count if never.
    wanted = torch.arange(1, width + 1, device=conts.device).expand(batch, width).contiguous()
    pick = torch.searchsorted(fresh.cumsum(1), wanted)
    kept = conts.gather(1, pick.clamp(max=count - 1)[..., None].expand(-1, -1, length))
    return kept.masked_fill_((pick == count)[..., None], -1)


def trie(roots: torch.Tensor, chains: torch.Tensor) -> Tree:
    """Chains (B, W, K) of tokens, -1 where absent, as a tree of 1 + W*K nodes: chain c's token at depth d is
    node 1 + c*K + d. Shared prefixes are verified once: a node whose prefix an earlier chain already has is
    invalid, and children hang under the earliest chain with their parent's prefix."""
    batch, width, length = chains.shape
    same = (chains[:, :, None] == chains[:, None]).cumprod(-1)  # (B, W, W, K): same prefix through depth d
    first = same.argmax(2)  # the earliest such chain (argmax takes the first maximum)
    valid = (first == torch.arange(width, device=chains.device)[:, None]) & (chains >= 0)
    parents = F.pad(first * length + torch.arange(1, length + 1, device=chains.device), (1, -1))
    return Tree(
        tokens=torch.cat([roots[:, None], (chains * valid).flatten(1)], 1),
        parents=torch.cat([torch.full_like(roots[:, None], -1), (parents * valid).flatten(1)], 1),
        valid=F.pad(valid.flatten(1), (1, 0), value=True),
        max_depth=length,
        max_children=width,
    )
