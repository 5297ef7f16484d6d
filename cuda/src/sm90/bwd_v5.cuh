// Backward v5/v7: dV = Pᵀ·dO, dK = scale·dSᵀ·Q on chip per 128-key block, dQ += scale·dS·K.
// Tile 128 keys × 64 queries (hd128) or × 128 queries (hd64), one 64-key chain per warpgroup; K/V
// once per CTA, Q/dO/lse/dpsum 2-stage ring; dQ staged in 2 fp32 smem buffers, reduced into an
// fp32 accumulator by bulk reduces: v5 one per row (row layout), v7 one per warpgroup half (tile
// layout, fragment order; its postprocess is here too). Target sm_90a (wgmma RS/SS, TMA, bulk
// reduce, setmaxnreg); hd64 and hd128 (launcher: else v2).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "bwd.cuh"
#include "utils.cuh"

namespace longflash::sm90 {

// The head dims v5 is written for; the launcher sends every other shape to v2 without
// instantiating the kernel struct.
template <int kDqk, int kDv>
inline constexpr bool kBwdV5Supported = kDqk == kDv && (kDqk == 64 || kDqk == 128);

// The writer warp's primitives on 32-bit shared addresses (its 24 registers leave no room for
// generic pointers to every barrier and buffer).
__device__ __forceinline__ void bulk_reduce_add_f32_s(float* dst, uint32_t src, int bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
      "r"(src), "r"(bytes)
      : "memory");
}
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "retry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra retry;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void arrive_shared(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// 4 bytes global -> shared, zero-filled when src_bytes is 0.
__device__ __forceinline__ void cp_async_4(uint32_t dst, void const* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// Counts as one of the barrier's expected arrivals once this thread's prior cp.async have landed.
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  uint32_t const a = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(a) : "memory");
}

// What v5 does with the dQ tile. kStageOnly and kSkip exist for timing only (dQ comes out wrong):
// kStageOnly keeps the staging and the hand-over to the writer warp but issues no reduce, kSkip
// drops both (the dQ GEMM's result is discarded).
enum class DqMode : int { kReduce = 0, kSkip = 1, kStageOnly = 2 };

// The chain, per 128-key block and query step: each consumer warpgroup owns 64 keys and, from
// registers, runs Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ, the P and dS passes, dV += Pᵀ·dO and
// dK += dSᵀ·Q; both halves of dS meet in shared memory for dQ = dS·K over all 128 keys, which the
// warpgroups split by columns (hd128: 64 each) or by query rows (hd64, 128-query steps: 64 each).
// The consumers only stage the fp32 dQ tile in one of two buffers and arrive on its `dq_full`
// mbarrier; writer warps of the producer warpgroup issue the reduces, wait for their smem reads
// one step later and arrive on `dq_empty`. One dS buffer (two do not fit next to the staging), its
// reuse ordered by one more named barrier pair per step (see consume). The producer warpgroup's 24
// registers hold three loops: thread 0 issues the TMA copies, warp 1 (and warp 3 at hd64) writes
// dQ, warp 2 brings lse/dpsum in by cp.async.
// Producer-side steps and the dK/dV epilogue shared by the 128-key v5 kernel and the hd256 v6
// kernel (bwd_d256.cuh). K is the kernel struct: its tile sizes, shared-memory layouts, TMA
// descriptors (Params) and barriers (SharedStorage) are what differ.

// Warp 0, lane 0: the TMA producer (K/V once, Q/dO per stage, the query blocks of every head of
// the GQA group in the rotated order). q_full also counts the stats warp's 32 arrivals.
template <class K>
__device__ __forceinline__ void produce_kv_qdo(typename K::Params const& p,
                                               typename K::SharedStorage& ss, SeqInfo const& seq,
                                               int n_block, int hk, int m_lo, int m_hi) {
  int const group = p.s.heads_q / p.s.heads_k;
  int const count = m_hi - m_lo + 1;
  int const rot = n_block % count;
  Tensor mQ = p.tma_q.get_tma_tensor(
      make_shape(p.s.rows_q, int32_t(K::kDqk), p.s.heads_q, p.s.tma_batch));
  Tensor mdO = p.tma_do.get_tma_tensor(
      make_shape(p.s.rows_q, int32_t(K::kDv), p.s.heads_q, p.s.tma_batch));
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename K::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename K::SmemLayoutdO{});
  {
    Tensor mK = p.tma_k.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(K::kDqk), p.s.heads_k, p.s.tma_batch));
    Tensor mV = p.tma_v.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(K::kDv), p.s.heads_k, p.s.tma_batch));
    Tensor gK =
        local_tile(domain_offset(make_coord(seq.start_k, _0{}), mK(_, _, hk, seq.tma_batch)),
                   Shape<Int<K::kBlockN>, Int<K::kDqk>>{}, make_coord(n_block, _0{}));
    Tensor gV =
        local_tile(domain_offset(make_coord(seq.start_k, _0{}), mV(_, _, hk, seq.tma_batch)),
                   Shape<Int<K::kBlockN>, Int<K::kDv>>{}, make_coord(n_block, _0{}));
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename K::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename K::SmemLayoutV{});
    auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));
    TxBarrier::arrive_and_expect_tx(&ss.kv_full, K::kBytesKV);
    copy(p.tma_k.with(ss.kv_full), tKg, tKs);
    copy(p.tma_v.with(ss.kv_full), tVg, tVs);
  }

  RingState<K::kStages> st;
  for (int hh = 0; hh < group; ++hh) {
    int const h = hk * group + hh;
    Tensor gQ =
        local_tile(domain_offset(make_coord(seq.start_q, _0{}), mQ(_, _, h, seq.tma_batch)),
                   Shape<Int<K::kBlockM>, Int<K::kDqk>>{}, make_coord(_, _0{}));
    Tensor gdO =
        local_tile(domain_offset(make_coord(seq.start_q, _0{}), mdO(_, _, h, seq.tma_batch)),
                   Shape<Int<K::kBlockM>, Int<K::kDv>>{}, make_coord(_, _0{}));
    auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                    group_modes<0, 2>(gQ));
    auto [tdOg, tdOs] = tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                      group_modes<0, 2>(gdO));
