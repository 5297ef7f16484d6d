// Backward attention: dV = Pᵀ·dO and dK = scale·dSᵀ·Q on chip per key block, dQ += scale·dS·K in fp32.
// Tile 64 keys × 64 queries; K/V read once per CTA, Q/dO (2-stage TMA ring) once per 64-key block.
// Target sm_90a: WG1 Sᵀ,P,dV; WG2 dPᵀ,dS,dK; dQ = dS·K split by column chunks, added to L2 either
// with per-thread REDs (v2) or staged in smem and added with one TMA bulk reduce per row (v3).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "utils.cuh"

namespace longflash::sm90 {

// Fire-and-forget fp32 pair reduction: unlike atomicAdd, no value comes back, so the warp never
// waits on the L2 round trip.
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// TMA bulk reduce-add of `bytes` (multiple of 16, both addresses 16-byte aligned) of fp32 from
// shared to global memory: L2 sees one 256-byte reduction per dQ row instead of 32 8-byte REDs.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, float const* src, int bytes) {
  uint32_t const s = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
      "r"(s), "r"(bytes)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Waits until at most N of this thread's bulk groups may still be reading their shared source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// The i-th query block a key block visits. Without the deterministic order, each key block starts
// at a different query block (rotated by its index), so concurrent CTAs add their dQ partials to
// different rows instead of queueing on the same L2 lines.
__device__ __forceinline__ int query_block_at(int i, int m_lo, int count, int rot) {
  int const j = i + rot;
  return m_lo + (j >= count ? j - count : j);
}

// The CTA's key block, kv head and sequence in a grid launched by bwd_grid. head_group 0: x = key
// block, y = kv head, z = sequence, so each head's key blocks start in a row (the hardware starts
// CTAs in linear block order). head_group G > 0: the (sequence, kv head) pairs in groups of G, y =
// group, x = key block · G + pair in the group, so a group's first (under a causal mask, heaviest)
// key blocks all start before any second one (api.cpp bwd_head_group). Pairs past the last one
// (b >= batch) have no work. v5-v8 only.
struct BwdBlock {
  int n_block, hk, b;
};
__device__ __forceinline__ BwdBlock bwd_block(int head_group, int heads_k) {
  if (head_group == 0) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  int const pair = int(blockIdx.y) * head_group + int(blockIdx.x) % head_group;
  return {int(blockIdx.x) / head_group, pair % heads_k, pair / heads_k};
}
// The grid of n_blocks key blocks per head in the order of a.head_group (api.cpp bwd_head_group
// keeps G at most the pair count and 32, and the group count within gridDim.y).
inline dim3 bwd_grid(BwdArgs const& a, int n_blocks) {
  AttnShape const& s = a.s;
  int const g = a.head_group;
  if (g == 0) return dim3(unsigned(n_blocks), unsigned(s.heads_k), unsigned(s.batch));
  int const pairs = s.heads_k * s.batch;
  return dim3(unsigned(n_blocks * g), unsigned((pairs + g - 1) / g), 1u);
}

template <typename Element_, int kDqk_, int kDv_>
struct BwdKernel {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kBlockM = kBwdBlockM;  // queries per step
  static constexpr int kBlockN = kBwdBlockN;  // keys per CTA (one 64-row wgmma atom)
  static_assert(kBlockN == 64, "each consumer warpgroup owns the whole key block");
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  // dQ is produced in column chunks that are whole swizzle atoms of the K tile, so that each chunk of
  // Kᵀ is itself a canonical wgmma operand; chunk c goes to consumer warpgroup c % 2.
  static constexpr int kChunk = kDqk % 64 == 0 ? 64 : 32;
  static constexpr int kNumChunks = kDqk / kChunk;

