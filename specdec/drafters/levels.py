"""How a drafter with a model of its own (a draft model, an EAGLE head) runs it in each step, without reading
the device: first over what the last verification accepted, then over the tree it drafts, level by level.

The drafter's cache holds exactly the row's accepted inputs and is held at the sequence limit (``TreeCache``),
so each level's nodes go past that length and are dropped after the step: nothing is rolled back. A level's
nodes see the cached prefix, and among the nodes fed before them only their own ancestors.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..cache import TreeCache
from ..forward import Prefix


def catch_up(run: Callable, cache: TreeCache, start: torch.Tensor, end: torch.Tensor, span: int,
             inputs: Callable[[torch.Tensor], torch.Tensor]):
    """Feed each row's inputs for cache columns ``[cache.ends, end)``, at most ``span`` of them (as many as a
    step can accept), and keep them: ``inputs(cols)`` gives the inputs at columns ``cols`` (B, span), which may
    lie past the end; ``run(inputs, count, prefix)`` runs ``forward.extend_chains`` on the drafter's model.
    Returns ``run``'s output and each row's last fed index (B, 1), for the root's prediction."""
    cached_end = cache.ends
    count = end - cached_end
    cols = cached_end[:, None] + torch.arange(span, device=end.device)
    out = run(inputs(cols), count, Prefix(start, cached_end))
    cached_end.copy_(end)
    return out, (count - 1).clamp(min=0)[:, None]


def resync(run: Callable, cache: TreeCache, start: torch.Tensor, end: Callable[[], torch.Tensor], span: int,
           inputs: Callable[[torch.Tensor], torch.Tensor], replay: Callable[[Callable], object]) -> int:
    """``catch_up`` to column ``end()`` (B,) however far behind the cache is, in passes of ``span`` columns: the
    shape the step's own catch-up runs (compiled once, and with room in the cache past its held length).
    Rows already there are left as they are. Reads the device once, for the number of passes; each pass reads
    nothing, and ``end()`` computes the columns from the sequences' own buffers, so ``replay(one_pass)`` may
    run it from a captured graph. Returns the passes run."""
    def one_pass():
        target = torch.minimum(end(), cache.ends + span)
        return catch_up(run, cache, start, torch.maximum(cache.ends, target), span, inputs)

    passes = max(-(-int((end() - cache.ends).max()) // span), 0)
    for _ in range(passes):
        replay(one_pass)
    return passes


class Levels:
    """Feeds a drafted tree level by level past a held cache (``TreeCache.held_past``), so the nodes of earlier
    levels stay visible to later ones. ``root`` (B, 1) is the root's position, ``prefix`` what each row's
    nodes see of the cache."""

    def __init__(self, run: Callable, cache: TreeCache, prefix: Prefix, root: torch.Tensor):
        self.run, self.cache, self.prefix, self.root = run, cache, prefix, root
        batch = root.shape[0]
        self.seen = torch.zeros(batch, 0, 0, dtype=torch.bool, device=root.device)  # fed node i sees fed node j
        self.positions: list[torch.Tensor] = []
        self.last = 0  # where the last level's nodes start among the fed ones

    def feed(self, inputs: torch.Tensor, parents: torch.Tensor | None):
        """Feed the next level's nodes ``inputs`` (B, F, ...), children of the last level's nodes ``parents``
        (B, F) (None: of the root); returns ``run(inputs, positions, prefix, visible, fed positions)``."""
        fed = self.seen.shape[1]
        batch, width = inputs.shape[:2]
        inherited = (self.seen.new_zeros(batch, width, fed) if parents is None
                     else self.seen.gather(1, (self.last + parents)[..., None].expand(-1, -1, fed)))
        own = torch.eye(width, dtype=torch.bool, device=inputs.device).expand(batch, -1, -1)
        visible = torch.cat([inherited, own], -1)
        self.seen = torch.cat([F.pad(self.seen, (0, width)), visible], 1)
        # Contiguous: a compiled drafter's graphs are specialised on strides, and the verifier's are dense.
        self.positions.append((self.root + len(self.positions) + 1).expand(-1, width).contiguous())
        self.last = fed
        with self.cache.held_past(fed):
            return self.run(inputs, self.positions[-1], self.prefix, visible, torch.cat(self.positions, 1))