#pragma unroll 1
    for (int i = 0; i < count; ++i) {
      int const m = query_block_at(i, m_lo, count, rot);
      Barrier::wait(&ss.q_empty[st.index], st.phase ^ 1);
      TxBarrier::arrive_and_expect_tx(&ss.q_full[st.index], K::kBytesQdO);
      copy(p.tma_q.with(ss.q_full[st.index]), tQg(_, m), tQs(_, st.index));
      copy(p.tma_do.with(ss.q_full[st.index]), tdOg(_, m), tdOs(_, st.index));
      st.advance();
    }
  }
}

// Warp 2: lse·log2e and dpsum of each stage's K::kBlockM queries, by 4-byte cp.async straight into
// the stage (zero-filled past the sequence; the lse arrays have no padding a bulk copy could run
// into). Each lane's arrival on q_full is deferred until its copies land
// (`cp.async.mbarrier.arrive.noinc`), so no value passes through registers and the warp never
// waits on a global load.
template <class K>
__device__ __forceinline__ void load_stats_rows(typename K::Params const& p,
                                                typename K::SharedStorage& ss, SeqInfo const& seq,
                                                int lane, int n_block, int hk, int b, int m_lo,
                                                int m_hi) {
  int const group = p.s.heads_q / p.s.heads_k;
  int const count = m_hi - m_lo + 1;
  int const total = group * count;
  int64_t const head_step = p.s.cu_q != nullptr ? int64_t(p.s.rows_q) : int64_t(p.s.seqlen_q);
  // Row r of (b, h) in the lse-shaped arrays (dense (B, Hq, Nq); varlen (Hq, Tq)).
  int64_t base = p.s.cu_q != nullptr
                     ? int64_t(hk) * group * p.s.rows_q + seq.start_q
                     : (int64_t(b) * p.s.heads_q + int64_t(hk) * group) * p.s.seqlen_q;
  int m = m_lo + n_block % count;
  int i = 0;
  uint32_t const lse0 = static_cast<uint32_t>(__cvta_generic_to_shared(ss.lse.data() + lane));
  uint32_t const dpsum0 =
      static_cast<uint32_t>(__cvta_generic_to_shared(ss.dpsum.data() + lane));
#pragma unroll 1
  for (int step = 0; step < total; ++step) {
    int const stage = step & 1;
    Barrier::wait(&ss.q_empty[stage], ((step >> 1) & 1) ^ 1);
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < K::kBlockM / 32; ++k) {
      int const row = m * K::kBlockM + lane + 32 * k;
      // A skipped row still names an address inside the array (len_q >= 1 here).
      int64_t const at = base + min(row, seq.len_q - 1);
      int const bytes = row < seq.len_q ? 4 : 0;
      uint32_t const off = (stage * K::kBlockM + 32 * k) * int(sizeof(float));
      cp_async_4(lse0 + off, p.lse_log2 + at, bytes);
      cp_async_4(dpsum0 + off, p.dpsum + at, bytes);
    }
    cp_async_arrive_noinc(&ss.q_full[stage]);
    m = m == m_hi ? m_lo : m + 1;
    if (++i == count) {
      i = 0;
      base += head_step;
    }
  }
}