  // Named barrier ids (0 is __syncthreads).
  static constexpr int kBarPReady = 1;   // WG1 published P (fp32) for WG2
  static constexpr int kBarDsReady = 2;  // WG2 wrote dS to smem for both dQ GEMMs
  static constexpr int kBarWg0 = 3;      // per-warpgroup barriers of the deterministic dQ order
  static constexpr int kBarWg1 = 4;

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
  // Transposed views (same bytes) used as MN-major B operands.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{},
      make_ordered_layout(Shape<Int<kDqk>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutdOt = decltype(composition(
      SmemLayoutdO{},
      make_ordered_layout(Shape<Int<kDv>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_ordered_layout(Shape<Int<kDqk>, Int<kBlockN>>{}, Step<_2, _1>{})));
  // dS (queries x keys) stored query-contiguous: the MN-major A operand of dQ = dS·K.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, Step<_2, _1>{})));

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
  static constexpr int kPElems = kBlockN * kBlockM;  // the fp32 P tile handed from WG1 to WG2

  // v3 dQ staging: one 64-row chunk per buffer, rows padded by 8 floats so the float2 stores of a
  // half-warp (4 rows × 4 column pairs) hit 32 distinct banks; a row stays 16-byte aligned.
  static constexpr int kStageStride = kChunk + 8;
  static constexpr int kStageFloats = kBlockM * kStageStride;

  template <int kBufs>
  struct SharedStorageT {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    cute::array_aligned<float, kPElems, 128> p;
    // Per consumer warpgroup, kBufs staging buffers (4 floats when v3 does not fit).
    cute::array_aligned<float, kBufs == 0 ? 4 : 2 * kBufs * kStageFloats, 128> dq_stage;
    uint64_t kv_full;
    uint64_t q_full[kStages];
    uint64_t q_empty[kStages];
  };
  // Double-buffered staging where it fits (a warp refills one buffer while the other drains),
  // single where only that fits, none (v3 falls back to v2) at the largest head dims.
  static constexpr int kDqBufs = sizeof(SharedStorageT<2>) <= 227 * 1024   ? 2
                                 : sizeof(SharedStorageT<1>) <= 227 * 1024 ? 1
                                                                           : 0;
  using SharedStorage = SharedStorageT<kDqBufs>;
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget");

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
    float* dq_accum;          // (rows, Hq, Dqk) fp32
    float const* lse_log2;    // lse layout
    float const* dpsum;       // lse layout
    int* semaphores;          // deterministic only
    float scale_log2;
    float softcap;
    float softcap_scale;
    bool bulk_dq;             // v3: stage dQ chunks in smem, add them with TMA bulk reduces
    bool skip_dq_add;         // timing experiment only: dQ GEMM without the add (dQ is wrong)
  };

  // Index into the lse-shaped arrays (dense (B, Hq, Nq); varlen (Hq, Tq)).
  static __device__ __forceinline__ int64_t lse_index(Params const& p, SeqInfo const& seq, int b,
                                                      int h, int row) {
    return p.s.cu_q != nullptr ? int64_t(h) * p.s.rows_q + seq.start_q + row
                               : (int64_t(b) * p.s.heads_q + h) * p.s.seqlen_q + row;
  }

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
        Barrier::init(&ss.q_full[i], 1);
        Barrier::init(&ss.q_empty[i], kConsumerThreads);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<24>();
      if (threadIdx.x == 0 && m_lo <= m_hi) produce(p, ss, seq, n_block, hk, m_lo, m_hi);
    } else {
      cutlass::arch::warpgroup_reg_alloc<240>();
      if (wg == 1) {
        consume_p(p, ss, seq, band, b, n_block, hk, m_lo, m_hi);
      } else {
        consume_ds(p, ss, seq, band, b, n_block, hk, m_lo, m_hi);
      }
    }
  }

