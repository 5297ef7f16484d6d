"""Host side: allocate outputs, pick tiles, build tensor descriptors, launch the kernels.

Imported on the first forward/backward (it imports torch and triton); the kernels see
(batch, seqlen, heads, dim) strides as given, with unit stride along the head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from longflash.call import AttentionCall

from longflash_triton import configs, interpret
from longflash_triton.bwd import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_prep
from longflash_triton.configs import TileConfig
from longflash_triton.fwd import attn_fwd

_LOG2E = 1.4426950408889634
# Window sides wider than any sequence are the same as unbounded; clamping keeps them int32.
_WIDE = 2**30
_PREP_BM = 64


@dataclass(frozen=True)
class _Shape:
    varlen: bool
    B: int
    Nq: int
    Nk: int
    Hq: int
    Hk: int
    group: int
    BD: int
    BDV: int
    has_left: bool
    has_right: bool
    left: int
    right: int
    qk_scale: float
    cap2: float
    fold_max: bool


def _block(d: int) -> int:
    # tl.arange and tl.dot need a power of two >= 16; the padding is masked on load/store
    return max(16, triton.next_power_of_2(d))


def _shape(call: AttentionCall) -> _Shape:
    left, right = call.window_left, call.window_right
    if call.softcap is None:
        qk_scale, cap2 = call.scale * _LOG2E, 0.0
    else:
        qk_scale, cap2 = call.scale / call.softcap, call.softcap * _LOG2E
    return _Shape(
        varlen=call.varlen is not None,
        B=call.B,
        Nq=call.Nq,
        Nk=call.Nk,
        Hq=call.Hq,
        Hk=call.Hk,
        group=call.group,
        BD=_block(call.Dqk),
        # A value block narrower than the key block computed wrong outputs on the H200
        # (Dqk 40 / Dv 24: P·V with a 32-wide V tile against 64-wide Q/K tiles; correct in
        # the interpreter), so V is padded to the key block's width: exact, at the price of
        # padded columns in P·V when Dv's block is the smaller one.
        BDV=max(_block(call.Dv), _block(call.Dqk)),
        has_left=left is not None,
        has_right=right is not None,
        left=0 if left is None else min(left, _WIDE),
        right=0 if right is None else min(right, _WIDE),
        qk_scale=qk_scale,
        cap2=cap2,
        fold_max=call.softcap is None and call.scale > 0,
    )


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed varlen tensor has batch stride 0."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(x: torch.Tensor) -> tuple[bool, str]:
    """(upcast dots to fp32, input precision): the interpreter upcasts (see tiles.dot);
    fp32 inputs ask for IEEE products rather than TF32."""
    return configs.interpreting() or not x.is_cuda, "ieee" if x.dtype == torch.float32 else "tf32"


def _tma_ok(cfg: TileConfig, arch: str, s: _Shape, call: AttentionCall, *xs) -> bool:
    if not cfg.tma or s.varlen or not arch.startswith("sm") or int(arch[2:]) < 90:
        return False
    if call.Dqk != s.BD or call.Dv != s.BDV:
        return False
    for x in xs:
        if x.numel() == 0 or x.data_ptr() % 16 or x.stride(-1) != 1:
            return False
        # a tensor map needs 16-byte multiples and no broadcast (stride 0) dimension
        if any(st <= 0 or (st * x.element_size()) % 16 for st in x.stride()[:-1]):
            return False
    return True


def _desc(x: torch.Tensor, rows: int, cols: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    # 4-D over (B, N, H, D): rows past N and columns past D read as zeros and are not written
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, rows, 1, cols])


def _desc_rows(x: torch.Tensor, rows: int, cols: int):
    """A 2-D map over (B*N, H*D) with box [rows, cols], or None when the layout does not
    flatten (heads not packed, or batches not one after another)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, N, H, D = x.shape
    if x.stride(2) != D or (B > 1 and x.stride(0) != N * x.stride(1)):
        return None
    return TensorDescriptor(x, [B * N, H * D], [x.stride(1), 1], [rows, cols])


