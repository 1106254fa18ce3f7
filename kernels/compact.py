"""Move each row's accepted tree path to the row's end in the KV cache of every layer, in one launch.

After verification the cache holds the whole tree after the longest row; only the accepted path
survives. Each program owns one (layer, row, KV head) and copies ``keep[b]`` entries ``src[b, i] ->
dest[b] + i`` for K and V directly: rejected branches are never read, entries already in place are
skipped, and nothing goes through a temporary. Copies move left (``dest[b] + i <= src[b, i]``, with
``src`` increasing along the path), so in ascending order no entry is overwritten before it is read.

The layers' buffers are separate tensors; the kernel reads their addresses from a table and copies
bytes, so one launch serves every layer of one geometry whatever its dtype. A launch per layer
cost an 8B-shaped model's verification step 32 kernels and the gaps between them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specdec.kernels import launch


@triton.jit(do_not_specialize=["stride_src_b"])
def _compact(
    Buffers, Src, Dest, Keep,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_src_b, n_kv_heads, batch,
    ROW_BYTES: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = pid // (batch * n_kv_heads)
    b = ((pid // n_kv_heads) % batch).to(tl.int64)
    h = (pid % n_kv_heads).to(tl.int64)
    byte = tl.arange(0, BLOCK)
    in_row = byte < ROW_BYTES
    dest = tl.load(Dest + b)
    k_base = tl.load(Buffers + 2 * layer).to(tl.pointer_type(tl.uint8)) + b * stride_kb + h * stride_kh + byte
    v_base = tl.load(Buffers + 2 * layer + 1).to(tl.pointer_type(tl.uint8)) + b * stride_vb + h * stride_vh + byte
    for i in range(tl.load(Keep + b)):
        src = tl.load(Src + b * stride_src_b + i)
        if src != dest + i:
            tl.store(k_base + (dest + i) * stride_kn, tl.load(k_base + src * stride_kn, mask=in_row), mask=in_row)
            tl.store(v_base + (dest + i) * stride_vn, tl.load(v_base + src * stride_vn, mask=in_row), mask=in_row)


def address_table(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The (layers, 2) addresses of each layer's K and V buffers, on their device: ``compact``'s first
    argument. Made once per set of buffers (a copy from the host, which a captured step may not do)."""
    return torch.tensor([[k.data_ptr(), v.data_ptr()] for k, v in buffers], dtype=torch.int64,
                        device=buffers[0][0].device)


def compact(table: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dest: torch.Tensor,
            keep: torch.Tensor) -> None:
    """In place on the cache buffers in ``table`` (see ``address_table``), each shaped and strided as ``k``
    and ``v`` (B, H, L, D): for each row b and ``i < keep[b]``, column ``dest[b] + i`` takes column ``src[b, i]``."""
    batch, heads, _, head_dim = k.shape
    size = k.element_size()
    if k.stride(-1) != 1 or v.stride(-1) != 1 or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError("compact: `k` and `v` must have one shape and dtype, contiguous in their last dimension.")
    row_bytes = head_dim * size
    launch(
        _compact, (table.shape[0] * batch * heads,),
        table, src, dest, keep,
        *(s * size for s in k.stride()[:3]), *(s * size for s in v.stride()[:3]), src.stride(0), heads, batch,
        ROW_BYTES=row_bytes, BLOCK=max(16, triton.next_power_of_2(row_bytes)),
    )
