"""Tree attention: T drafted nodes attend to their row's cached prefix and to their own tree ancestors.

Exact softmax attention without a mask tensor. Keys of a row come in two parts:

- the *prefix*, cache columns ``[start_b, end_b)`` at positions ``column - start_b``, which every node sees
  (within the sliding window, if any);
- the *region*, columns ``[region_start, region_start + R)`` at positions ``region_pos``, holding the tree;
  node t sees region column r when bit r of ``bits[b, t]`` is set (its ancestors and itself).

Verification is decode-shaped (T small, prefix long) and memory-bound, so the prefix is split across
programs (flash-decoding): each program streams one chunk of K and V once for all query heads of a KV
group and all T nodes, keeps an online softmax in fp32, and writes an unnormalised partial; the region is
one more split; a second kernel merges the partials. The packed visibility bitmask is built once per step
and shared by every layer. Integer arguments that change from step to step (T, lengths, strides that
depend on T) are not specialised on, so a long generation compiles each kernel once, not per value class.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from specdec.kernels import launch

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k_t, v, visible, qk_scale, softcap,
                         SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one (BLOCK_M, BLOCK_N) block of scores into the running max, sum and output (base-2 exps)."""
    s = tl.dot(q, k_t, input_precision=PRECISION)
    if SOFTCAP:
        s = s * (qk_scale / 1.4426950408889634) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0)) * 1.4426950408889634
    else:
        s = s * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_qb", "stride_pos_b", "stride_rpos_b", "stride_bits_b", "stride_bits_t",
                               "T", "R", "region_start", "chunk", "n_prefix_splits", "window"])
