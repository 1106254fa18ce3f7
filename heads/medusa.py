"""Medusa heads: K residual blocks over the target's last feature, head k predicting the token k+1 places
past the one the target's LM head predicts, all read out through the target's own LM head.

The drafter turns the heads' top-k tokens into a tree: the Cartesian product of ``top_k[k]`` choices at
depth k+1, or a sparse ``tree`` of index paths (Medusa's "choices": ``(0, 1)`` is head 1's best token
followed by head 2's second best). The tree's shape is fixed, so it is built once and only its tokens
change per step. When sampling, each node's token is instead an independent draw from its head's
distribution (warped as the target's is), so siblings are i.i.d. and verify by min(1, p/q).
"""

from __future__ import annotations

import collections
import itertools

import torch
from torch import nn

from specdec.drafters.base import Drafter, require_positive
from specdec.sampling import top_k
from specdec.sequences import Sequences
from specdec.tree import Tree

from .target import Borrowed, check_device, check_fingerprint, feature_size, fingerprint


class ResBlock(nn.Module):
    """x + SiLU(W x + b), with W = 0 at initialisation so an untrained head starts as the identity."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    kind = "medusa"

    def __init__(self, target, num_heads: int = 4, num_layers: int = 1):
        super().__init__()
        require_positive(num_heads=num_heads, num_layers=num_layers)
        size = feature_size(target)
        self.options = {"num_heads": num_heads, "num_layers": num_layers}
        self.target_fingerprint = fingerprint(target)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(size) for _ in range(num_layers))) for _ in range(num_heads)
        )
        self.lm_head = Borrowed(target.get_output_embeddings())
        self.to(target.device, target.dtype)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (..., H) -> logits (..., K, V); head k predicts the token k + 2 places after the feature's."""
        return self.lm_head(torch.stack([block(features) for block in self.blocks], dim=-2))


def cartesian_paths(top_k) -> list[tuple[int, ...]]:
    """Every combination of the first ``top_k[d]`` choices at each depth, as index paths."""
    paths = []
    for depth in range(1, len(top_k) + 1):
        paths += itertools.product(*(range(k) for k in top_k[:depth]))
    return paths


class Medusa(Drafter):
    wants_features = True
    drafts_in_step = True
    forwards_per_step = 1  # one pass of the heads

    def __init__(self, heads: MedusaHeads, top_k=None, tree=None):
        if top_k is not None and tree is not None:
            raise ValueError("Pass `top_k` (a Cartesian tree) or `tree` (index paths), not both.")
        if tree is None:
            top_k = tuple(top_k) if top_k is not None else (3, 2, 2, 1)[: heads.num_heads]
            require_positive(**{f"top_k[{i}]": k for i, k in enumerate(top_k)})
            tree = cartesian_paths(top_k)
        tree = sorted({tuple(p) for p in tree}, key=lambda p: (len(p), p))
        for path in tree:
            if not path or len(path) > heads.num_heads or min(path) < 0 or (len(path) > 1 and path[:-1] not in tree):
                raise ValueError(
                    f"`tree` path {path} is invalid: paths are non-empty tuples of top-k indices, at most "
                    f"{heads.num_heads} long (one per head), and every prefix of a path must be a path too."
                )
        self.heads = heads
        index = {path: i + 1 for i, path in enumerate(tree)}
        self.parents = torch.tensor([-1] + [index.get(p[:-1], 0) for p in tree])
        self.depths = torch.tensor([0] + [len(p) - 1 for p in tree])  # which head drafts each node
        self.ranks = torch.tensor([0] + [p[-1] for p in tree])
        self.k = max(p[-1] for p in tree) + 1
        self.max_depth = max(len(p) for p in tree)
        self.max_children = max(collections.Counter(p[:-1] for p in tree).values())
        self.fixed_nodes = len(tree) + 1
        self.paths = tuple(tree)

    def check(self, target) -> None:
        check_fingerprint(self.heads.target_fingerprint, target, "These Medusa heads")
        check_device(self.heads, target)

    @property
    def owner(self):
        return self.heads

    def settings(self) -> tuple:
        return self.paths

    def begin(self, target, seqs: Sequences, sampling) -> None:
        """The tree's layout goes to the device before the first step (a copy from the host cannot be
        captured), once per session: steps captured in an earlier call replay reading it where it is."""
        super().begin(target, seqs, sampling)
        self.layout = self.kept_state().get(("layout", self.paths), lambda: tuple(
            x.to(seqs.end.device) for x in (self.parents, self.depths, self.ranks)))
        self.stepping = self.compiled(self.heads)

    @torch.no_grad()
    def propose(self, seqs: Sequences) -> Tree:
        batch, dev = seqs.end.shape[0], seqs.end.device
        rows = torch.arange(batch, device=dev)
        # The feature that predicted the root: the target's last hidden state before it.
        feature = seqs.features[rows, (seqs.end - 2).clamp(min=0)]
        logits = self.stepping(feature)  # (B, K, V)
        parents, depths, ranks = self.layout
        parents = parents.expand(batch, -1)
        if not self.sampling.do_sample:
            tokens = top_k(logits, self.k)[1][:, depths, ranks]
            tokens[:, 0] = seqs.last
            return Tree.drafted(tokens, parents, seqs.finished, None, self.max_depth, self.max_children)
        # Head d drafts depth d + 1, predicted at a parent d tokens past the root, as the target would predict it.
        ahead = torch.arange(logits.shape[1], device=dev)
        q = self.sampling.probs(logits, seqs.generated[:, None] + ahead, seqs.end[:, None] + ahead)[:, depths]
        tokens = self.sampling.children(q, 1)[..., 0]
        tokens[:, 0] = seqs.last
        q[:, 0] = 0
        return Tree.drafted(tokens, parents, seqs.finished, q, self.max_depth, self.max_children)