  static __device__ __forceinline__ void produce(Params const& p, SharedStorage& ss,
                                                 SeqInfo const& seq, int n_block, int hk, int m_lo,
                                                 int m_hi) {
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = p.s.deterministic ? 0 : n_block % count;
    Tensor mQ = p.tma_q.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDqk), p.s.heads_q, p.s.tma_batch));
    Tensor mdO = p.tma_do.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDv), p.s.heads_q, p.s.tma_batch));
    Tensor mK = p.tma_k.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(kDqk), p.s.heads_k, p.s.tma_batch));
    Tensor mV = p.tma_v.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(kDv), p.s.heads_k, p.s.tma_batch));
    Tensor gK = local_tile(domain_offset(make_coord(seq.start_k, _0{}), mK(_, _, hk, seq.tma_batch)),
                           Shape<Int<kBlockN>, Int<kDqk>>{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(seq.start_k, _0{}), mV(_, _, hk, seq.tma_batch)),
                           Shape<Int<kBlockN>, Int<kDv>>{}, make_coord(n_block, _0{}));
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdO{});
    auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));
    TxBarrier::arrive_and_expect_tx(&ss.kv_full, kBytesKV);
    copy(p.tma_k.with(ss.kv_full), tKg, tKs);
    copy(p.tma_v.with(ss.kv_full), tVg, tVs);

    RingState<kStages> st;
    for (int hh = 0; hh < group; ++hh) {
      int const h = hk * group + hh;
      Tensor gQ = local_tile(domain_offset(make_coord(seq.start_q, _0{}), mQ(_, _, h, seq.tma_batch)),
                             Shape<Int<kBlockM>, Int<kDqk>>{}, make_coord(_, _0{}));
      Tensor gdO = local_tile(
          domain_offset(make_coord(seq.start_q, _0{}), mdO(_, _, h, seq.tma_batch)),
          Shape<Int<kBlockM>, Int<kDv>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] = tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                        group_modes<0, 2>(gdO));
      for (int i = 0; i < count; ++i) {
        int const m = query_block_at(i, m_lo, count, rot);
        Barrier::wait(&ss.q_empty[st.index], st.phase ^ 1);
        TxBarrier::arrive_and_expect_tx(&ss.q_full[st.index], kBytesQdO);
        copy(p.tma_q.with(ss.q_full[st.index]), tQg(_, m), tQs(_, st.index));
        copy(p.tma_do.with(ss.q_full[st.index]), tdOg(_, m), tdOs(_, st.index));
        st.advance();
      }
    }
  }

  // Per-thread values of an lse-shaped array for the query columns this thread holds.
  template <int kCols, class CoordRC>
  static __device__ __forceinline__ void load_cols(float (&dst)[kCols], float const* src,
                                                   Params const& p, SeqInfo const& seq, int b,
                                                   int h, int m, CoordRC const& c_rc) {
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      int const row = m * kBlockM + get<1>(c_rc(0, c));
      dst[c] = row < seq.len_q ? __ldg(src + lse_index(p, seq, b, h, row)) : 0.f;
    }
  }

  // dQ chunks of this warpgroup: dQ[:, chunk] += dS·K[:, chunk], added to the fp32 accumulator.
  static __device__ __forceinline__ void dq_update(Params const& p, SharedStorage& ss,
                                                   SeqInfo const& seq, BandMask const& band,
                                                   int b, int h, int m, int n_block, int w,
                                                   int tid, int& buf) {
    if (w >= kNumChunks) return;
    MmaDQ mma;
    auto thr = mma.get_thread_slice(tid);
    Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutdS{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutKt{});
    Tensor tdQrdS = thr.partition_fragment_A(sdS);
    Tensor cdQ = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kChunk>>{}));
    int* sem = nullptr;
    int const bar = w == 0 ? kBarWg0 : kBarWg1;
    if (p.s.deterministic) {
      // Key blocks add to this query block in increasing order: wait for our predecessors.
      int const nblocks_m = (p.s.seqlen_q + kBlockM - 1) / kBlockM;
      sem = p.semaphores + ((int64_t(b) * p.s.heads_q + h) * nblocks_m + m) * 2 + w;
      int n_lo, n_hi;
      band.key_blocks(m * kBlockM, min(m * kBlockM + kBlockM, seq.len_q) - 1, kBlockN, n_lo,
                      n_hi);
      if (tid == 0) {
        while (ld_acquire(sem) != n_block - n_lo) {
        }
      }
      named_sync(bar, 128);
    }
    int64_t const row_stride = int64_t(p.s.heads_q) * kDqk;
    float* base = p.dq_accum + (int64_t(seq.tma_batch) * p.s.seqlen_q + seq.start_q) * row_stride +
                  int64_t(h) * kDqk;
    CUTLASS_PRAGMA_UNROLL
    for (int c = w; c < kNumChunks; c += 2) {
      Tensor sKt_c = local_tile(sKt, Shape<Int<kChunk>, Int<kBlockN>>{}, make_coord(c, _0{}));
      Tensor tdQrK = thr.partition_fragment_B(sKt_c);
      Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kChunk>>{});
      wg_gemm<true, 0, false>(mma, tdQrdS, tdQrK, acc);
      if (p.skip_dq_add) continue;
      if constexpr (kDqBufs > 0) {
        if (p.bulk_dq) {
          // Warp q of the warpgroup holds rows 16q..16q+15 of the chunk (wgmma accumulator layout),
          // so each warp stages and drains its own rows: no warpgroup barrier. Lane l < 16 owns row
          // 16q + l's reduce, and its bulk groups are what it waits on before the buffer is reused.
          int const warp = tid / 32, lane = tid % 32;
          float* stage = ss.dq_stage.data() + (w * kDqBufs + buf) * kStageFloats;
          bulk_wait_read<kDqBufs - 1>();
          __syncwarp();
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(acc); i += 2) {
            *reinterpret_cast<float2*>(stage + get<0>(cdQ(i)) * kStageStride + get<1>(cdQ(i))) =
                make_float2(acc(i), acc(i + 1));
          }
          // Generic-proxy stores must be visible to the async proxy (the bulk copy) before issue.
          cutlass::arch::fence_view_async_shared();
          __syncwarp();
          if (lane < 16) {
            int const r = warp * 16 + lane;
            int const row = m * kBlockM + r;
            if (row < seq.len_q) {
              bulk_reduce_add_f32(base + int64_t(row) * row_stride + c * kChunk,
                                  stage + r * kStageStride, kChunk * int(sizeof(float)));
            }
            bulk_commit();
          }
          buf = buf + 1 == kDqBufs ? 0 : buf + 1;
          continue;
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc); i += 2) {
        int const row = m * kBlockM + get<0>(cdQ(i));
        if (row < seq.len_q) {
          float* dst = base + int64_t(row) * row_stride + c * kChunk + get<1>(cdQ(i));
          red_add_f32x2(dst, acc(i), acc(i + 1));
        }
      }
    }
    if (p.s.deterministic) {
      __threadfence();
      named_sync(bar, 128);
      if (tid == 0) red_release_add(sem, 1);
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

  // WG1: Sᵀ = K·Qᵀ, P = exp(Sᵀ - lse) (masked), hands P to WG2, dV += Pᵀ·dO, half of dQ.
  static __device__ __forceinline__ void consume_p(Params const& p, SharedStorage& ss,
                                                   SeqInfo const& seq, BandMask const& band, int b,
                                                   int n_block, int hk, int m_lo, int m_hi) {
    int const tid = threadIdx.x % 128;
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = p.s.deterministic || count <= 0 ? 0 : n_block % count;
    MmaS mma_s;
    MmaDV mma_dv;
    auto thr_s = mma_s.get_thread_slice(tid);
    auto thr_dv = mma_dv.get_thread_slice(tid);
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdOt{});
    Tensor tSrK = thr_s.partition_fragment_A(sK);
    Tensor tSrQ = thr_s.partition_fragment_B(sQ);
    Tensor tdVrdO = thr_dv.partition_fragment_B(sdOt);
    Tensor accS = partition_fragment_C(mma_s, Shape<_64, Int<kBlockM>>{});
    Tensor accdV = partition_fragment_C(mma_dv, Shape<_64, Int<kDv>>{});
    Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kBlockM>>{}));
    Tensor S_rc = make_tensor(accS.data(), acc_rowcol(accS.layout()));
    Tensor cS_rc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    constexpr int kCols = decltype(size<1>(S_rc))::value;
    float4* p_share = reinterpret_cast<float4*>(ss.p.data());
    clear(accdV);
    int const j0 = n_block * kBlockN;
    int dq_buf = 0;
    bool const softcap = p.softcap > 0.f;

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      for (int hh = 0; hh < group; ++hh) {
        int const h = hk * group + hh;
        for (int i = 0; i < count; ++i) {
          int const m = query_block_at(i, m_lo, count, rot);
          float lse[kCols];
          load_cols(lse, p.lse_log2, p, seq, b, h, m, cS_rc);
          Barrier::wait(&ss.q_full[st.index], st.phase);
          wg_gemm<true, 0, false>(mma_s, tSrK, tSrQ(_, _, _, st.index), accS);

          int const i0 = m * kBlockM;
          bool const full = i0 + kBlockM <= seq.len_q &&
                            band.tile_is_full(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
          RowBounds<decltype(size<0>(S_rc))::value> const mask(
              cS_rc, j0, i0, [&](int j, int& lo, int& hi) { band.key_queries(j, lo, hi); });
          // P for dV, and P·(1 - tanh²) (the softcap chain rule) for WG2's dS.
          float pf[decltype(size(accS))::value];
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < size<0>(S_rc); ++r) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < kCols; ++c) {
              float s = S_rc(r, c);
              float f = 1.f;
              if (softcap) {
                float const t = tanh_fast(s * p.softcap_scale);
                s = p.softcap * t;
                f = 1.f - t * t;
              }
              float pr = exp2f(s * p.scale_log2 - lse[c]);
              if (!full && mask.hidden(cS_rc, r, c)) pr = 0.f;
              S_rc(r, c) = pr;
              pf[S_rc.layout()(r, c)] = pr * f;
            }
          }
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(accS) / 4; ++i) {
            p_share[i * 128 + tid] = make_float4(pf[4 * i], pf[4 * i + 1], pf[4 * i + 2],
                                                 pf[4 * i + 3]);
          }
          named_arrive(kBarPReady, kConsumerThreads);

          Tensor rP = convert_to<Element>(accS);
          Tensor tdVrP = make_tensor(rP.data(), acc_as_A(rP.layout()));
          wg_gemm<false, 0, true>(mma_dv, tdVrP, tdVrdO(_, _, _, st.index), accdV);
          named_sync(kBarDsReady, kConsumerThreads);
          Barrier::arrive(&ss.q_empty[st.index]);
          dq_update(p, ss, seq, band, b, h, m, n_block, 0, tid, dq_buf);
          st.advance();
        }
      }
    }
    // The CTA's shared memory must outlive the bulk reduces still reading it.
    if (p.bulk_dq) bulk_wait_all();
    Tensor cdV = thr_dv.partition_C(make_identity_tensor(Shape<_64, Int<kDv>>{}));
    Element* base = p.dv + int64_t(seq.tma_batch) * p.dv_batch_stride +
                    int64_t(seq.start_k) * p.dv_seq_stride + int64_t(hk) * p.dv_head_stride;
    store_rows(accdV, cdV, base, p.dv_seq_stride, j0, seq.len_k, 1.f);
  }

  // WG2: dPᵀ = V·dOᵀ, dS = P·(1 - tanh²)·(dP - rowsum(dO·O)) written to smem, dK += dSᵀ·Q,
  // the other half of dQ.
  static __device__ __forceinline__ void consume_ds(Params const& p, SharedStorage& ss,
                                                    SeqInfo const& seq, BandMask const& band,
                                                    int b, int n_block, int hk, int m_lo,
                                                    int m_hi) {
    int const tid = threadIdx.x % 128;
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = p.s.deterministic || count <= 0 ? 0 : n_block % count;
    MmaDP mma_dp;
    MmaDK mma_dk;
    auto thr_dp = mma_dp.get_thread_slice(tid);
    auto thr_dk = mma_dk.get_thread_slice(tid);
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdO{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQt{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutdSt{});
    Tensor tdPrV = thr_dp.partition_fragment_A(sV);
    Tensor tdPrdO = thr_dp.partition_fragment_B(sdO);
    Tensor tdKrQ = thr_dk.partition_fragment_B(sQt);
    Tensor tdSsdS = thr_dp.partition_C(sdSt);
    Tensor accdP = partition_fragment_C(mma_dp, Shape<_64, Int<kBlockM>>{});
    Tensor accdK = partition_fragment_C(mma_dk, Shape<_64, Int<kDqk>>{});
    Tensor cP = thr_dp.partition_C(make_identity_tensor(Shape<_64, Int<kBlockM>>{}));
    Tensor P_rc = make_tensor(accdP.data(), acc_rowcol(accdP.layout()));
    Tensor cP_rc = make_tensor(cP.data(), acc_rowcol(cP.layout()));
    constexpr int kCols = decltype(size<1>(P_rc))::value;
    float4 const* p_share = reinterpret_cast<float4 const*>(ss.p.data());
    clear(accdK);
    int const j0 = n_block * kBlockN;
    int dq_buf = 0;

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      for (int hh = 0; hh < group; ++hh) {
        int const h = hk * group + hh;
        for (int i = 0; i < count; ++i) {
          int const m = query_block_at(i, m_lo, count, rot);
          float dpsum[kCols];
          load_cols(dpsum, p.dpsum, p, seq, b, h, m, cP_rc);
          Barrier::wait(&ss.q_full[st.index], st.phase);
          wg_gemm<true, 0, false>(mma_dp, tdPrV, tdPrdO(_, _, _, st.index), accdP);
          named_sync(kBarPReady, kConsumerThreads);
          float pf[decltype(size(accdP))::value];
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(accdP) / 4; ++i) {
            float4 const v = p_share[i * 128 + tid];
            pf[4 * i] = v.x;
            pf[4 * i + 1] = v.y;
            pf[4 * i + 2] = v.z;
            pf[4 * i + 3] = v.w;
          }
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < size<0>(P_rc); ++r) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < kCols; ++c) {
              P_rc(r, c) = pf[P_rc.layout()(r, c)] * (P_rc(r, c) - dpsum[c]);
            }
          }
          Tensor rdS = convert_to<Element>(accdP);
          store_acc_pairs_sw128(tdSsdS, rdS, ss.ds.data());
          // dS was written by ordinary stores and is read next by wgmma (the async proxy).
          cutlass::arch::fence_view_async_shared();
          named_sync(kBarDsReady, kConsumerThreads);
          Tensor tdKrdS = make_tensor(rdS.data(), acc_as_A(rdS.layout()));
          wg_gemm<false, 0, true>(mma_dk, tdKrdS, tdKrQ(_, _, _, st.index), accdK);
          Barrier::arrive(&ss.q_empty[st.index]);
          dq_update(p, ss, seq, band, b, h, m, n_block, 1, tid, dq_buf);
          st.advance();
        }
      }
    }
    if (p.bulk_dq) bulk_wait_all();
    Tensor cdK = thr_dk.partition_C(make_identity_tensor(Shape<_64, Int<kDqk>>{}));
    Element* base = p.dk + int64_t(seq.tma_batch) * p.dk_batch_stride +
                    int64_t(seq.start_k) * p.dk_seq_stride + int64_t(hk) * p.dk_head_stride;
    store_rows(accdK, cdK, base, p.dk_seq_stride, j0, seq.len_k, p.s.scale);
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    bwd_kernel(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

}  // namespace longflash::sm90
