"""N-gram prompt lookup: continue the sequence the way it continued after an earlier match of its tail."""

from __future__ import annotations

import torch

from ..sequences import Sequences
from ..tree import Tree
from .base import Drafter, require_positive


class PromptLookup(Drafter):
    """Drafts the tokens that followed earlier occurrences of the last n tokens.

    Tries n from ``max_ngram`` down to ``min_ngram`` and takes up to ``tree_width`` distinct continuations
    of up to ``num_draft_tokens`` tokens, the longest first and among those the most recent, merged into one
    tree. No model runs; the drafts are deterministic, so sampling stays lossless through point-mass
    proposals.
    """

    def __init__(self, num_draft_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1, tree_width: int = 1):
        require_positive(num_draft_tokens=num_draft_tokens, max_ngram=max_ngram, min_ngram=min_ngram, tree_width=tree_width)
        if min_ngram > max_ngram:
            raise ValueError(f"`min_ngram` ({min_ngram}) must not exceed `max_ngram` ({max_ngram}).")
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tree_width = tree_width

    def _continuations(self, row: torch.Tensor) -> list[list[int]]:
        found: list[list[int]] = []
        length = row.shape[0]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            windows = row[:-1].unfold(0, n, 1)  # windows ending before the last token
            starts = (windows == row[-n:]).all(-1).nonzero().flatten() + n  # ascending
            # A match just before the tail has little after it: full-length continuations first, latest first,
            # then the shorter ones, longest (earliest) first.
            full = starts <= length - self.num_draft_tokens
            for start in torch.cat([starts[full].flip(0), starts[~full]]).tolist():
                cont = row[start : start + self.num_draft_tokens].tolist()
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == self.tree_width:
                        return found
        return found

    def propose(self, seqs: Sequences) -> Tree:
        paths = [[] if seqs.finished[b] else self._continuations(seqs.row(b)) for b in range(seqs.start.shape[0])]
        return Tree.from_paths(seqs.last, paths)