def forward(
    call: AttentionCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    s = _shape(call)
    if s.varlen:
        out = torch.empty((q.shape[0], s.Hq, call.Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((s.Hq, q.shape[0]), device=q.device, dtype=torch.float32)
    else:
        out = torch.empty((s.B, s.Nq, s.Hq, call.Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((s.B, s.Hq, s.Nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or s.Nq == 0:
        return out, lse
    arch = configs.arch(q.device)
    if arch == "interpret":
        interpret.patch()
    if cfg is None:
        cfg = configs.pick("fwd", arch, max(s.BD, s.BDV), s.has_right or s.has_left, s.Nk)
        if arch == "interpret":
            cfg = configs.interpreter_tiles(cfg, s.Nq, s.Nk)
    upcast, precision = _precision(q)
    tma = _tma_ok(cfg, arch, s, call, q, k, v, out)
    descs = (
        (
            _desc(q, cfg.BM, s.BD),
            _desc(k, cfg.BN, s.BD),
            _desc(v, cfg.BN, s.BDV),
            _desc(out, cfg.BM, s.BDV),
        )
        if tma
        else (None, None, None, None)
    )
    cu_q, cu_k = (call.varlen.cu_seqlens_q, call.varlen.cu_seqlens_k) if s.varlen else (q, k)
    grid = (triton.cdiv(s.Nq, cfg.BM), s.B * s.Hq)
    attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        *descs,
        *_strides(q, s.varlen),
        *_strides(k, s.varlen),
        *_strides(v, s.varlen),
        *_strides(out, s.varlen),
        *_lse_strides(lse, s.varlen),
        s.Nq,
        s.Nk,
        s.Hq,
        s.group,
        s.left,
        s.right,
        s.qk_scale,
        s.cap2,
        HEAD_D=call.Dqk,
        HEAD_DV=call.Dv,
        BM=cfg.BM,
        BN=cfg.BN,
        BD=s.BD,
        BDV=s.BDV,
        VARLEN=s.varlen,
        HAS_LEFT=s.has_left,
        HAS_RIGHT=s.has_right,
        SOFTCAP=call.softcap is not None,
        FOLD_MAX=s.fold_max,
        TMA=tma,
        WS=cfg.ws and tma,
        STAGES=cfg.stages,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return out, lse


def backward(
    call: AttentionCall,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cfgs: tuple[TileConfig, TileConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, dout = (_unit_last(x) for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    s = _shape(call)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dk.numel() == 0 and dq.numel() == 0:
        return dq, dk, dv
    if q.numel() == 0 or s.Nq == 0:
        # no query sees anything: every key gets a zero gradient
        return dq, dk.zero_(), dv.zero_()
    arch = configs.arch(q.device)
    if arch == "interpret":
        interpret.patch()
    band = s.has_right or s.has_left
    hb = max(s.BD, s.BDV)
    if cfgs is None:
        cfgs = configs.pick("dkdv", arch, hb, band, s.Nq), configs.pick("dq", arch, hb, band, s.Nk)
        if arch == "interpret":
            cfgs = tuple(configs.interpreter_tiles(c, s.Nq, s.Nk) for c in cfgs)
    cfg_kv, cfg_q = cfgs
    upcast, precision = _precision(q)

    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    lse2 = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    if s.varlen:
        prep_b, prep_n = 1, q.shape[0]
    else:
        prep_b, prep_n = s.B, s.Nq
    attn_bwd_prep[(triton.cdiv(prep_n, _PREP_BM), prep_b * s.Hq)](
        out,
        dout,
        lse,
        delta,
        lse2,
        *_strides(out, s.varlen),
        *_strides(dout, s.varlen),
        *_lse_strides(lse, s.varlen),
        prep_n,
        s.Hq,
        HEAD_DV=call.Dv,
        BM=_PREP_BM,
        BDV=s.BDV,
        num_warps=4,
    )

    cu_q, cu_k = (call.varlen.cu_seqlens_q, call.varlen.cu_seqlens_k) if s.varlen else (q, k)
    common = dict(
        HEAD_D=call.Dqk,
        HEAD_DV=call.Dv,
        BD=s.BD,
        BDV=s.BDV,
        VARLEN=s.varlen,
        HAS_LEFT=s.has_left,
        HAS_RIGHT=s.has_right,
        SOFTCAP=call.softcap is not None,
        UPCAST=upcast,
        PRECISION=precision,
    )
    strides_in = (
        *_strides(q, s.varlen),
        *_strides(k, s.varlen),
        *_strides(v, s.varlen),
        *_strides(dout, s.varlen),
    )

    tma = _tma_ok(cfg_kv, arch, s, call, q, k, v, dout)
    if tma and cfg_kv.qmajor:  # Q/dO as 2-D maps, K/V by pointers (bwd._dkdv_blocks)
        descs = (_desc_rows(q, cfg_kv.BM, s.BD), None, None, _desc_rows(dout, cfg_kv.BM, s.BDV))
        tma = descs[0] is not None and descs[3] is not None
        if not tma:
            descs = (None,) * 4
    elif tma:
        descs = (
            _desc(q, cfg_kv.BM, s.BD),
            _desc(k, cfg_kv.BN, s.BD),
            _desc(v, cfg_kv.BN, s.BDV),
            _desc(dout, cfg_kv.BM, s.BDV),
        )
    else:
        descs = (None,) * 4
    if s.Nk > 0:  # otherwise dk and dv are empty
        attn_bwd_dkdv[(triton.cdiv(s.Nk, cfg_kv.BN), s.B * s.Hk)](
            q,
            k,
            v,
            dout,
            lse2,
            delta,
            dk,
            dv,
            cu_q,
            cu_k,
            *descs,
            *strides_in,
            *_strides(dk, s.varlen),
            *_strides(dv, s.varlen),
            *_lse_strides(lse, s.varlen),
            s.Nq,
            s.Nk,
            s.Hk,
            s.group,
            s.left,
            s.right,
            s.qk_scale,
            call.scale,
            s.cap2,
            BM=cfg_kv.BM,
            BN=cfg_kv.BN,
            TMA=tma,
            STAGES=cfg_kv.stages,
            QMAJOR=cfg_kv.qmajor,
            **common,
            num_warps=cfg_kv.warps,
            num_stages=cfg_kv.stages,
        )

    tma = _tma_ok(cfg_q, arch, s, call, q, k, v, dout)
    descs = (
        (
            _desc(q, cfg_q.BM, s.BD),
            _desc(k, cfg_q.BN, s.BD),
            _desc(v, cfg_q.BN, s.BDV),
            _desc(dout, cfg_q.BM, s.BDV),
        )
        if tma
        else (None,) * 4
    )
    attn_bwd_dq[(triton.cdiv(s.Nq, cfg_q.BM), s.B * s.Hq)](
        q,
        k,
        v,
        dout,
        lse2,
        delta,
        dq,
        cu_q,
        cu_k,
        *descs,
        *strides_in,
        *_strides(dq, s.varlen),
        *_lse_strides(lse, s.varlen),
        s.Nq,
        s.Nk,
        s.Hq,
        s.group,
        s.left,
        s.right,
        s.qk_scale,
        call.scale,
        s.cap2,
        BM=cfg_q.BM,
        BN=cfg_q.BN,
        TMA=tma,
        STAGES=cfg_q.stages,
        **common,
        num_warps=cfg_q.warps,
        num_stages=cfg_q.stages,
    )
    return dq, dk, dv
