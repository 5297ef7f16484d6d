// Backward attention v4: dV = Pᵀ·dO, dK = scale·dSᵀ·Q on chip per 128-key block, dQ += scale·dS·K.
// Tile 128 keys × 64 queries, one 64-key chain per warpgroup; K/V read once per CTA, Q/dO/lse/dpsum
// (2-stage ring) once per key block; dQ in 64-column chunks added to fp32 by TMA bulk reduce.
// Target sm_90a (wgmma RS/SS, TMA, bulk reduce, setmaxnreg); hd128 only (bwd_launch.cuh: else v2).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "bwd.cuh"
#include "utils.cuh"

namespace longflash::sm90 {

__device__ __forceinline__ void sts_u32(void const* p, uint32_t v) {
  uint32_t const a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(v) : "memory");
}

template <typename Element_, int kDqk_, int kDv_>
struct BwdKernelV4 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  // The only shape written for so far; other head dims run v2 (see bwd_launch.cuh).
  static constexpr bool kSupported = kDqk == 128 && kDv == 128;
  static constexpr int kBlockM = 64;   // queries per step (a multiple of 32: the producer lanes)
  static constexpr int kBlockN = 128;  // keys per CTA: 64 per consumer warpgroup
  static constexpr int kWgKeys = 64;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  // dQ = dS·K split by columns: warpgroup w computes the w-th half for all 128 keys, so the halves
  // must be whole swizzle atoms of K (64 columns at d128).
  static constexpr int kChunk = kDqk / 2;
  static_assert(!kSupported || kChunk % 64 == 0, "dQ chunks are whole 128B-swizzle atoms");

  static constexpr int kBarDsReady = 1;  // both warpgroups wrote their dS half to smem

  using One = Layout<Shape<_1, _1, _1>>;
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kDqk>>>(), One{}));
  using MmaDP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kDv>>>(), One{}));
  using MmaDV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDv>, Int<kBlockM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      One{}));
  using MmaDK = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDqk>, Int<kBlockM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      One{}));
  using MmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kChunk>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      One{}));

  using SmemLayoutK =
      decltype(tile_to_shape(k_major_atom<Element, kDqk>(), Shape<Int<kBlockN>, Int<kDqk>>{}));
  using SmemLayoutV =
      decltype(tile_to_shape(k_major_atom<Element, kDv>(), Shape<Int<kBlockN>, Int<kDv>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(k_major_atom<Element, kDqk>(),
                                             Shape<Int<kBlockM>, Int<kDqk>, Int<kStages>>{}));
  using SmemLayoutdO = decltype(tile_to_shape(k_major_atom<Element, kDv>(),
                                              Shape<Int<kBlockM>, Int<kDv>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{},
      make_ordered_layout(Shape<Int<kDqk>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutdOt = decltype(composition(
      SmemLayoutdO{},
      make_ordered_layout(Shape<Int<kDv>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_ordered_layout(Shape<Int<kDqk>, Int<kBlockN>>{}, Step<_2, _1>{})));
  // dS (queries × keys, one buffer per ring stage) stored query-contiguous: the MN-major A operand
  // of dQ = dS·K. Two buffers, so a warpgroup writing block m+1's dS never overwrites what the
  // other warpgroup's dQ GEMM of block m may still read (the one barrier per step orders m+2's
  // write).
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>, Int<kStages>>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{},
      make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using GmemLayout = Layout<Shape<int32_t, int32_t, int32_t, int32_t>,
                            Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemLayout{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{},
                                      Shape<Int<kBlockN>, Int<kDqk>>{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutV{},
                                      Shape<Int<kBlockN>, Int<kDv>>{}, _1{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kDqk>>{}, _1{}));
  using TmadO = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutdO{}),
                                       Shape<Int<kBlockM>, Int<kDv>>{}, _1{}));

  static constexpr uint32_t kBytesKV = kBlockN * (kDqk + kDv) * sizeof(Element);
  static constexpr uint32_t kBytesQdO = kBlockM * (kDqk + kDv) * sizeof(Element);

  // dQ staging, one buffer per consumer warpgroup (two do not fit next to the dS ring): rows padded
  // by 8 floats so the float2 stores of a half-warp hit 32 distinct banks.
  static constexpr int kStageStride = kChunk + 8;
  static constexpr int kStageFloats = kBlockM * kStageStride;

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    cute::array_aligned<float, 2 * kStageFloats, 128> dq_stage;
    // lse·log2e and rowsum(dO·O) of the stage's 64 queries, written by the producer warp.
    cute::array_aligned<float, kStages * kBlockM, 16> lse;
    cute::array_aligned<float, kStages * kBlockM, 16> dpsum;
    uint64_t kv_full;
    uint64_t q_full[kStages];
    uint64_t q_empty[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(!kSupported || kSmemBytes <= 227 * 1024, "shared memory budget");

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    TmadO tma_do;
    AttnShape s;
    Element* dk;
    int64_t dk_batch_stride, dk_seq_stride, dk_head_stride;
    Element* dv;
    int64_t dv_batch_stride, dv_seq_stride, dv_head_stride;
    float* dq_accum;        // (rows, Hq, Dqk) fp32
    float const* lse_log2;  // lse layout
    float const* dpsum;     // lse layout
    float scale_log2;
    float softcap;
    float softcap_scale;
    bool skip_dq_add;  // timing experiment only: dQ GEMM without the reduce (dQ is wrong)
  };

  static __device__ __forceinline__ void run(Params const& p, char* smem_raw) {
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
    int const wg = threadIdx.x / 128;
    int const n_block = blockIdx.x;
    int const hk = blockIdx.y;
    int const b = blockIdx.z;
    SeqInfo const seq(p.s, b);
    int const j0 = n_block * kBlockN;
    if (j0 >= seq.len_k) return;
    BandMask const band{seq.off, p.s.window_left, p.s.window_right, seq.len_q, seq.len_k};
    int m_lo, m_hi;
    band.query_blocks(j0, min(j0 + kBlockN, seq.len_k) - 1, kBlockM, m_lo, m_hi);

    if (threadIdx.x == 0) {
      Barrier::init(&ss.kv_full, 1);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kStages; ++i) {
        Barrier::init(&ss.q_full[i], 32);  // the producer warp's lanes (lse/dpsum stores) + TMA
        Barrier::init(&ss.q_empty[i], kConsumerThreads);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<24>();
      if (threadIdx.x < 32 && m_lo <= m_hi) produce(p, ss, seq, b, n_block, hk, m_lo, m_hi);
    } else {
      cutlass::arch::warpgroup_reg_alloc<240>();
      consume(p, ss, seq, band, n_block, hk, wg - 1, m_lo, m_hi);
    }
  }

  // Warp 0: lane 0 issues the TMA copies; every lane loads two rows of lse and dpsum into the
  // stage (plain loads: the lse arrays have no padding a bulk copy could run into) and arrives.
  static __device__ __forceinline__ void produce(Params const& p, SharedStorage& ss,
                                                 SeqInfo const& seq, int b, int n_block, int hk,
                                                 int m_lo, int m_hi) {
    int const lane = threadIdx.x;
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = n_block % count;
    Tensor mQ = p.tma_q.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDqk), p.s.heads_q, p.s.tma_batch));
    Tensor mdO = p.tma_do.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDv), p.s.heads_q, p.s.tma_batch));
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdO{});
    if (lane == 0) {
      Tensor mK = p.tma_k.get_tma_tensor(
          make_shape(p.s.rows_k, int32_t(kDqk), p.s.heads_k, p.s.tma_batch));
      Tensor mV = p.tma_v.get_tma_tensor(
          make_shape(p.s.rows_k, int32_t(kDv), p.s.heads_k, p.s.tma_batch));
      Tensor gK =
          local_tile(domain_offset(make_coord(seq.start_k, _0{}), mK(_, _, hk, seq.tma_batch)),
                     Shape<Int<kBlockN>, Int<kDqk>>{}, make_coord(n_block, _0{}));
      Tensor gV =
          local_tile(domain_offset(make_coord(seq.start_k, _0{}), mV(_, _, hk, seq.tma_batch)),
                     Shape<Int<kBlockN>, Int<kDv>>{}, make_coord(n_block, _0{}));
      Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
      Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
      auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                      group_modes<0, 2>(gV));
      TxBarrier::arrive_and_expect_tx(&ss.kv_full, kBytesKV);
      copy(p.tma_k.with(ss.kv_full), tKg, tKs);
      copy(p.tma_v.with(ss.kv_full), tVg, tVs);
    }

    RingState<kStages> st;
    for (int hh = 0; hh < group; ++hh) {
      int const h = hk * group + hh;
      Tensor gQ =
          local_tile(domain_offset(make_coord(seq.start_q, _0{}), mQ(_, _, h, seq.tma_batch)),
                     Shape<Int<kBlockM>, Int<kDqk>>{}, make_coord(_, _0{}));
      Tensor gdO =
          local_tile(domain_offset(make_coord(seq.start_q, _0{}), mdO(_, _, h, seq.tma_batch)),
                     Shape<Int<kBlockM>, Int<kDv>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] = tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                        group_modes<0, 2>(gdO));
      // Row r of (b, h) in the lse-shaped arrays (dense (B, Hq, Nq); varlen (Hq, Tq)).
      int64_t const lse_base = p.s.cu_q != nullptr
                                   ? int64_t(h) * p.s.rows_q + seq.start_q
                                   : (int64_t(b) * p.s.heads_q + h) * p.s.seqlen_q;
      for (int i = 0; i < count; ++i) {
        int const m = query_block_at(i, m_lo, count, rot);
        Barrier::wait(&ss.q_empty[st.index], st.phase ^ 1);
        if (lane == 0) {
          TxBarrier::expect_transaction(&ss.q_full[st.index], kBytesQdO);
          copy(p.tma_q.with(ss.q_full[st.index]), tQg(_, m), tQs(_, st.index));
          copy(p.tma_do.with(ss.q_full[st.index]), tdOg(_, m), tdOs(_, st.index));
        }
        // All loads before any store: one global latency per stage, not one per row.
        constexpr int kRowsPerLane = kBlockM / 32;
        float lse_v[kRowsPerLane], dpsum_v[kRowsPerLane];
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kRowsPerLane; ++k) {
          int const row = m * kBlockM + lane + 32 * k;
          bool const in = row < seq.len_q;
          lse_v[k] = in ? __ldg(p.lse_log2 + lse_base + row) : 0.f;
          dpsum_v[k] = in ? __ldg(p.dpsum + lse_base + row) : 0.f;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kRowsPerLane; ++k) {
          ss.lse[st.index * kBlockM + lane + 32 * k] = lse_v[k];
          ss.dpsum[st.index * kBlockM + lane + 32 * k] = dpsum_v[k];
        }
        // Release: the consumers' wait on q_full acquires these stores.
        Barrier::arrive(&ss.q_full[st.index]);
        st.advance();
      }
    }
  }

  template <class Acc, class Coord>
  static __device__ __forceinline__ void store_rows(Acc const& acc, Coord const& coord,
                                                    Element* base, int64_t seq_stride, int j0,
                                                    int len_k, float mul) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      int const row = j0 + get<0>(coord(i));
      if (row < len_k) {
        alignas(4) Element pair[2] = {Element(acc(i) * mul), Element(acc(i + 1) * mul)};
        *reinterpret_cast<uint32_t*>(base + int64_t(row) * seq_stride + get<1>(coord(i))) =
            *reinterpret_cast<uint32_t*>(pair);
      }
    }
  }

  // Elementwise work in two passes around the dPᵀ wait. Without softcap, pass 1 turns Sᵀ into
  // P = exp2(Sᵀ·scale·log2e − lse) while dPᵀ is still in flight and pass 2 forms
  // dS = P·(dPᵀ − dpsum). With softcap, pass 1 keeps t = tanh(Sᵀ/c) and pass 2 forms P from it and
  // dS = P·(1 − t²)·(dPᵀ − dpsum), so no third accumulator-sized array is live. kMask: the tile
  // crosses a mask or sequence edge; full tiles run loops with no branch and no select.
  template <bool kMask, bool kSoftcap, class TS, class TC>
  static __device__ __forceinline__ void pass1(Params const& p, TS& S_rc, TC const& c_rc,
                                               float const* lse_s, int qc, BandMask const& band,
                                               int i0, int jw0) {
    constexpr int kRows = decltype(size<0>(S_rc))::value;
    constexpr int kCols = decltype(size<1>(S_rc))::value;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      // Column c = 2j + e holds query 8j + 2(t%4) + e (utils.cuh acc_rowcol).
      float const l = lse_s[8 * (c / 2) + qc + (c % 2)];
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        if constexpr (kSoftcap) {
          S_rc(r, c) = tanh_fast(S_rc(r, c) * p.softcap_scale);
        } else {
          float pr = exp2f(S_rc(r, c) * p.scale_log2 - l);
          if constexpr (kMask) {
            int const key = jw0 + get<0>(c_rc(r, c));
            int const query = i0 + get<1>(c_rc(r, c));
            if (query >= band.len_q || !band.visible(query, key)) pr = 0.f;
          }
          S_rc(r, c) = pr;
        }
      }
    }
  }

  template <bool kMask, bool kSoftcap, class TS, class TdP, class TC>
  static __device__ __forceinline__ void pass2(Params const& p, TS& S_rc, TdP& dP_rc,
                                               TC const& c_rc, float const* lse_s,
                                               float const* dpsum_s, int qc, BandMask const& band,
                                               int i0, int jw0) {
    constexpr int kRows = decltype(size<0>(S_rc))::value;
    constexpr int kCols = decltype(size<1>(S_rc))::value;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      int const q = 8 * (c / 2) + qc + (c % 2);
      float const d = dpsum_s[q];
      float l = 0.f;
      if constexpr (kSoftcap) l = lse_s[q];
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float pr = S_rc(r, c);
        float pf = pr;
        if constexpr (kSoftcap) {
          float const t = pr;
          pr = exp2f(p.softcap * t * p.scale_log2 - l);
          if constexpr (kMask) {
            int const key = jw0 + get<0>(c_rc(r, c));
            int const query = i0 + get<1>(c_rc(r, c));
            if (query >= band.len_q || !band.visible(query, key)) pr = 0.f;
          }
          S_rc(r, c) = pr;
          pf = pr * (1.f - t * t);
        }
        dP_rc(r, c) = pf * (dP_rc(r, c) - d);
      }
    }
  }

  // One consumer warpgroup: keys [j0 + 64w, j0 + 64w + 64) of the block, the whole chain per step.
  static __device__ __forceinline__ void consume(Params const& p, SharedStorage& ss,
                                                 SeqInfo const& seq, BandMask const& band,
                                                 int n_block, int hk, int w, int m_lo, int m_hi) {
    int const tid = threadIdx.x % 128;
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = count <= 0 ? 0 : n_block % count;
    MmaS mma_s;
    MmaDP mma_dp;
    MmaDV mma_dv;
    MmaDK mma_dk;
    MmaDQ mma_dq;
    auto thr_s = mma_s.get_thread_slice(tid);
    auto thr_dp = mma_dp.get_thread_slice(tid);
    auto thr_dv = mma_dv.get_thread_slice(tid);
    auto thr_dk = mma_dk.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdO{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdOt{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutKt{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutdS{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutdSt{});
    // This warpgroup's 64 rows of K and V, and its 64 key rows of each dS buffer.
    Tensor sKw = local_tile(sK, Shape<Int<kWgKeys>, Int<kDqk>>{}, make_coord(w, _0{}));
    Tensor sVw = local_tile(sV, Shape<Int<kWgKeys>, Int<kDv>>{}, make_coord(w, _0{}));
    Tensor sdStw = local_tile(sdSt, Shape<Int<kWgKeys>, Int<kBlockM>, Int<kStages>>{},
                              make_coord(w, _0{}, _0{}));
    Tensor sKt_c = local_tile(sKt, Shape<Int<kChunk>, Int<kBlockN>>{}, make_coord(w, _0{}));

    Tensor tSrK = thr_s.partition_fragment_A(sKw);
    Tensor tSrQ = thr_s.partition_fragment_B(sQ);
    Tensor tdPrV = thr_dp.partition_fragment_A(sVw);
    Tensor tdPrdO = thr_dp.partition_fragment_B(sdO);
    Tensor tdVrdO = thr_dv.partition_fragment_B(sdOt);
    Tensor tdKrQ = thr_dk.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
    Tensor tdQrK = thr_dq.partition_fragment_B(sKt_c);
    Tensor tdSsdS = thr_dp.partition_C(sdStw);

    Tensor accS = partition_fragment_C(mma_s, Shape<_64, Int<kBlockM>>{});
    Tensor accdP = partition_fragment_C(mma_dp, Shape<_64, Int<kBlockM>>{});
    Tensor accdV = partition_fragment_C(mma_dv, Shape<_64, Int<kDv>>{});
    Tensor accdK = partition_fragment_C(mma_dk, Shape<_64, Int<kDqk>>{});
    Tensor accdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kChunk>>{});
    Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kBlockM>>{}));
    Tensor S_rc = make_tensor(accS.data(), acc_rowcol(accS.layout()));
    Tensor dP_rc = make_tensor(accdP.data(), acc_rowcol(accdP.layout()));
    Tensor cS_rc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kChunk>>{}));
    static_assert(decltype(size(accS))::value == decltype(size(accdP))::value);

    clear(accdV);
    clear(accdK);
    int const j0 = n_block * kBlockN;
    int const jw0 = j0 + w * kWgKeys;
    int const qc = 2 * (tid % 4);
    bool const softcap = p.softcap > 0.f;
    int64_t const row_stride = int64_t(p.s.heads_q) * kDqk;
    int const warp = tid / 32, lane = tid % 32;
    float* const stage = ss.dq_stage.data() + w * kStageFloats;

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      for (int hh = 0; hh < group; ++hh) {
        int const h = hk * group + hh;
        float* const dq_base = p.dq_accum +
                               (int64_t(seq.tma_batch) * p.s.seqlen_q + seq.start_q) * row_stride +
                               int64_t(h) * kDqk + w * kChunk;
        for (int i = 0; i < count; ++i) {
          int const m = query_block_at(i, m_lo, count, rot);
          int const i0 = m * kBlockM;
          Barrier::wait(&ss.q_full[st.index], st.phase);
          // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ in flight together; P is computed as soon as Sᵀ lands.
          wg_gemm<true, -1, false>(mma_s, tSrK, tSrQ(_, _, _, st.index), accS);
          wg_gemm<true, -1, false>(mma_dp, tdPrV, tdPrdO(_, _, _, st.index), accdP);
          bool const full = i0 + kBlockM <= seq.len_q &&
                            band.tile_is_full(i0, i0 + kBlockM - 1, jw0, jw0 + kWgKeys - 1);
          float const* lse_s = ss.lse.data() + st.index * kBlockM;
          float const* dpsum_s = ss.dpsum.data() + st.index * kBlockM;
          warpgroup_wait<1>();  // Sᵀ is done (batches complete in issue order)
          warpgroup_fence_operand(accS);
          if (full) {
            if (softcap) {
              pass1<false, true>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            } else {
              pass1<false, false>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            }
          } else {
            if (softcap) {
              pass1<true, true>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            } else {
              pass1<true, false>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            }
          }
          warpgroup_wait<0>();
          warpgroup_fence_operand(accdP);
          if (full) {
            if (softcap) {
              pass2<false, true>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band, i0, jw0);
            } else {
              pass2<false, false>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band, i0, jw0);
            }
          } else {
            if (softcap) {
              pass2<true, true>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band, i0, jw0);
            } else {
              pass2<true, false>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band, i0, jw0);
            }
          }
          Tensor rP = convert_to<Element>(accS);
          Tensor rdS = convert_to<Element>(accdP);
          Tensor tdVrP = make_tensor(rP.data(), acc_as_A(rP.layout()));
          Tensor tdKrdS = make_tensor(rdS.data(), acc_as_A(rdS.layout()));
          // dV += Pᵀ·dO runs while dS goes to smem.
          wg_gemm<false, -1, true>(mma_dv, tdVrP, tdVrdO(_, _, _, st.index), accdV);
          Tensor tdSs = tdSsdS(_, _, _, st.index);
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < size(rdS); e += 2) {
            // Adjacent accumulator columns are adjacent queries: one 32-bit STS per pair (the
            // 128B swizzle moves 16-byte units, so a pair stays contiguous).
            alignas(4) Element pair[2] = {rdS(e), rdS(e + 1)};
            sts_u32(&tdSs(e), *reinterpret_cast<uint32_t*>(pair));
          }
          // dS was written by ordinary stores and is read next by wgmma (the async proxy).
          cutlass::arch::fence_view_async_shared();
          wg_gemm<false, -1, true>(mma_dk, tdKrdS, tdKrQ(_, _, _, st.index), accdK);
          named_sync(kBarDsReady, kConsumerThreads);
          // dQ[:, chunk w] = dS·K[:, chunk w] over all 128 keys (both halves of dS).
          wg_gemm<true, -1, false>(mma_dq, tdQrdS(_, _, _, st.index), tdQrK, accdQ);
          warpgroup_wait<0>();
          warpgroup_fence_operand(accdV);
          warpgroup_fence_operand(accdK);
          warpgroup_fence_operand(accdQ);
          warpgroup_fence_operand(rP);
          warpgroup_fence_operand(rdS);
          Barrier::arrive(&ss.q_empty[st.index]);
          if (p.skip_dq_add) {
            st.advance();
            continue;
          }

          // Warp q holds rows 16q..16q+15 of the chunk: it stages and drains only its own rows.
          bulk_wait_read<0>();
          __syncwarp();
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < size(accdQ); e += 2) {
            *reinterpret_cast<float2*>(stage + get<0>(cdQ(e)) * kStageStride + get<1>(cdQ(e))) =
                make_float2(accdQ(e), accdQ(e + 1));
          }
          cutlass::arch::fence_view_async_shared();
          __syncwarp();
          if (lane < 16) {
            int const r = warp * 16 + lane;
            int const row = i0 + r;
            if (row < seq.len_q) {
              bulk_reduce_add_f32(dq_base + int64_t(row) * row_stride, stage + r * kStageStride,
                                  kChunk * int(sizeof(float)));
            }
            bulk_commit();
          }
          st.advance();
        }
      }
    }
    // The CTA's shared memory must outlive the bulk reduces still reading it.
    bulk_wait_all();
    Tensor cdV = thr_dv.partition_C(make_identity_tensor(Shape<_64, Int<kDv>>{}));
    Element* vbase = p.dv + int64_t(seq.tma_batch) * p.dv_batch_stride +
                     int64_t(seq.start_k) * p.dv_seq_stride + int64_t(hk) * p.dv_head_stride;
    store_rows(accdV, cdV, vbase, p.dv_seq_stride, jw0, seq.len_k, 1.f);
    Tensor cdK = thr_dk.partition_C(make_identity_tensor(Shape<_64, Int<kDqk>>{}));
    Element* kbase = p.dk + int64_t(seq.tma_batch) * p.dk_batch_stride +
                     int64_t(seq.start_k) * p.dk_seq_stride + int64_t(hk) * p.dk_head_stride;
    store_rows(accdK, cdK, kbase, p.dk_seq_stride, jw0, seq.len_k, p.s.scale);
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    bwd_kernel_v4(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

}  // namespace longflash::sm90
