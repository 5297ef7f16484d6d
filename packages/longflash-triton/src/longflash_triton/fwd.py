# Forward: out = softmax(mask(softcap(scale * Q K^T))) V and lse = row log-sum-exp (natural log).
# Tile BM x BN, Q block resident; K/V streamed once per Q block (pointers or TMA descriptors).
# Target: any GPU Triton supports (sm80+, ROCm) and the interpreter; TMA + WS paths on sm90.
"""Forward kernel: one program per (query block, batch * query head)."""

from __future__ import annotations

import triton
import triton.language as tl

from longflash_triton.tiles import LN2, band_blocks, band_mask, dot, load_tile, scores


@triton.jit
def _finite_max(m, MASKED: tl.constexpr):
    # A row that has seen nothing keeps m = -inf (so that later blocks rescale it by 0);
    # its exponents subtract 0 instead, so that -inf - -inf never makes a NaN. Mask-free
    # blocks give every row a finite score, so they skip the select.
    if MASKED:
        return tl.where(m == float("-inf"), 0.0, m)
    else:
        return m


@triton.jit
def _fwd_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    b,
    hk,
    skn,
    svn,
    k_offs,
    v_offs,
    offs_m,
    len_q,
    len_k,
    n_lo,
    n_hi,
    win_left,
    win_right,
    qk_scale,
    cap2,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FOLD_MAX: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [n_lo, n_hi); element masks only when MASKED."""
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    off = len_k - len_q
    for n0 in tl.range(n_lo, n_hi, BN, num_stages=STAGES, warp_specialize=WS):
        if TMA:
            k = k_desc.load([b, n0, hk, 0]).reshape(BN, BD)
        else:
            k = load_tile(
                k_base + tl.cast(n0, tl.int64) * skn + k_offs,
                offs_n,
                len_k - n0,
                offs_d,
                HEAD_D,
                BD,
                MASKED,
            )
        qk = dot(q, tl.trans(k), None, UPCAST, PRECISION)
        if MASKED:
            vis = band_mask(
                offs_m[:, None],
                n0 + offs_n[None, :],
                len_k,
                off,
                win_left,
                win_right,
                HAS_LEFT,
                HAS_RIGHT,
            )
        if FOLD_MAX:
            # scale > 0 and no softcap: the max commutes with the scale, so the exponent
            # is one FMA per score (qk * qk_scale - m).
            if MASKED:
                qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = _finite_max(m_new, MASKED)
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        else:
            x, _ = scores(qk, qk_scale, cap2, SOFTCAP)
            if MASKED:
                x = tl.where(vis, x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = _finite_max(m_new, MASKED)
            p = tl.math.exp2(x - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = v_desc.load([b, n0, hk, 0]).reshape(BN, BDV)
        else:
            v = load_tile(
                v_base + tl.cast(n0, tl.int64) * svn + v_offs,
                offs_n,
                len_k - n0,
                offs_dv,
                HEAD_DV,
                BDV,
                MASKED,
            )
        acc = dot(p.to(v.dtype), v, acc, UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    CU_Q,
    CU_K,
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sob,
    son,
    soh,
    slb,
    slh,
    Nq,
    Nk,
    Hq,
    GROUP,
    win_left,
    win_right,
    qk_scale,
    cap2,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FOLD_MAX: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Heaviest query blocks (most keys under a causal mask) first: shorter tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
        k_row0 = k_start.to(tl.int64)
    else:
        q_start = 0
        len_q = Nq
        len_k = Nk
        k_row0 = 0
    m0 = pid_m * BM
    if VARLEN:  # the grid covers the longest sequence; shorter ones stop early
        if m0 >= len_q:
            return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    # 64-bit scalar bases, 32-bit offsets inside a tile.
    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh + (q_start + m0).to(tl.int64) * sqn
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_row0 * skn
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_row0 * svn
    k_offs = offs_n[:, None] * skn + offs_d[None, :]
    v_offs = offs_n[:, None] * svn + offs_dv[None, :]

    if TMA:
        q = q_desc.load([b, m0, h, 0]).reshape(BM, BD)
    else:
        q = load_tile(
            q_base + tl.arange(0, BM)[:, None] * sqn + offs_d[None, :],
            tl.arange(0, BM),
            len_q - m0,
            offs_d,
            HEAD_D,
            BD,
            True,
        )

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    n0, n1, n2, n3 = band_blocks(m0, BM, len_q, len_k, win_left, win_right, HAS_LEFT, HAS_RIGHT, BN)
    # Masked edge, mask-free middle, masked edge; unrolled at compile time, so each segment
    # is its own loop and the middle one carries no element mask. Without a left window
    # side (causal) the first edge is empty and compiled out.
    for seg in tl.static_range(3):
        if seg != 0 or HAS_LEFT:
            if seg == 0:
                lo, hi = n0, n1
            elif seg == 1:
                lo, hi = n1, n2
            else:
                lo, hi = n2, n3
            acc, l_i, m_i = _fwd_blocks(
                acc,
                l_i,
                m_i,
                q,
                k_base,
                v_base,
                k_desc,
                v_desc,
                b,
                hk,
                skn,
                svn,
                k_offs,
                v_offs,
                offs_m,
                len_q,
                len_k,
                lo,
                hi,
                win_left,
                win_right,
                qk_scale,
                cap2,
                BN,
                BD,
                BDV,
                HEAD_D,
                HEAD_DV,
                seg != 1,
                HAS_LEFT,
                HAS_RIGHT,
                SOFTCAP,
                FOLD_MAX,
                TMA,
                WS and seg == 1,
                STAGES,
                UPCAST,
                PRECISION,
            )

    # Rows that saw no key (l = 0): out = 0 and lse = -inf, without dividing by 0.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    rows = tl.arange(0, BM)
    tl.store(LSE + b64 * slb + h.to(tl.int64) * slh + q_start + offs_m, lse, mask=offs_m < len_q)
    if TMA:
        o_desc.store([b, m0, h, 0], out.to(Out.dtype.element_ty).reshape(1, BM, 1, BDV))
    else:
        o_base = Out + b64 * sob + h.to(tl.int64) * soh + (q_start + m0).to(tl.int64) * son
        o_ptrs = o_base + rows[:, None] * son + offs_dv[None, :]
        if HEAD_DV == BDV:
            o_mask = rows[:, None] < len_q - m0
        else:
            o_mask = (rows[:, None] < len_q - m0) & (offs_dv[None, :] < HEAD_DV)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
