"""Move each row's accepted tree path to the row's end in the KV cache, in one pass over the path.

After verification the cache holds the whole tree after the longest row; only the accepted path
survives. Each program owns one (row, KV head) and copies ``keep[b]`` entries ``src[b, i] ->
dest[b] + i`` for K and V directly: rejected branches are never read, entries already in place are
skipped, and nothing goes through a temporary. Copies move left (``dest[b] + i <= src[b, i]``, with
``src`` increasing along the path), so in ascending order no entry is overwritten before it is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_src_b"])
def _compact(
    K, V, Src, Dest, Keep,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_src_b, n_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // n_kv_heads).to(tl.int64)
    h = (bh % n_kv_heads).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    dest = tl.load(Dest + b)
    k_base = K + b * stride_kb + h * stride_kh + d
    v_base = V + b * stride_vb + h * stride_vh + d
    for i in range(tl.load(Keep + b)):
        src = tl.load(Src + b * stride_src_b + i)
        if src != dest + i:
            tl.store(k_base + (dest + i) * stride_kn, tl.load(k_base + src * stride_kn, mask=d_ok), mask=d_ok)
            tl.store(v_base + (dest + i) * stride_vn, tl.load(v_base + src * stride_vn, mask=d_ok), mask=d_ok)


def compact(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dest: torch.Tensor, keep: torch.Tensor) -> None:
    """In place on cache buffers ``k``, ``v`` (B, H, L, D): for each row b and ``i < keep[b]``, column
    ``dest[b] + i`` takes column ``src[b, i]``."""
    batch, heads, _, head_dim = k.shape
    _compact[(batch * heads,)](
        k, v, src, dest, keep,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), src.stride(0), heads,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