// dK or dV rows of a warpgroup's accumulator, scaled by mul, as element pairs; rows past the
// sequence are skipped.
template <class Element, class Acc, class Coord>
__device__ __forceinline__ void store_rows(Acc const& acc, Coord const& coord, Element* base,
                                           int64_t seq_stride, int j0, int len_k, float mul) {
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


// kTileDq (v7): the workspace's dQ accumulator holds one contiguous tile per (query tile, head), in
// the order of DqTileLayout, so each consumer thread stages its fragment as 16-byte vectors at
// consecutive addresses across the warp and the writer adds each warpgroup's half with one bulk
// reduce; without it (v5) the accumulator is row-major like dq and each row is its own reduce.
// The chain is the same code either way. BwdKernelV5 and BwdKernelV7 below name the two.
template <typename Element_, int kDqk_, int kDv_, bool kTileDq_>
struct BwdKernelV5Impl {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr bool kTileDq = kTileDq_;
  static_assert(kBwdV5Supported<kDqk, kDv>, "v5 is written for hd64 and hd128");
  // At hd64 a 64-query step would halve the FLOPs per step while the exp work per score and the
  // per-step barriers and waits stay: 128 queries keep hd128's 10.5 MFLOP per step, with the
  // same register peak (Sᵀ, dPᵀ 64 each + dV, dK 32 each = 192 fp32 per thread).
  static constexpr int kBlockM = kDqk == 64 ? 128 : 64;  // queries per step
  static constexpr int kBlockN = 128;  // keys per CTA: 64 per consumer warpgroup
  static constexpr int kWgKeys = 64;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  // dQ = dS·K split between the warpgroups: by columns at hd128 (each half a whole 64-column
  // swizzle atom of K), by query rows at hd64 (64 columns are one atom; one wgmma M atom per
  // warpgroup). Warpgroup w's tile is kDqRows × kChunk either way.
  static constexpr bool kDqSplitRows = kDqk == 64;
  static constexpr int kDqRows = kDqSplitRows ? kBlockM / 2 : kBlockM;
  static constexpr int kChunk = kDqSplitRows ? kDqk : kDqk / 2;
  static_assert(kChunk % 64 == 0 && kDqRows == 64,
                "a dQ tile is one 64-row wgmma atom of whole 64-column swizzle atoms");
  // The CTA's pool is 168 × 384 registers (launch bounds); 128·P + 256·C must fit in it.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(fits_register_split(kThreads, kProducerRegs, kConsumerRegs));

  // At hd64 the mask-free softcap passes (64 + 64 scores per thread) made ptxas spill 128 B
  // across the whole consumer loop; softcap tiles take the masked passes there (the extra
  // compares are cheap next to the tanh and the exp per score), which fit in 240 registers.
  static constexpr bool kFullSoftcapPasses = !kDqSplitRows;

  static constexpr int kBarDsReady = 1;  // both halves of dS are in smem
  // kBarDsFree + w: warpgroup w's dQ GEMM of the previous step is done, so the single dS buffer
  // may be overwritten (arrived on by w, waited on by the other warpgroup).
  static constexpr int kBarDsFree = 2;

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
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kDqRows>, Int<kChunk>, Int<kBlockN>>,
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
  // dS (queries × keys) stored query-contiguous: the MN-major A operand of dQ = dS·K. One buffer;
  // the trailing mode of size 1 keeps the stage-indexed form of the two-buffer version.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>, _1>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{},
      make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, _1>{}, Step<_2, _1, _3>{})));

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

  // dQ staging, v5: a row of the tile (both warpgroups' halves at hd128) leaves in one bulk
  // reduce. Rows padded by 8 floats: the float2 stores of a half-warp (4 rows × 8 columns) then hit
  // 32 distinct banks, and each row stays 16-byte aligned for the bulk copy.
  static constexpr int kDqBufs = 2;
  static constexpr int kStageStride = kDqk + 8;
  // v7: the tile unpadded in DqTileLayout order (below), the same order as in global memory.
  static constexpr int kTileFloats = kBlockM * kDqk;
  static constexpr int kStageFloats = kTileDq ? kTileFloats : kBlockM * kStageStride;
  // One writer warp per 64 rows of the tile, so each issues hd128's 2 reduces per lane per step.
  // v7 needs one writer thread (lane 0 of warp 1): two bulk reduces per step.
  static constexpr int kWriterWarps = kBlockM / 64;
  static_assert(kWriterWarps == 1 || kWriterWarps == 2, "writer warps are warps 1 and 3");
  // dq_full: v5 one barrier per buffer (all 8 consumer warps arrive); v7 one per buffer and
  // warpgroup half (its 4 warps arrive), so the writer starts on a half as soon as it is staged.
  static constexpr int kDqFullBars = kTileDq ? 2 * kDqBufs : kDqBufs;
  static constexpr int kDqFullArrivals = kTileDq ? kConsumerWarps / 2 : kConsumerWarps;
  static constexpr int kDqEmptyArrivals = kTileDq ? 1 : kWriterWarps;

  // v7's tile order: warpgroup w's half (kDqRows × kChunk cells) is the 4096 floats at w·4096, its
  // thread t's fragment element e at (e % 4) + 4·t + 512·(e / 4) within it: a thread's 4
  // consecutive fragment elements form one 16-byte vector, and the 32 lanes of a warp store 32
  // consecutive vectors (each quarter-warp 128 contiguous bytes: all 32 banks once). Which cell
  // fragment element e of thread t holds is the dQ TiledMMA's own partition (dq_cell).
  static constexpr int kFragFloats = kDqRows * kChunk / 128;  // accdQ per thread
  static constexpr int kHalfFloats = kDqRows * kChunk;
  static_assert(kFragFloats % 4 == 0 && 2 * kHalfFloats == kTileFloats);
  using DqTileLayout = Layout<Shape<_4, _128, Int<kFragFloats / 4>, _2>,
                              Stride<_1, _4, Int<4 * 128>, Int<kHalfFloats>>>;

  // hd128: 128 KiB K/V/Q/dO + 16 KiB dS + 2 × 34 KiB staging + 1 KiB lse/dpsum = 214 KiB with
  // alignment (a second dS buffer would need 229 KiB, over the 227 KiB limit). hd64: 96 KiB +
  // 32 KiB dS + 2 × 36 KiB + 2 KiB = 203 KiB (a second dS buffer: 235 KiB). v7's unpadded
  // staging (2 × 32 KiB) gives 210 KiB at hd128 (a second dS buffer would fit: 226 KiB) and
  // 195 KiB at hd64.
  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    cute::array_aligned<float, kDqBufs * kStageFloats, 128> dq_stage;
    // lse·log2e and rowsum(dO·O) of each stage's queries, written by the stats warp.
    cute::array_aligned<float, kStages * kBlockM, 16> lse;
    cute::array_aligned<float, kStages * kBlockM, 16> dpsum;
    uint64_t kv_full;
    uint64_t q_full[kStages];
    uint64_t q_empty[kStages];
    uint64_t dq_full[kDqFullBars];  // one arrival per consumer warp (v7: of one warpgroup)
    uint64_t dq_empty[kDqBufs];     // one arrival per writer warp (v7: the writer thread)
  };
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
    float* dq_accum;        // (rows, Hq, Dqk) fp32
    float const* lse_log2;  // lse layout
    float const* dpsum;     // lse layout
    float scale_log2;
    float softcap;
    float softcap_scale;
    DqMode dq_mode;
    int head_group;  // the grid's order (bwd_block)
  };

  static __device__ __forceinline__ void run(Params const& p, char* smem_raw) {
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
    int const wg = threadIdx.x / 128;
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    if (b >= p.s.batch) return;  // a grouped grid's last group may be short (bwd_block)
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
        Barrier::init(&ss.q_full[i], 1 + 32);  // the TMA lane + the stats warp's lanes
        Barrier::init(&ss.q_empty[i], kConsumerThreads);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kDqBufs; ++i) {
        Barrier::init(&ss.dq_full[i], kDqFullArrivals);
        if constexpr (kTileDq) Barrier::init(&ss.dq_full[kDqBufs + i], kDqFullArrivals);
        Barrier::init(&ss.dq_empty[i], kDqEmptyArrivals);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (m_lo <= m_hi) {
        if (threadIdx.x == 0) {
          produce_kv_qdo<BwdKernelV5Impl>(p, ss, seq, n_block, hk, m_lo, m_hi);
        } else if constexpr (kTileDq) {
          if (threadIdx.x == 32 && p.dq_mode != DqMode::kSkip) write_dq_tiles(p, ss);
          if (threadIdx.x / 32 == 2) load_stats(p, ss);
        } else if ((threadIdx.x / 32 == 1 || (kWriterWarps == 2 && threadIdx.x / 32 == 3)) &&
                   p.dq_mode != DqMode::kSkip) {
          write_dq(p, ss);
        } else if (threadIdx.x / 32 == 2) {
          load_stats(p, ss);
        }
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
      consume(p, ss, seq, band, n_block, hk, wg - 1, m_lo, m_hi);
    }
  }

  // The query blocks [m_lo, m_hi] that see key block n_block of `seq`: the CTA's steps. The
  // producer-warpgroup roles recompute it rather than receive it from run() (see load_stats).
  static __device__ __forceinline__ void query_range(Params const& p, SeqInfo const& seq,
                                                     int n_block, int& m_lo, int& m_hi) {
    BandMask const band{seq.off, p.s.window_left, p.s.window_right, seq.len_q, seq.len_k};
    int const j0 = n_block * kBlockN;
    band.query_blocks(j0, min(j0 + kBlockN, seq.len_k) - 1, kBlockM, m_lo, m_hi);
  }

  // Warp 2: the stage statistics (load_stats_rows). Split from the TMA producer (warp 0, lane 0:
  // produce_kv_qdo) so that each warp's loop fits the producer warpgroup's 24 registers next to the
  // writer warps' code; the block geometry is recomputed here rather than passed in, as in the
  // writer warp: sharing it with the producer's branch made ptxas spill.
  static __device__ __forceinline__ void load_stats(Params const& p, SharedStorage& ss) {
    int const lane = threadIdx.x % 32;
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    SeqInfo const seq(p.s, b);
    int m_lo, m_hi;
    query_range(p, seq, n_block, m_lo, m_hi);
    load_stats_rows<BwdKernelV5Impl>(p, ss, seq, lane, n_block, hk, b, m_lo, m_hi);
  }

  // A dQ-writer warp: walks the consumers' step order; writer warp x (0: warp 1, 1: warp 3) takes
  // rows [64x, 64x + 64) of each staged tile, its lane l rows 64x + l and 64x + l + 32. A buffer
  // is released one step late (`wait_group.read 1`: all but the newest group have been read), so
  // the reads of a step's reduces overlap the next step's chain; with two writers `dq_empty`
  // completes when both have released it. Written for the producer warpgroup's 24 registers: one
  // step counter, the query block advanced in place (the rotated order of query_block_at wraps
  // back to its start after `count` steps, where the next head begins), 32-bit row offsets from a
  // per-head base.
  // The block geometry is recomputed here rather than passed in: sharing it with the producer's
  // branch made ptxas spill in the producer (24 registers).
  static __device__ __forceinline__ void write_dq(Params const& p, SharedStorage& ss) {
    static_assert(kDqBufs == 2 && kBlockM == 64 * kWriterWarps, "two buffers, two rows per lane");
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    SeqInfo const seq(p.s, b);
    int m_lo, m_hi;
    query_range(p, seq, n_block, m_lo, m_hi);
    int const lane = threadIdx.x % 32;
    int const r0 = kWriterWarps == 1 ? lane : lane + (threadIdx.x / 32 == 3 ? 64 : 0);
    int const count = m_hi - m_lo + 1;
    int const total = (p.s.heads_q / p.s.heads_k) * count;
    int const row_stride = p.s.heads_q * kDqk;  // floats; < 2^31 (validated extents)
    bool const reduce = p.dq_mode == DqMode::kReduce;
    float* dq_head = p.dq_accum +
                     (int64_t(seq.tma_batch) * p.s.seqlen_q + seq.start_q) * row_stride +
                     int64_t(hk) * (p.s.heads_q / p.s.heads_k) * kDqk;
    int m = m_lo + n_block % count;
    int i = 0;
    uint32_t const stage0 = static_cast<uint32_t>(__cvta_generic_to_shared(ss.dq_stage.data())) +
                            r0 * kStageStride * int(sizeof(float));
    uint32_t const full0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_full[0]));
    uint32_t const empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_empty[0]));
