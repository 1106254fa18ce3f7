"""The token tree a drafter proposes and the verifier checks: one representation for every drafter.

Each row of the batch has its own tree. Node 0 is the root: the row's last token, which is not yet in
the target's KV cache. Every other node is a drafted token whose parent comes earlier (``parents[b, i] <
i``), so index order is a topological order and a chain is simply ``parents = [-1, 0, 1, 2, ...]``.
Rows are padded to a common node count; padding nodes have ``valid = False`` and are never accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # (B, N) long; column 0 is the root
    parents: torch.Tensor  # (B, N) long; parents[:, 0] == -1
    valid: torch.Tensor  # (B, N) bool
    # (B, N, V): the draft distribution node i's token was sampled from. None means every node was chosen
    # deterministically, which the verifier treats as a point mass on the node's token (still lossless).
    draft_probs: torch.Tensor | None = None
    # Static bounds a drafter knows from its configuration: the deepest node's depth and the most children
    # of any node. With them, sampled verification loops a fixed number of times and never reads the device,
    # so it can be captured in a CUDA graph; without them it measures the tree (one host read each).
    max_depth: int | None = None
    max_children: int | None = None

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """(B, N, N) bool: ``ancestors[b, i, j]`` is True when node j is node i or one of its ancestors.

        The reflexive-transitive closure of "is the parent of", by repeated squaring: log2(N) batched
        matmuls, where a walk node by node costs N rounds of small ops (each a kernel launch on a GPU)."""
        n = self.parents.shape[1]
        nodes = torch.arange(n, device=self.parents.device)
        reach = (self.parents[..., None] == nodes) | (nodes[:, None] == nodes)  # paths of length <= 1
        for _ in range((n - 1).bit_length()):
            reach = torch.bmm(reach.float(), reach.float()) > 0  # paths up to twice as long
        return reach

    @cached_property
    def depth(self) -> torch.Tensor:
        """(B, N) long: 0 for the root; a node's position is the root's position plus its depth."""
        return self.ancestors.sum(-1) - 1

    @cached_property
    def children(self) -> torch.Tensor:
        """(B, N, W) long: each node's valid children in index order, padded with -1."""
        batch, n = self.parents.shape
        is_child = (self.parents[:, None, :] == torch.arange(n, device=self.parents.device)[None, :, None])
        is_child &= self.valid[:, None, :]
        width = max(self.max_children if self.max_children is not None else int(is_child.sum(-1).max()), 1)
        # Stable sort puts children first, in index order, which is the order siblings are tried in.
        order = torch.sort((~is_child).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        return torch.where(is_child.gather(-1, order), order, -1)

    @staticmethod
    def drafted(tokens: torch.Tensor, parents: torch.Tensor, finished: torch.Tensor,
                draft_probs: torch.Tensor | None = None, max_depth: int | None = None,
                max_children: int | None = None) -> "Tree":
        """A drafter's full tree per row; rows that finished keep only their root, so nothing is verified."""
        valid = (~finished)[:, None].expand_as(tokens).clone()
        valid[:, 0] = True
        return Tree(tokens=tokens, parents=parents, valid=valid, draft_probs=draft_probs, max_depth=max_depth,
                    max_children=max_children)

    @cached_property
    def shape(self) -> tuple:
        """What fixes the work of verifying this tree: a decoding step captured for one shape replays for
        every tree of the same shape."""
        return (tuple(self.tokens.shape), self.draft_probs is not None, self.max_depth, self.max_children)

    @staticmethod
    def root_only(roots: torch.Tensor) -> "Tree":
        """A tree with no drafted tokens: verification then is one ordinary decoding step."""
        return Tree(
            tokens=roots[:, None].clone(),
            parents=torch.full_like(roots[:, None], -1),
            valid=torch.ones_like(roots[:, None], dtype=torch.bool),
            max_depth=0,
            max_children=0,
        )
