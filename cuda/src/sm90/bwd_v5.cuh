// Backward attention v5: v4's dV = Pᵀ·dO, dK = scale·dSᵀ·Q, dQ += scale·dS·K; a writer warp adds dQ.
// Tile 128 keys × 64 queries; K/V once per CTA, Q/dO/lse/dpsum 2-stage ring; dQ 64×128 fp32 staged
// in 2 smem buffers, one 512-B TMA bulk reduce per row. Target sm_90a; hd128 only (else v2).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "bwd.cuh"
#include "bwd_v4.cuh"
#include "utils.cuh"

namespace longflash::sm90 {

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
// drops both (the v4 `timing-v4-no-dq-add` equivalent).
enum class DqMode : int { kReduce = 0, kSkip = 1, kStageOnly = 2 };

// v4 with the dQ reductions taken off the consumers' chain. In v4 each consumer warp waited with
// `cp.async.bulk.wait_group.read` for its previous reduces before restaging, and issued 16 reduces
// itself per step. Here the consumers only write the fp32 tile into one of two staging buffers
// and arrive on its `dq_full` mbarrier; warp 1 of the producer warpgroup (idle in v4) issues the
// reduces, waits for their smem reads one step later and arrives on `dq_empty`. Shared memory pays
// for the second buffer by giving up v4's dS double buffer (one more named barrier per step, see
// consume). The producer warpgroup's 24 registers hold three loops: thread 0 issues the TMA
// copies, warp 1 writes dQ, warp 2 brings lse/dpsum in by cp.async (v4's warp 0 did both loads).
template <typename Element_, int kDqk_, int kDv_>
struct BwdKernelV5 : BwdKernelV4<Element_, kDqk_, kDv_> {
  using Base = BwdKernelV4<Element_, kDqk_, kDv_>;
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr bool kSupported = Base::kSupported;
  static constexpr int kBlockM = Base::kBlockM;
  static constexpr int kBlockN = Base::kBlockN;
  static constexpr int kWgKeys = Base::kWgKeys;
  static constexpr int kStages = Base::kStages;
  static constexpr int kThreads = Base::kThreads;
  static constexpr int kConsumerThreads = Base::kConsumerThreads;
  static constexpr int kChunk = Base::kChunk;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr uint32_t kBytesKV = Base::kBytesKV;
  static constexpr uint32_t kBytesQdO = Base::kBytesQdO;
  // The CTA's pool is 168 × 384 registers (launch bounds); 128·P + 256·C must fit in it.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 168 * kThreads);

  static constexpr int kBarDsReady = Base::kBarDsReady;  // both halves of dS are in smem
  // kBarDsFree + w: warpgroup w's dQ GEMM of the previous step is done, so the single dS buffer
  // may be overwritten (arrived on by w, waited on by the other warpgroup).
  static constexpr int kBarDsFree = 2;