#pragma unroll 1
    for (int step = 0; step < total; ++step) {
      int const buf = step & 1;
      wait_parity(full0 + 8 * buf, (step >> 1) & 1);
      if (reduce) {
        int const row = m * kBlockM + r0;
        uint32_t const src = stage0 + buf * (kStageFloats * int(sizeof(float)));
        if (row < seq.len_q) {
          bulk_reduce_add_f32_s(dq_head + int64_t(row) * row_stride, src,
                                kDqk * int(sizeof(float)));
        }
        if (row + 32 < seq.len_q) {
          bulk_reduce_add_f32_s(dq_head + int64_t(row + 32) * row_stride,
                                src + 32 * kStageStride * int(sizeof(float)),
                                kDqk * int(sizeof(float)));
        }
        bulk_commit();
      }
      if (step > 0) {
        bulk_wait_read<1>();
        __syncwarp();
        if (lane == 0) arrive_shared(empty0 + 8 * (buf ^ 1));
      }
      m = m == m_hi ? m_lo : m + 1;
      if (++i == count) {
        i = 0;
        dq_head += kDqk;
      }
    }
    // The CTA's shared memory must outlive the bulk reduces still reading it.
    bulk_wait_all();
  }

  // v7's writer: one thread (lane 0 of warp 1) walks the consumers' step order and adds each
  // staged half to its tile with one bulk reduce of kHalfFloats floats, as soon as that half's
  // warpgroup has arrived on dq_full; the buffer is released one step late, as in write_dq. The
  // whole tile is added, rows past the sequence included (they hold zeros: P = 0 there), into the
  // sequence's own tiles (dq_first_tile), which no other sequence touches.
  static __device__ __forceinline__ void write_dq_tiles(Params const& p, SharedStorage& ss) {
    static_assert(kDqBufs == 2, "two buffers");
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    SeqInfo const seq(p.s, b);
    int m_lo, m_hi;
    query_range(p, seq, n_block, m_lo, m_hi);
    int const count = m_hi - m_lo + 1;
    int const group = p.s.heads_q / p.s.heads_k;
    int const total = group * count;
    int64_t const tile_stride = int64_t(p.s.heads_q) * kTileFloats;
    bool const reduce = p.dq_mode == DqMode::kReduce;
    float* head_base =
        p.dq_accum + dq_tile_offset(p.s, b, seq.start_q, 0, hk * group, kBlockM, kDqk);
    int m = m_lo + n_block % count;
    int i = 0;
    uint32_t const stage0 = static_cast<uint32_t>(__cvta_generic_to_shared(ss.dq_stage.data()));
    uint32_t const full0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_full[0]));
    uint32_t const empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_empty[0]));
    constexpr int kHalfBytes = kHalfFloats * int(sizeof(float));
