"""A KV cache that keeps only accepted tree entries, plugged in as an ordinary transformers ``Cache``.

Cache column c of every layer holds the token in column c of the batch's sequence buffer, so rows of
different lengths share one layout: row b is valid in ``[start_b, end_b)`` and whatever lies beyond its
end is masked out. A verification step appends the whole tree after the longest row; ``compact`` then
moves each row's accepted path to the row's own end, so rejected branches cost one write and nothing is
re-prefilled. Buffers are preallocated and grow by doubling, instead of the ``torch.cat`` per step of
``DynamicCache``, which copies the whole cache every token.

A step captured in a CUDA graph needs fixed shapes: ``hold(C)`` keeps the cache's length at C, so every tree
is written to the same columns [C, C + N) and compacted from there (see :mod:`specdec.graphs`), and a step
changes no Python-side state: a pass that is recorded but not run (a failed capture) leaves nothing stale.
A drafter that feeds a tree level by level holds its own cache past the levels already fed (``held_past``),
so they stay visible as the next level's region.
Buffers are zero-filled, since columns below C that no row has reached yet are then read (and masked) too,
and masking does not cancel a NaN that uninitialised memory may hold.

Sliding-window layers keep their full history here; the window is applied by the attention mask, which is
exact, at the cost of memory proportional to the sequence rather than to the window.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import attention


class TreeLayer(DynamicLayer):
    def __init__(self, capacity: int = 256, held: int | None = None):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.held = held  # the held length (see ``TreeCache.hold``): writes go after it and leave it as it is

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_zeros(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self._v = value_states.new_zeros(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.is_initialized = True
        self._set_length(0)
        self.hold(self.held)  # a layer the model first writes to while its cache is held joins the hold

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._k[:, :, :length]
        self.values = self._v[:, :, :length]

    def _reserve(self, length: int) -> None:
        if length <= self._k.shape[2]:
            return
        capacity = self.capacity = max(length, 2 * self._k.shape[2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.length, key_states.shape[-2]
        self._reserve(start + n)
        self._k[:, :, start : start + n] = key_states
        self._v[:, :, start : start + n] = value_states
        if self.held is not None:
            return self._k[:, :, : start + n], self._v[:, :, : start + n]
        self._set_length(start + n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def hold(self, length: int | None) -> None:
        self.held = length
        if length is not None and self.is_initialized:
            self._reserve(length)
            self._set_length(length)

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        if self.is_initialized:
            self._set_length(min(max_length, self.length))

    def compact(self, src: torch.Tensor, dest: torch.Tensor, keep: torch.Tensor) -> None:
        """The reference for ``kernels.compact``: columns ``src[b, :keep[b]]`` to ``dest[b], dest[b] + 1, ...``;
        it also writes the columns past ``keep[b]`` (with whatever ``src`` names there), which lie beyond the
        row's new end, where attention never looks."""
        dest_cols = dest[:, None] + torch.arange(src.shape[1], device=src.device)
        for buf in (self._k, self._v):
            b, h, _, d = buf.shape
            gathered = buf.gather(2, src[:, None, :, None].expand(b, h, -1, d))
            buf.scatter_(2, dest_cols[:, None, :, None].expand(b, h, -1, d), gathered)


class TreeCache(Cache):
    """One :class:`TreeLayer` per attention layer, created as the model first writes to it."""

    def __init__(self, capacity: int = 256):
        super().__init__(layer_class_to_replicate=lambda: TreeLayer(capacity, self.held))
        self.held: int | None = None
        self._tables: tuple | None = None  # (the buffers' addresses, ``_address_tables``' answer for them)
        # (B,) one past each row's last cached column, for a cache whose rows end apart from the sequences'
        # (a drafter's, ``session.Kept``); kept with the cache so that it stays where a captured step recorded it.
        self.ends: torch.Tensor | None = None

    @classmethod
    def from_dynamic(cls, cache: DynamicCache, capacity: int) -> "TreeCache":
        """Copy a caller's prefilled ``DynamicCache`` so the caller's object is never modified."""
        tree_cache = cls(capacity)
        for layer in cache.layers:
            tree_layer = TreeLayer(max(capacity, layer.get_seq_length()))
            if layer.is_initialized and layer.keys.numel():
                tree_layer.update(layer.keys, layer.values)
            tree_cache.layers.append(tree_layer)
        return tree_cache

    def compact(self, src: torch.Tensor, dest: torch.Tensor, keep: torch.Tensor) -> None:
        """Move ``keep[b]`` columns ``src[b, :keep[b]]`` of each row to ``dest[b], dest[b] + 1, ...``, in every
        layer. Unless the cache is held, it is then cropped to the longest row (a read of the device).

        On CUDA a Triton kernel copies exactly the kept columns, once, with one launch for all layers of one
        geometry (``kernels.compact``)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return
        if attention.use_kernel(layers[0]._k.device, layers[0]._k.shape[-1]):
            from specdec.kernels.compact import compact

            for table, k, v in self._address_tables(layers):
                compact(table, k, v, src, dest, keep)
        else:
            for layer in layers:
                layer.compact(src, dest, keep)
        if self.held is None:
            length = int((dest + keep).max())
            for layer in layers:
                layer._set_length(length)

    def _address_tables(self, layers: list[TreeLayer]) -> list[tuple]:
        """(addresses, one K buffer, one V buffer) per group of layers whose buffers share shape, strides
        and dtype: usually one. Remade only when a buffer has moved, which never happens in a captured step
        (the step is keyed by the buffers' sizes, and its first run is eager)."""
        addresses = tuple(x.data_ptr() for x in self.tensors())
        if self._tables is None or self._tables[0] != addresses:
            from specdec.kernels.compact import address_table

            groups: dict = {}
            for layer in layers:
                geometry = tuple((x.shape, x.stride(), x.dtype) for x in (layer._k, layer._v))
                groups.setdefault(geometry, []).append(layer)
            self._tables = addresses, [
                (address_table([(layer._k, layer._v) for layer in group]), group[0]._k, group[0]._v)
                for group in groups.values()
            ]
        return self._tables[1]

    def hold(self, length: int | None) -> None:
        """Keep the length at ``length`` (past every row's end) from now on, in layers the model has not
        written to yet too; None lets it follow the rows again, from there."""
        self.held = length
        for layer in self.layers:
            layer.hold(length)

    @contextlib.contextmanager
    def held_past(self, fed: int):
        """Inside the block the held cache writes ``fed`` columns further on, so that nodes fed at earlier
        levels of a drafted tree stay visible to the next; after it (also when it raises, as a failed capture
        does) the held length is back."""
        held = self.held
        self.hold(held + fed)
        try:
            yield
        finally:
            self.hold(held)

    def reset(self) -> None:
        """Empty and not held, as new, with every buffer where it was (a step captured in an earlier call
        recorded them). Zeroed too, as new buffers are (see the module's docstring)."""
        self.hold(None)
        for layer in self.layers:
            if layer.is_initialized:
                layer._k.zero_()
                layer._v.zero_()
                layer._set_length(0)
        if self.ends is not None:
            self.ends.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer a step reads or writes through this cache."""
        found = [x for layer in self.layers if layer.is_initialized for x in (layer._k, layer._v)]
        return found + ([self.ends] if self.ends is not None else [])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The held length, before any layer exists too (a drafter's cache with no prompt to prefill)."""
        return self.held if self.held is not None else super().get_seq_length(layer_idx)

    @property
    def capacity(self) -> int:
        """Columns the layers have room for: they grow together, and only growing moves their buffers."""
        return self.layers[0].capacity if self.layers else 0
