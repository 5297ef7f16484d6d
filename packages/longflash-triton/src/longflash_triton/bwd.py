# Backward: delta = rowsum(dO * O); dK, dV with the K/V block resident (loop over query blocks
# of every query head of its group); dQ with the Q block resident (loop over key blocks).
# Tiles: dK/dV BN keys x BM queries (key- or query-major body), dQ BM queries x BN keys;
# Q/dO, K/V read once per block. Target: any GPU Triton supports (sm80+, ROCm) and the
# interpreter; TMA loads on sm90 (4-D tiles; 2-D maps for the query-major dK/dV body).
"""Backward kernels. Deterministic: every gradient element is written by one program, no
atomics. Scores are recomputed from the base-2 lse written by the preprocess kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from longflash_triton.tiles import LOG2E, band_blocks, band_mask, dot, load_tile, scores


@triton.jit
def attn_bwd_prep(
    Out,
    DO,
    LSE,
    DELTA,
    LSE2,
    sob,
    son,
    soh,
    sdb,
    sdn,
    sdh,
    slb,
    slh,
    N,
    H,
    HEAD_DV: tl.constexpr,
    BM: tl.constexpr,
    BDV: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32; lse2 = lse * log2(e), with -inf (a row that sees
    nothing) turned into +inf so that exp2(x - lse2) is 0 there instead of NaN."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BDV)
    mask = (rows[:, None] < N) & (cols[None, :] < HEAD_DV)
    o = tl.load(
        Out + b * sob + h * soh + rows[:, None].to(tl.int64) * son + cols[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + h * sdh + rows[:, None].to(tl.int64) * sdn + cols[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_ptrs = LSE + b * slb + h * slh + rows
    lse = tl.load(lse_ptrs, mask=rows < N, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(DELTA + b * slb + h * slh + rows, delta, mask=rows < N)
    tl.store(LSE2 + b * slb + h * slh + rows, lse2, mask=rows < N)


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    q_desc,
    do_desc,
    b,
    h,
    sqn,
    sdn,
    lse_base,
    delta_base,
    offs_n,
    len_q,
    len_k,
    m_lo,
    m_hi,
    win_left,
    win_right,
    qk_scale,
    cap2,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TMA: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    QMAJOR: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [m_lo, m_hi).

    Key-major (QMAJOR False): everything is computed transposed (keys x queries), so that
    P^T and dS^T feed the MMAs from registers. Query-major (QMAJOR True): S = Q K^T with
    queries as rows, and the accumulators are dK^T, dV^T (dK^T += Q^T dS, dV^T += dO^T P).
    Why: lse and delta become per-row values (2 registers a thread instead of BM/4 each),
    and every MMA reads both operands from shared memory (K and V resident there, P and dS
    staged there), so no bf16 operand tile stays live in registers while the MMAs run; it
    pays a shared-memory round trip of P and dS (2 x BM x BN x 2 bytes a step)."""
    rows = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_offs = rows[:, None] * sqn + offs_d[None, :]
    do_offs = rows[:, None] * sdn + offs_dv[None, :]
    off = len_q - len_k
    for m0 in tl.range(m_lo, m_hi, BM, num_stages=STAGES):
        if TMA and not QMAJOR:
            q = q_desc.load([b, m0, h, 0]).reshape(BM, BD)
            do = do_desc.load([b, m0, h, 0]).reshape(BM, BDV)
        elif TMA and not MASKED:
            # Query-major reads Q and dO as MMA A operands; from a 4-D tile the reshape would
            # make Triton hoist them into registers, so these are 2-D (B*Nq, H*D) maps. A
            # 2-D box does not stop at a sequence's end: only the mask-free blocks, which
            # lie inside it, use them; the masked ones use the pointer path.
            q = q_desc.load([b * len_q + m0, h * BD])
            do = do_desc.load([b * len_q + m0, h * BDV])
        else:
            q = load_tile(
                q_base + tl.cast(m0, tl.int64) * sqn + q_offs,
                rows,
                len_q - m0,
                offs_d,
                HEAD_D,
                BD,
                MASKED,
            )
            do = load_tile(
                do_base + tl.cast(m0, tl.int64) * sdn + do_offs,
                rows,
                len_q - m0,
                offs_dv,
                HEAD_DV,
                BDV,
                MASKED,
            )
        if MASKED:
            lse2 = tl.load(lse_base + m0 + rows, mask=m0 + rows < len_q, other=float("inf"))
            delta = tl.load(delta_base + m0 + rows, mask=m0 + rows < len_q, other=0.0)
        else:
            lse2 = tl.load(lse_base + m0 + rows)
            delta = tl.load(delta_base + m0 + rows)
        if QMAJOR:
            qk = dot(q, tl.trans(k), None, UPCAST, PRECISION)
            x, t = scores(qk, qk_scale, cap2, SOFTCAP)
            if MASKED:  # rows past len_q have lse2 = +inf, hence P = 0
                vis = band_mask(
                    m0 + rows[:, None],
                    offs_n[None, :],
                    len_k,
                    -off,
                    win_left,
                    win_right,
                    HAS_LEFT,
                    HAS_RIGHT,
                )
                x = tl.where(vis, x, float("-inf"))
            p = tl.math.exp2(x - lse2[:, None])
            dp = dot(do, tl.trans(v), None, UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dv = dot(tl.trans(do), p.to(do.dtype), dv, UPCAST, PRECISION)
            dk = dot(tl.trans(q), ds.to(q.dtype), dk, UPCAST, PRECISION)
        else:
            qk_t = dot(k, tl.trans(q), None, UPCAST, PRECISION)
            x_t, t_t = scores(qk_t, qk_scale, cap2, SOFTCAP)
            if MASKED:
                vis = band_mask(
                    offs_n[:, None],
                    m0 + rows[None, :],
                    len_q,
                    off,
                    win_right,
                    win_left,
                    HAS_RIGHT,
                    HAS_LEFT,
                )
                x_t = tl.where(vis, x_t, float("-inf"))
            p_t = tl.math.exp2(x_t - lse2[None, :])
            dv = dot(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)
            dp_t = dot(v, tl.trans(do), None, UPCAST, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = dot(ds_t.to(q.dtype), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
    q_desc,
    k_desc,
    v_desc,
    do_desc,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sdb,
    sdn,
    sdh,
    sdkb,
    sdkn,
    sdkh,
    sdvb,
    sdvn,
    sdvh,
    slb,
    slh,
    Nq,
    Nk,
    Hk,
    GROUP,
    win_left,
    win_right,
    qk_scale,
    scale,
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
    TMA: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    QMAJOR: tl.constexpr,
):
    """One program per (key block, batch * kv head). GQA: the group's query heads are
    summed in registers here, so dK/dV are written once, without atomics. With QMAJOR the
    accumulators are dK^T and dV^T (see _dkdv_blocks)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
        q_row0 = q_start.to(tl.int64)
    else:
        q_start = 0
        k_start = 0
        len_q = Nq
        len_k = Nk
        q_row0 = 0
    n0 = pid_n * BN
    if VARLEN:  # the grid covers the longest sequence; shorter ones stop early
        if n0 >= len_k:
            return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BN)
    cols = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k_row = (k_start + n0).to(tl.int64)
    if TMA and not QMAJOR:  # query-major keeps K, V in shared memory: no 4-D reshape
        k = k_desc.load([b, n0, hk, 0]).reshape(BN, BD)
        v = v_desc.load([b, n0, hk, 0]).reshape(BN, BDV)
    else:
        k = load_tile(
            K + b64 * skb + hk64 * skh + k_row * skn + cols[:, None] * skn + offs_d[None, :],
            cols,
            len_k - n0,
            offs_d,
            HEAD_D,
            BD,
            True,
        )
        v = load_tile(
            V + b64 * svb + hk64 * svh + k_row * svn + cols[:, None] * svn + offs_dv[None, :],
            cols,
            len_k - n0,
            offs_dv,
            HEAD_DV,
            BDV,
            True,
        )
    if QMAJOR:
        dk = tl.zeros([BD, BN], tl.float32)
        dv = tl.zeros([BDV, BN], tl.float32)
    else:
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BDV], tl.float32)
    # Query blocks that see this key block: the same band with rows and columns swapped.
    m0, m1, m2, m3 = band_blocks(n0, BN, len_k, len_q, win_right, win_left, HAS_RIGHT, HAS_LEFT, BM)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        q_base = Q + b64 * sqb + h64 * sqh + q_row0 * sqn
        do_base = DO + b64 * sdb + h64 * sdh + q_row0 * sdn
        lse_base = LSE2 + b64 * slb + h64 * slh + q_start
        delta_base = DELTA + b64 * slb + h64 * slh + q_start
        for seg in tl.static_range(3):  # query blocks: masked, mask-free, masked
            if seg != 0 or HAS_RIGHT:
                if seg == 0:
                    lo, hi = m0, m1
                elif seg == 1:
                    lo, hi = m1, m2
                else:
                    lo, hi = m2, m3
                dk, dv = _dkdv_blocks(
                    dk,
                    dv,
                    k,
                    v,
                    q_base,
                    do_base,
                    q_desc,
                    do_desc,
                    b,
                    h,
                    sqn,
                    sdn,
                    lse_base,
                    delta_base,
                    offs_n,
                    len_q,
                    len_k,
                    lo,
                    hi,
                    win_left,
                    win_right,
                    qk_scale,
                    cap2,
                    BM,
                    BD,
                    BDV,
                    HEAD_D,
                    HEAD_DV,
                    seg != 1,
                    HAS_LEFT,
                    HAS_RIGHT,
                    SOFTCAP,
                    TMA,
                    STAGES,
                    UPCAST,
                    PRECISION,
                    QMAJOR,
                )
    if QMAJOR:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    dk = dk * scale
    row_ok = cols[:, None] < len_k - n0
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + k_row * sdkn + cols[:, None] * sdkn
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + k_row * sdvn + cols[:, None] * sdvn
    if HEAD_D == BD:
        tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=row_ok)
    else:
        tl.store(
            dk_ptrs + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=row_ok & (offs_d[None, :] < HEAD_D),
        )
    if HEAD_DV == BDV:
        tl.store(dv_ptrs + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=row_ok)
    else:
        tl.store(
            dv_ptrs + offs_dv[None, :],
            dv.to(DV.dtype.element_ty),
            mask=row_ok & (offs_dv[None, :] < HEAD_DV),
        )


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    k_desc,
    v_desc,
    b,
    hk,
    skn,
    svn,
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
    TMA: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cols = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k_offs = cols[:, None] * skn + offs_d[None, :]
    v_offs = cols[:, None] * svn + offs_dv[None, :]
    off = len_k - len_q
    for n0 in tl.range(n_lo, n_hi, BN, num_stages=STAGES):
        if TMA:
            k = k_desc.load([b, n0, hk, 0]).reshape(BN, BD)
            v = v_desc.load([b, n0, hk, 0]).reshape(BN, BDV)
        else:
            k = load_tile(
                k_base + tl.cast(n0, tl.int64) * skn + k_offs,
                cols,
                len_k - n0,
                offs_d,
                HEAD_D,
                BD,
                MASKED,
            )
            v = load_tile(
                v_base + tl.cast(n0, tl.int64) * svn + v_offs,
                cols,
                len_k - n0,
                offs_dv,
                HEAD_DV,
                BDV,
                MASKED,
            )
        qk = dot(q, tl.trans(k), None, UPCAST, PRECISION)
        x, t = scores(qk, qk_scale, cap2, SOFTCAP)
        if MASKED:
            vis = band_mask(
                offs_m[:, None],
                n0 + cols[None, :],
                len_k,
                off,
                win_left,
                win_right,
                HAS_LEFT,
                HAS_RIGHT,
            )
            x = tl.where(vis, x, float("-inf"))
        p = tl.math.exp2(x - lse2[:, None])
        dp = dot(do, tl.trans(v), None, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DQ,
    CU_Q,
    CU_K,
    q_desc,
    k_desc,
    v_desc,
    do_desc,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sdb,
    sdn,
    sdh,
    sdqb,
    sdqn,
    sdqh,
    slb,
    slh,
    Nq,
    Nk,
    Hq,
    GROUP,
    win_left,
    win_right,
    qk_scale,
    scale,
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
    TMA: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (query block, batch * query head); K/V streamed over the band."""
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
    h64 = h.to(tl.int64)
    rows = tl.arange(0, BM)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_row = (q_start + m0).to(tl.int64)
    if TMA:
        q = q_desc.load([b, m0, h, 0]).reshape(BM, BD)
        do = do_desc.load([b, m0, h, 0]).reshape(BM, BDV)
    else:
        q = load_tile(
            Q + b64 * sqb + h64 * sqh + q_row * sqn + rows[:, None] * sqn + offs_d[None, :],
            rows,
            len_q - m0,
            offs_d,
            HEAD_D,
            BD,
            True,
        )
        do = load_tile(
            DO + b64 * sdb + h64 * sdh + q_row * sdn + rows[:, None] * sdn + offs_dv[None, :],
            rows,
            len_q - m0,
            offs_dv,
            HEAD_DV,
            BDV,
            True,
        )
    l_off = b64 * slb + h64 * slh + q_start + offs_m
    lse2 = tl.load(LSE2 + l_off, mask=offs_m < len_q, other=float("inf"))
    delta = tl.load(DELTA + l_off, mask=offs_m < len_q, other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_row0 * skn
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_row0 * svn
    dq = tl.zeros([BM, BD], tl.float32)
    n0, n1, n2, n3 = band_blocks(m0, BM, len_q, len_k, win_left, win_right, HAS_LEFT, HAS_RIGHT, BN)
    for seg in tl.static_range(3):  # masked edge, mask-free middle, masked edge (as forward)
        if seg != 0 or HAS_LEFT:
            if seg == 0:
                lo, hi = n0, n1
            elif seg == 1:
                lo, hi = n1, n2
            else:
                lo, hi = n2, n3
            dq = _dq_blocks(
                dq,
                q,
                do,
                lse2,
                delta,
                k_base,
                v_base,
                k_desc,
                v_desc,
                b,
                hk,
                skn,
                svn,
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
                TMA,
                STAGES,
                UPCAST,
                PRECISION,
            )
    dq = dq * scale
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + q_row * sdqn + rows[:, None] * sdqn
    row_ok = rows[:, None] < len_q - m0
    if HEAD_D == BD:
        tl.store(dq_ptrs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok)
    else:
        tl.store(
            dq_ptrs + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=row_ok & (offs_d[None, :] < HEAD_D),
        )