#pragma unroll 1
    for (int step = 0; step < total; ++step) {
      int const buf = step & 1;
      uint32_t const parity = (step >> 1) & 1;
      uint32_t const src = stage0 + buf * (kStageFloats * int(sizeof(float)));
      float* const dst = head_base + m * tile_stride;
      wait_parity(full0 + 8 * (2 * buf), parity);
      if (reduce) bulk_reduce_add_f32_s(dst, src, kHalfBytes);
      wait_parity(full0 + 8 * (2 * buf + 1), parity);
      if (reduce) {
        bulk_reduce_add_f32_s(dst + kHalfFloats, src + kHalfBytes, kHalfBytes);
        bulk_commit();
      }
      if (step > 0) {
        bulk_wait_read<1>();
        arrive_shared(empty0 + 8 * (buf ^ 1));
      }
      m = m == m_hi ? m_lo : m + 1;
      if (++i == count) {
        i = 0;
        head_base += kTileFloats;  // next head of the group: the next tile of the same row
      }
    }
    bulk_wait_all();
  }

  // v7: the (row, column) of the kBlockM × kDqk tile that fragment element e of thread t of
  // warpgroup w holds after the dQ GEMM, from the same TiledMMA partition the consumer's accdQ
  // comes from (the postprocess and the host-side check read it; nothing restates the wgmma
  // accumulator layout by hand). hd128 splits dQ by columns, hd64 by rows.
  static __host__ __device__ __forceinline__ cute::tuple<int, int> dq_cell(int w, int t, int e) {
    MmaDQ mma;
    auto const c = mma.get_thread_slice(t).partition_C(
        make_identity_tensor(Shape<Int<kDqRows>, Int<kChunk>>{}))(e);
    int const r = get<0>(c), col = get<1>(c);
    return kDqSplitRows ? cute::make_tuple(kDqRows * w + r, col)
                        : cute::make_tuple(r, kChunk * w + col);
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
          S_rc(r, c) = exp2f(S_rc(r, c) * p.scale_log2 - l);
        }
      }
    }
    if constexpr (kMask && !kSoftcap) {
      RowBounds<kRows> const mask(c_rc, jw0, i0, [&](int j, int& lo, int& hi) {
        band.key_queries(j, lo, hi);
      });
      mask.fill_hidden(S_rc, c_rc, 0.f);
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
      if constexpr (kBlockM == 128 && kSoftcap) asm volatile("" ::: "memory");
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
    Tensor sKw = local_tile(sK, Shape<Int<kWgKeys>, Int<kDqk>>{}, make_coord(w, _0{}));
    Tensor sVw = local_tile(sV, Shape<Int<kWgKeys>, Int<kDv>>{}, make_coord(w, _0{}));
    Tensor sdStw =
        local_tile(sdSt, Shape<Int<kWgKeys>, Int<kBlockM>, _1>{}, make_coord(w, _0{}, _0{}));
    // Warpgroup w's dQ operands: at hd128 all 64 queries of dS and K's column half w; at hd64
    // queries [64w, 64w + 64) of dS and all of K.
    auto const sdS_dq = [&] {
      if constexpr (kDqSplitRows) {
        return local_tile(sdS, Shape<Int<kDqRows>, Int<kBlockN>, _1>{}, make_coord(w, _0{}, _0{}));
      } else {
        return sdS;
      }
    }();
    auto const sKt_c = [&] {
      if constexpr (kDqSplitRows) {
        return sKt;
      } else {
        return local_tile(sKt, Shape<Int<kChunk>, Int<kBlockN>>{}, make_coord(w, _0{}));
      }
    }();

    Tensor tSrK = thr_s.partition_fragment_A(sKw);
    Tensor tSrQ = thr_s.partition_fragment_B(sQ);
    Tensor tdPrV = thr_dp.partition_fragment_A(sVw);
    Tensor tdPrdO = thr_dp.partition_fragment_B(sdO);
    Tensor tdVrdO = thr_dv.partition_fragment_B(sdOt);
    Tensor tdKrQ = thr_dk.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS_dq);
    Tensor tdQrK = thr_dq.partition_fragment_B(sKt_c);
    Tensor tdSsdS = thr_dp.partition_C(sdStw);

    Tensor accS = partition_fragment_C(mma_s, Shape<_64, Int<kBlockM>>{});
    Tensor accdP = partition_fragment_C(mma_dp, Shape<_64, Int<kBlockM>>{});
    Tensor accdV = partition_fragment_C(mma_dv, Shape<_64, Int<kDv>>{});
    Tensor accdK = partition_fragment_C(mma_dk, Shape<_64, Int<kDqk>>{});
    Tensor accdQ = partition_fragment_C(mma_dq, Shape<Int<kDqRows>, Int<kChunk>>{});
    Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kBlockM>>{}));
    Tensor S_rc = make_tensor(accS.data(), acc_rowcol(accS.layout()));
    Tensor dP_rc = make_tensor(accdP.data(), acc_rowcol(accdP.layout()));
    Tensor cS_rc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kDqRows>, Int<kChunk>>{}));
    static_assert(decltype(size(accS))::value == decltype(size(accdP))::value);

    clear(accdV);
    clear(accdK);
    int const j0 = n_block * kBlockN;
    int const jw0 = j0 + w * kWgKeys;
    int const qc = 2 * (tid % 4);
    bool const softcap = p.softcap > 0.f;

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      // The staging buffer and its phase follow from the step (one tile per step), and the last
      // step from the loop counters: no extra live registers in the chain.
      int step = 0;
      for (int hh = 0; hh < group; ++hh) {
        for (int i = 0; i < count; ++i, ++step) {
          int const m = query_block_at(i, m_lo, count, rot);
          int const i0 = m * kBlockM;
          Barrier::wait(&ss.q_full[st.index], st.phase);
          wg_gemm<true, -1, false>(mma_s, tSrK, tSrQ(_, _, _, st.index), accS);
          wg_gemm<true, -1, false>(mma_dp, tdPrV, tdPrdO(_, _, _, st.index), accdP);
          bool const full = (kFullSoftcapPasses || !softcap) && i0 + kBlockM <= seq.len_q &&
                            band.tile_is_full(i0, i0 + kBlockM - 1, jw0, jw0 + kWgKeys - 1);
          float const* lse_s = ss.lse.data() + st.index * kBlockM;
          float const* dpsum_s = ss.dpsum.data() + st.index * kBlockM;
          warpgroup_wait<1>();
          warpgroup_fence_operand(accS);
          if (full) {
            if (kFullSoftcapPasses && softcap) {
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
            if (kFullSoftcapPasses && softcap) {
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
          wg_gemm<false, -1, true>(mma_dv, tdVrP, tdVrdO(_, _, _, st.index), accdV);
          // The other warpgroup's dQ GEMM of the previous step read this buffer; it arrived once
          // that GEMM completed (long ago by now: it ran while this warpgroup did Sᵀ, dPᵀ and P).
          if (step > 0) {
            if (w == 0) {
              named_sync(kBarDsFree + 1, kConsumerThreads);
            } else {
              named_sync(kBarDsFree, kConsumerThreads);
            }
          }
          store_acc_pairs_sw128(tdSsdS(_, _, _, 0), rdS, ss.ds.data());
          cutlass::arch::fence_view_async_shared();
          wg_gemm<false, -1, true>(mma_dk, tdKrdS, tdKrQ(_, _, _, st.index), accdK);
          named_sync(kBarDsReady, kConsumerThreads);
          wg_gemm<true, -1, false>(mma_dq, tdQrdS(_, _, _, 0), tdQrK, accdQ);
          warpgroup_wait<0>();
          warpgroup_fence_operand(accdV);
          warpgroup_fence_operand(accdK);
          warpgroup_fence_operand(accdQ);
          warpgroup_fence_operand(rP);
          warpgroup_fence_operand(rdS);
          // Pairs with the other warpgroup's wait above; none after the last step, so no arrival
          // is left pending on the barrier at exit.
          if (hh + 1 < group || i + 1 < count) {
            if (w == 0) {
              named_arrive(kBarDsFree, kConsumerThreads);
            } else {
              named_arrive(kBarDsFree + 1, kConsumerThreads);
            }
          }
          Barrier::arrive(&ss.q_empty[st.index]);
          st.advance();
          if (p.dq_mode == DqMode::kSkip) continue;

          int const sb = step & 1;
          Barrier::wait(&ss.dq_empty[sb], ((step >> 1) & 1) ^ 1);
          if constexpr (kTileDq) {
            // v7: the fragment as it is, 16-byte vectors in DqTileLayout order (half w).
            static_assert(decltype(size(accdQ))::value == kFragFloats);
            float* const buf = ss.dq_stage.data() + sb * kStageFloats;
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < kFragFloats; e += 4) {
              *reinterpret_cast<float4*>(buf + DqTileLayout{}(0, tid, e / 4, w)) =
                  make_float4(accdQ(e), accdQ(e + 1), accdQ(e + 2), accdQ(e + 3));
            }
            cutlass::arch::fence_view_async_shared();
            __syncwarp();
            if (tid % 32 == 0) Barrier::arrive(&ss.dq_full[2 * sb + w]);
          } else {
            // Hand the tile to the writer warps: at hd128 columns [64w, 64w + 64) of the shared
            // 64 × 128 buffer, at hd64 rows [64w, 64w + 64) of the 128 × 64 one.
            float* const buf = ss.dq_stage.data() + sb * kStageFloats +
                               (kDqSplitRows ? w * kDqRows * kStageStride : w * kChunk);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(accdQ); e += 2) {
              *reinterpret_cast<float2*>(buf + get<0>(cdQ(e)) * kStageStride + get<1>(cdQ(e))) =
                  make_float2(accdQ(e), accdQ(e + 1));
            }
            // The writer's bulk reduces read the buffer through the async proxy.
            cutlass::arch::fence_view_async_shared();
            __syncwarp();
            if (tid % 32 == 0) Barrier::arrive(&ss.dq_full[sb]);
          }
        }
      }
    }
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