  using MmaS = typename Base::MmaS;
  using MmaDP = typename Base::MmaDP;
  using MmaDV = typename Base::MmaDV;
  using MmaDK = typename Base::MmaDK;
  using MmaDQ = typename Base::MmaDQ;
  using SmemLayoutK = typename Base::SmemLayoutK;
  using SmemLayoutV = typename Base::SmemLayoutV;
  using SmemLayoutQ = typename Base::SmemLayoutQ;
  using SmemLayoutdO = typename Base::SmemLayoutdO;
  using SmemLayoutQt = typename Base::SmemLayoutQt;
  using SmemLayoutdOt = typename Base::SmemLayoutdOt;
  using SmemLayoutKt = typename Base::SmemLayoutKt;
  // One dS buffer (v4 had one per ring stage): the trailing mode of size 1 keeps v4's indexing.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>, _1>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{},
      make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, _1>{}, Step<_2, _1, _3>{})));

  // dQ staging: both warpgroups' 64-column halves of a row side by side, so that the row leaves
  // in one 512-B reduce. Rows padded by 8 floats: the float2 stores of a half-warp (4 rows × 8
  // columns) then hit 32 distinct banks, and each row stays 16-byte aligned for the bulk copy.
  static constexpr int kDqBufs = 2;
  static constexpr int kStageStride = kDqk + 8;
  static constexpr int kStageFloats = kBlockM * kStageStride;

  // 128 KiB K/V/Q/dO + 16 KiB dS + 2 × 34 KiB staging + 1 KiB lse/dpsum = 213 KiB. Keeping v4's two
  // dS buffers would need 229 KiB, over the 227 KiB limit.
  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    cute::array_aligned<float, kDqBufs * kStageFloats, 128> dq_stage;
    cute::array_aligned<float, kStages * kBlockM, 16> lse;
    cute::array_aligned<float, kStages * kBlockM, 16> dpsum;
    uint64_t kv_full;
    uint64_t q_full[kStages];
    uint64_t q_empty[kStages];
    uint64_t dq_full[kDqBufs];   // one arrival per consumer warp
    uint64_t dq_empty[kDqBufs];  // one arrival by the writer warp
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(!kSupported || kSmemBytes <= 227 * 1024, "shared memory budget");

  struct Params : Base::Params {
    DqMode dq_mode;
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
        Barrier::init(&ss.q_full[i], 1 + 32);  // the TMA lane + the stats warp's lanes
        Barrier::init(&ss.q_empty[i], kConsumerThreads);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kDqBufs; ++i) {
        Barrier::init(&ss.dq_full[i], kConsumerWarps);
        Barrier::init(&ss.dq_empty[i], 1);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (m_lo <= m_hi) {
        if (threadIdx.x == 0) {
          produce(p, ss, seq, n_block, hk, m_lo, m_hi);
        } else if (threadIdx.x / 32 == 1 && p.dq_mode != DqMode::kSkip) {
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

  // Warp 0, lane 0: v4's TMA producer (K/V once, Q/dO per stage). The stage's lse and dpsum come
  // from warp 2 (load_stats), so each warp's loop fits the producer warpgroup's 24 registers next
  // to the writer warp's code; q_full counts this lane's arrival (with the TMA bytes) and warp 2's
  // 32.
  static __device__ __forceinline__ void produce(Params const& p, SharedStorage& ss,
                                                 SeqInfo const& seq, int n_block, int hk,
                                                 int m_lo, int m_hi) {
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = n_block % count;
    Tensor mQ = p.tma_q.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDqk), p.s.heads_q, p.s.tma_batch));
    Tensor mdO = p.tma_do.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDv), p.s.heads_q, p.s.tma_batch));
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutdO{});
    {
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
#pragma unroll 1
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

  // Warp 2: lse·log2e and dpsum of each stage's 64 queries, by 4-byte cp.async straight into the
  // stage (zero-filled past the sequence; the lse arrays have no padding a bulk copy could run
  // into). Each lane's arrival on q_full is deferred until its copies land
  // (`cp.async.mbarrier.arrive.noinc`), so no value passes through registers and the warp never
  // waits on a global load.
  static __device__ __forceinline__ void load_stats(Params const& p, SharedStorage& ss) {
    int const lane = threadIdx.x % 32;
    int const n_block = blockIdx.x;
    int const hk = blockIdx.y;
    int const b = blockIdx.z;
    SeqInfo const seq(p.s, b);
    BandMask const band{seq.off, p.s.window_left, p.s.window_right, seq.len_q, seq.len_k};
    int m_lo, m_hi;
    band.query_blocks(n_block * kBlockN, min(n_block * kBlockN + kBlockN, seq.len_k) - 1, kBlockM,
                      m_lo, m_hi);
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
      for (int k = 0; k < kBlockM / 32; ++k) {
        int const row = m * kBlockM + lane + 32 * k;
        // A skipped row still names an address inside the array (len_q >= 1 here).
        int64_t const at = base + min(row, seq.len_q - 1);
        int const bytes = row < seq.len_q ? 4 : 0;
        uint32_t const off = (stage * kBlockM + 32 * k) * int(sizeof(float));
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

  // The dQ-writer warp: walks the consumers' step order; lane l reduces rows l and l + 32 of each
  // staged tile. A buffer is released one step late (`wait_group.read 1`: all but the newest
  // group have been read), so the reads of a step's reduces overlap the next step's chain. Written
  // for the producer warpgroup's 24 registers: one step counter, the query block advanced in place
  // (the rotated order of query_block_at wraps back to its start after `count` steps, where the
  // next head begins), 32-bit row offsets from a per-head base.
  // The block geometry is recomputed here rather than passed in: sharing it with the producer's
  // branch made ptxas spill in the producer (24 registers).
  static __device__ __forceinline__ void write_dq(Params const& p, SharedStorage& ss) {
    static_assert(kDqBufs == 2 && kBlockM == 64, "two buffers, two rows per lane");
    int const n_block = blockIdx.x;
    int const hk = blockIdx.y;
    SeqInfo const seq(p.s, blockIdx.z);
    BandMask const band{seq.off, p.s.window_left, p.s.window_right, seq.len_q, seq.len_k};
    int m_lo, m_hi;
    band.query_blocks(n_block * kBlockN, min(n_block * kBlockN + kBlockN, seq.len_k) - 1, kBlockM,
                      m_lo, m_hi);
    int const lane = threadIdx.x % 32;
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
                            lane * kStageStride * int(sizeof(float));
    uint32_t const full0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_full[0]));
    uint32_t const empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_empty[0]));