def _tree_attention_partial(
    Q, K, V, Start, End, QPos, RPos, Bits, Acc, Max, Sum,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pos_b, stride_rpos_b, stride_bits_b, stride_bits_t,
    T, R, region_start, chunk, n_prefix_splits, n_kv_heads, qk_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    # Row blocks of one (split, KV head) are neighbours in launch order, so they read its K/V chunk while
    # it is in L2: HBM sees each chunk once however many row blocks the nodes need.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // n_kv_heads).to(tl.int64)
    h = (bh % n_kv_heads).to(tl.int64)
    row_ok = rows < GROUP * T
    g = rows // T
    t = rows % T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.load(QPos + b * stride_pos_b + t, mask=row_ok, other=0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if split < n_prefix_splits:
        start = tl.load(Start + b)
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, tl.load(End + b))
        if WINDOW:  # columns left of every node's window are never read
            lo = tl.maximum(lo, start + tl.min(tl.where(row_ok, q_pos, 1 << 40), 0) - window + 1)
        for c0 in range(lo, hi, BLOCK_N):
            cols = c0 + n
            col_ok = cols < hi
            k_t = tl.load(k_base + cols[None, :] * stride_kn + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            visible = col_ok[None, :]
            if WINDOW:
                visible = visible & (q_pos[:, None] - (cols - start)[None, :] < window)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, visible, qk_scale, softcap,
                                                 SOFTCAP, PRECISION)
    else:
        for r0 in range(0, R, BLOCK_N):
            r = r0 + n
            r_ok = r < R
            cols = region_start + r
            k_t = tl.load(k_base + cols[None, :] * stride_kn + d[:, None], mask=r_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            words = tl.load(Bits + b * stride_bits_b + t[:, None] * stride_bits_t + (r // 32)[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0)
            visible = ((words >> (r % 32)[None, :]) & 1) != 0
            if WINDOW:
                k_pos = tl.load(RPos + b * stride_rpos_b + r, mask=r_ok, other=0)
                visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, visible, qk_scale, softcap,
                                                 SOFTCAP, PRECISION)

    part = (bh * (n_prefix_splits + 1) + split).to(tl.int64) * (GROUP * T) + rows
    tl.store(Acc + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Max + part, m_i, mask=row_ok)
    tl.store(Sum + part, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["stride_ob", "T", "n_splits"])
def _tree_attention_merge(
    Acc, Max, Sum, Out, stride_ob, stride_ot, stride_oh, T, n_splits, n_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per output row (b, query head, node), merging its splits BLOCK_S at a time, so the
    merge is as parallel as the output instead of serial over splits."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)
    h = (bh % n_kv_heads).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    splits = tl.arange(0, BLOCK_S)
    base = bh.to(tl.int64) * n_splits * (GROUP * T) + row

    m_run = tl.full((1,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + splits < n_splits
        part = base + (s0 + splits) * (GROUP * T)
        m_s = tl.load(Max + part, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m_s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m_s - m_use)
        alpha = tl.exp2(m_run - m_use)
        total = total * alpha + tl.sum(w * tl.load(Sum + part, mask=s_ok, other=0.0), 0)
        acc_s = tl.load(Acc + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_s, 0)
        m_run = m_new
    g = row // T
    t = row % T
    tl.store(Out + b * stride_ob + t * stride_ot + (h * GROUP + g) * stride_oh + d,
             (acc / total).to(Out.dtype.element_ty), mask=d_ok)


def pack_visibility(visible: torch.Tensor) -> torch.Tensor:
    """(B, T, R) bool -> (B, T, ceil(R / 32)) int32 words; bit r % 32 of word r // 32 is column r."""
    batch, t, r = visible.shape
    words = triton.cdiv(r, 32)
    padded = torch.nn.functional.pad(visible, (0, words * 32 - r)).view(batch, t, words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=visible.device) << torch.arange(32, device=visible.device)
    packed = (padded.to(torch.int64) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


# How the prefix is split (``benchmarks/tree_attention.py --sweep --splits``; docs/history/notes.md): into as many
# chunks as fill WAVES waves of programs, the region's program included, each of at least MIN_CHUNK columns.
# A verification step is latency-bound: a program's fixed cost (about 5 µs on an H100) outweighs its share of
# a few thousand columns, so every multiprocessor should get a program, and one program more than a wave costs
# a second wave. H100, bf16, 8 KV heads, graph-timed: P=4k, T=16 took 16.1 µs at 15 splits per KV head,
# 26.3 µs at 16 (two waves) and 18.2 µs under the former rule (4 waves, but chunks of at least 512: 8 splits);
# P=4k, T=64: 32 against 63 µs; P=32k, T=16: 59 against 84 µs.
WAVES = 1
MIN_CHUNK = 64


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def prefix_split(region_start: int, heads: int, block_n: int, device: torch.device,
                 num_splits: int | None = None) -> tuple[int, int]:
    """(columns per prefix program, prefix programs) for ``heads`` (row, KV head, row block) triples:
    ``num_splits`` chunks, or by default as many as WAVES and MIN_CHUNK allow; chunks are whole blocks."""
    if num_splits is None:
        wave = WAVES * _multiprocessors(device) // heads
        num_splits = max(1, min(wave - 1, triton.cdiv(region_start, MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(max(region_start, 1), num_splits), block_n) * block_n
    return chunk, triton.cdiv(region_start, chunk)


def launch_config(head_dim: int, rows: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for ``rows`` = query heads per KV head x nodes, from sweeps on an
    H200 and an H100 (``benchmarks/tree_attention.py --sweep``; docs/history/notes.md). Blocks are at least 16, the smallest
    ``tl.dot`` on a GPU; wide heads and fp32 get smaller row blocks to stay within registers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, min(128 if block_d <= 128 and dtype != torch.float32 else 64, triton.next_power_of_2(rows)))
    return dict(
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=64 if block_d <= 128 else 32,
        num_warps=8 if block_m >= 128 else 4,
    )


def pipeline_stages(blocks: int) -> int:
    """Loads in flight for a program that reads ``blocks`` blocks of its chunk. Each stage adds a fixed cost
    that only a long loop pays back (H100, bf16, T=16, graph-timed: 1 block per program 10.2 µs with 1 stage,
    16.4 µs with 3; 3 blocks 15.0 µs with 2, 16.5 with 3; 5 blocks 16.8 µs with 3, 19.6 with 1 or 2)."""
    return min(3, max(1, blocks - 1))


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    region_start: int,
    bits: torch.Tensor,
    q_pos: torch.Tensor,
    region_pos: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of tree nodes ``q`` (B, Hq, T, D) over cache ``k``, ``v`` (B, Hkv, L, D); returns
    (B, T, Hq, D), the layout transformers' attention functions return.

    ``start``/``end`` (B,) bound each row's prefix; ``region_start`` is the first region column;
    ``bits`` = :func:`pack_visibility` of the (B, T, R) region visibility; ``q_pos`` (B, T) and
    ``region_pos`` (B, R) are positions, used only by a sliding ``window`` (key seen when
    ``q_pos - k_pos < window``). ``softcap`` applies ``c * tanh(s / c)`` to scaled scores (Gemma2).
    ``num_splits`` fixes how many programs share a prefix; by default WAVES and MIN_CHUNK decide. No host
    synchronisation: the split is sized from ``region_start``, an upper bound on every row's prefix end.
    """
    batch, hq, t, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    r = region_pos.shape[1]
    config = launch_config(head_dim, group * t, q.dtype)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    m_blocks = triton.cdiv(group * t, block_m)
    chunk, n_prefix = prefix_split(region_start, batch * hkv * m_blocks, block_n, q.device, num_splits)
    config.setdefault("num_stages", pipeline_stages(chunk // block_n))
    scale = head_dim**-0.5 if scale is None else scale

    parts = batch * hkv * (n_prefix + 1) * group * t
    workspace = torch.empty(parts * (head_dim + 2), dtype=torch.float32, device=q.device)
    acc, m, s = workspace.split([parts * head_dim, parts, parts])
    out = torch.empty(batch, t, hq, head_dim, dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"tree_attention: `{name}` must be contiguous in its last dimension.")

    launch(
        _tree_attention_partial, (m_blocks, n_prefix + 1, batch * hkv),
        q, k, v, start, end, q_pos, region_pos, bits, acc, m, s,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), q_pos.stride(0), region_pos.stride(0), bits.stride(0), bits.stride(1),
        t, r, region_start, chunk, n_prefix, hkv, scale * LOG2E, softcap or 1.0, window or 0,
        GROUP=group, HEAD_DIM=head_dim, WINDOW=window is not None, SOFTCAP=softcap is not None,
        PRECISION=precision, **config,
    )
    launch(
        _tree_attention_merge, (batch * hkv, group * t),
        acc, m, s, out, out.stride(0), out.stride(1), out.stride(2), t, n_prefix + 1, hkv,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"], BLOCK_S=16,
    )
    return out


def reference(q, k, v, start, end, region_start, visible, q_pos, region_pos, *, scale=None, window=None,
              softcap=None):
    """The same attention in float64 PyTorch with a dense mask, for tests and benchmarks."""
    batch, hq, t, head_dim = q.shape
    hkv = k.shape[1]
    r = region_pos.shape[1]
    cols = torch.arange(region_start, device=q.device)
    prefix = (cols >= start[:, None]) & (cols < end[:, None])
    mask = torch.cat([prefix[:, None, :].expand(-1, t, -1), visible], -1)
    if window is not None:
        k_pos = torch.cat([cols[None, :] - start[:, None], region_pos], -1)
        mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
    keys = k[:, :, : region_start + r].double().repeat_interleave(hq // hkv, 1)
    values = v[:, :, : region_start + r].double().repeat_interleave(hq // hkv, 1)
    scores = q.double() @ keys.transpose(-1, -2) * (head_dim**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    return (scores.softmax(-1) @ values).transpose(1, 2)