// Distinct class names (not aliases) keep v5's kernel symbols as they were before v7 existed.
template <typename Element, int kDqk, int kDv>
struct BwdKernelV5 : BwdKernelV5Impl<Element, kDqk, kDv, false> {};
template <typename Element, int kDqk, int kDv>
struct BwdKernelV7 : BwdKernelV5Impl<Element, kDqk, kDv, true> {
  static_assert(BwdKernelV5Impl<Element, kDqk, kDv, true>::kBlockM == bwd_tile_dq_rows(kDqk),
                "the workspace size query sizes v7's tiles by bwd_tile_dq_rows");
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    bwd_kernel_v5(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

// v7's (and v8's) postprocess: dq = scale · accumulator, one CTA per (query tile, head,
// sequence). Thread (w, t) first loads the whole fragment that consumer thread t of warpgroup w
// staged (16-byte vectors, each load coalesced across the warp), then writes its cells (dq_cell)
// as element pairs into a row-major tile in shared memory; the CTA then stores the tile's rows
// to dq in 16-byte vectors, each row's bytes contiguous, skipping rows past the sequence. The
// fragment order is the kernel's (DqTileLayout, the dQ TiledMMA). Storing the pairs straight to
// global memory, one load in flight per thread, ran at 1.2 TB/s on the H200 (173 µs for 16K
// tokens × 2048 columns); see benchmarks/NOTES-cuda.md, "Session 12".
struct DqTileArgs {
  static constexpr int kThreads = 2 * 128;  // one per (consumer warpgroup, thread) fragment
  AttnShape s;
  float const* accum;
  void* dq;
  int64_t batch_stride, seq_stride, head_stride;
};

template <class Kernel>
__global__ void __launch_bounds__(DqTileArgs::kThreads) dq_postprocess_tiles(DqTileArgs const a) {
  using Element = typename Kernel::Element;
  constexpr int kRows = Kernel::kBlockM;
  constexpr int kCols = Kernel::kDqk;
  // 8 elements of padding per row: the pairs a warp writes (8 rows × 4 column pairs) fall in 32
  // distinct banks, and rows stay 16-byte aligned for the vector reads.
  constexpr int kPitch = kCols + 8;
  constexpr int kVecs = Kernel::kFragFloats / 4;
  constexpr int kRowChunks = kCols / 8;
  __shared__ alignas(16) Element tile_s[kRows * kPitch];
  int const m = blockIdx.x;
  int const h = blockIdx.y;
  int const b = blockIdx.z;
  SeqInfo const seq(a.s, b);
  int const row0 = m * kRows;
  if (row0 >= seq.len_q) return;
  int const w = threadIdx.x / 128;
  int const t = threadIdx.x % 128;
  float const* tile =
      a.accum + dq_tile_offset(a.s, b, seq.start_q, m, h, kRows, kCols);
  float4 x[kVecs];
  CUTLASS_PRAGMA_UNROLL
  for (int v = 0; v < kVecs; ++v) {
    x[v] = __ldg(reinterpret_cast<float4 const*>(tile + typename Kernel::DqTileLayout{}(0, t, v, w)));
  }
  float const scale = a.s.scale;
  CUTLASS_PRAGMA_UNROLL
  for (int v = 0; v < kVecs; ++v) {
    float const vals[4] = {x[v].x, x[v].y, x[v].z, x[v].w};
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < 4; k += 2) {
      // Fragment elements 2j and 2j + 1 are neighbouring columns of one row (the m64nNk16
      // accumulator's column pairs; checked on the host, NOTES-cuda.md v7), so they move as one
      // 4-byte pair.
      auto const cell = Kernel::dq_cell(w, t, 4 * v + k);
      alignas(4) Element pair[2] = {Element(vals[k] * scale), Element(vals[k + 1] * scale)};
      *reinterpret_cast<uint32_t*>(&tile_s[get<0>(cell) * kPitch + get<1>(cell)]) =
          *reinterpret_cast<uint32_t*>(pair);
    }
  }
  __syncthreads();
  Element* out = static_cast<Element*>(a.dq) + int64_t(seq.tma_batch) * a.batch_stride +
                 int64_t(seq.start_q + row0) * a.seq_stride + int64_t(h) * a.head_stride;
  int const rows = min(kRows, seq.len_q - row0);
  for (int i = threadIdx.x; i < rows * kRowChunks; i += DqTileArgs::kThreads) {
    int const r = i / kRowChunks;
    int const c = 8 * (i % kRowChunks);
    *reinterpret_cast<uint4*>(out + int64_t(r) * a.seq_stride + c) =
        *reinterpret_cast<uint4 const*>(&tile_s[r * kPitch + c]);
  }
}

}  // namespace longflash::sm90