#pragma unroll 1
    for (int step = 0; step < total; ++step) {
      int const buf = step & 1;
      wait_parity(full0 + 8 * buf, (step >> 1) & 1);
      if (reduce) {
        int const row = m * kBlockM + lane;
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

  // One consumer warpgroup: v4's chain, with a single dS buffer and the dQ tile handed over.
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

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      // The staging buffer and its phase follow from the step (one tile per step), and the last
      // step from the loop counters: no extra live registers next to v4's.
      int step = 0;
      for (int hh = 0; hh < group; ++hh) {
        for (int i = 0; i < count; ++i, ++step) {
          int const m = query_block_at(i, m_lo, count, rot);
          int const i0 = m * kBlockM;
          Barrier::wait(&ss.q_full[st.index], st.phase);
          wg_gemm<true, -1, false>(mma_s, tSrK, tSrQ(_, _, _, st.index), accS);
          wg_gemm<true, -1, false>(mma_dp, tdPrV, tdPrdO(_, _, _, st.index), accdP);
          bool const full = i0 + kBlockM <= seq.len_q &&
                            band.tile_is_full(i0, i0 + kBlockM - 1, jw0, jw0 + kWgKeys - 1);
          float const* lse_s = ss.lse.data() + st.index * kBlockM;
          float const* dpsum_s = ss.dpsum.data() + st.index * kBlockM;
          warpgroup_wait<1>();
          warpgroup_fence_operand(accS);
          if (full) {
            if (softcap) {
              Base::template pass1<false, true>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            } else {
              Base::template pass1<false, false>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            }
          } else {
            if (softcap) {
              Base::template pass1<true, true>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            } else {
              Base::template pass1<true, false>(p, S_rc, cS_rc, lse_s, qc, band, i0, jw0);
            }
          }
          warpgroup_wait<0>();
          warpgroup_fence_operand(accdP);
          if (full) {
            if (softcap) {
              Base::template pass2<false, true>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band,
                                                i0, jw0);
            } else {
              Base::template pass2<false, false>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band,
                                                 i0, jw0);
            }
          } else {
            if (softcap) {
              Base::template pass2<true, true>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band,
                                               i0, jw0);
            } else {
              Base::template pass2<true, false>(p, S_rc, dP_rc, cS_rc, lse_s, dpsum_s, qc, band,
                                                i0, jw0);
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
          Tensor tdSs = tdSsdS(_, _, _, 0);
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < size(rdS); e += 2) {
            alignas(4) Element pair[2] = {rdS(e), rdS(e + 1)};
            sts_u32(&tdSs(e), *reinterpret_cast<uint32_t*>(pair));
          }
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

          // Hand the tile to the writer warp: columns [64w, 64w + 64) of the shared 64 × 128 buffer.
          int const sb = step & 1;
          Barrier::wait(&ss.dq_empty[sb], ((step >> 1) & 1) ^ 1);
          float* const buf = ss.dq_stage.data() + sb * kStageFloats + w * kChunk;
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
    Tensor cdV = thr_dv.partition_C(make_identity_tensor(Shape<_64, Int<kDv>>{}));
    Element* vbase = p.dv + int64_t(seq.tma_batch) * p.dv_batch_stride +
                     int64_t(seq.start_k) * p.dv_seq_stride + int64_t(hk) * p.dv_head_stride;
    Base::store_rows(accdV, cdV, vbase, p.dv_seq_stride, jw0, seq.len_k, 1.f);
    Tensor cdK = thr_dk.partition_C(make_identity_tensor(Shape<_64, Int<kDqk>>{}));
    Element* kbase = p.dk + int64_t(seq.tma_batch) * p.dk_batch_stride +
                     int64_t(seq.start_k) * p.dk_seq_stride + int64_t(hk) * p.dk_head_stride;
    Base::store_rows(accdK, cdK, kbase, p.dk_seq_stride, jw0, seq.len_k, p.s.scale);
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    bwd_kernel_v5(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

}  // namespace longflash::sm90
