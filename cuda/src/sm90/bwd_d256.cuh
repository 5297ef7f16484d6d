// Backward attention v6/v8 at head dim 256: dV = Pᵀ·dO, dK = scale·dSᵀ·Q per 64-key block,
// dQ += dS·K. Tile 64 keys × 64 queries; K/V once per CTA, Q/dO/lse/dpsum 2-stage ring; P, dS
// through smem, dK/dV/dQ split by head-dim halves over two consumer warpgroups; dQ by fp32 REDs
// (v6) or staged in the spent Q/dO stage and added by bulk reduces (v8, the default).
// Target sm_90a (wgmma SS, TMA, setmaxnreg); Dqk = Dv = 256 only (launcher: else v2).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "bwd.cuh"
#include "bwd_v5.cuh"
#include "utils.cuh"

namespace longflash::sm90 {

template <int kDqk, int kDv>
inline constexpr bool kBwdD256Supported = kDqk == 256 && kDv == 256;

// What the kernel does with dQ. kReduce (v6) and kTile (v8) are backwards; the others time what dQ
// costs (dQ comes out wrong): kNoAdd computes the dQ GEMM but issues no RED, kNone skips the GEMM
// too (the cost of a dK/dV-only kernel, the first half of a separate-dQ-pass design).
// kTile: each warpgroup stages its fp32 dQ half in the step's Q and dO halves that only its own
// GEMMs read, and a writer thread adds the staged halves to the per-tile accumulator (params.h
// dq_first_tile) with four 16 KiB bulk reduces, then releases the stage with the consumers. On the
// H200 the bulk reduces add 64 KiB tiles at 2.5 TB/s where v6's 8-byte REDs reach 1.9 TB/s
// (benchmarks/cuda_reduce_probe.cu), and those REDs are what bounds v6 (NOTES-cuda.md, "v8").
enum class D256Dq : int { kReduce = 0, kNoAdd = 1, kNone = 2, kTile = 3 };

// Why this shape (counting in benchmarks/NOTES-cuda.md, "v6 at hd256"): a warpgroup cannot own
// 64 keys × 256 columns of both dK and dV (256 fp32 per thread), so the two consumer warpgroups
// split dK, dV and dQ by head-dim halves (64 fp32 per thread each, 192 live at the dQ GEMM) and
// split the K = 256 score GEMMs by operand: warpgroup 0 computes S = Q·Kᵀ and P, warpgroup 1
// computes dP = dO·Vᵀ and dS. S is query-major (M = 64 queries), so each thread needs the lse and
// dpsum of only 2 rows. P (bf16/fp16 for the dV GEMM, fp32 P·(1−t²) for the dS pass) and dS meet
// both warpgroups in shared memory; every dK/dV/dQ GEMM is SS with N = 128 (96 B of operands per
// tensor-core clock, under the 128 B/clk of smem). No room for dQ staging next to a 2-stage Q/dO
// ring (K, V 64 KiB + Q, dO 128 KiB + P, dS 16 KiB + the fp32 handoff 16 KiB = 224 KiB), so dQ
// leaves by `red.global.add.v2.f32` from the consumers, as in v2.
template <typename Element_, D256Dq kDqMode = D256Dq::kReduce>
struct BwdKernelD256 {
  static constexpr bool kTileDq = kDqMode == D256Dq::kTile;
  using Element = Element_;
  static constexpr int kD = 256;
  static constexpr int kDqk = kD;  // the names the shared producer (bwd_v5.cuh) reads
  static constexpr int kDv = kD;
  static constexpr int kHalf = kD / 2;  // head-dim columns of dK/dV/dQ owned by one warpgroup
  static constexpr int kBlockM = 64;    // queries per step
  static constexpr int kBlockN = 64;    // keys per CTA
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(fits_register_split(kThreads, kProducerRegs, kConsumerRegs));

  // Named barriers (0 is __syncthreads), 256 threads each: both consumer warpgroups wait.
  static constexpr int kBarPReady = 1;   // P and P·(1−t²) of this step are in smem
  static constexpr int kBarDsReady = 2;  // dS of this step is in smem
  // The one-way hand-backs (warpgroup 1 is done reading this step's P tiles; warpgroup 0 is done
  // reading this step's dS) are mbarriers in SharedStorage (p_free, ds_free), which racecheck
  // verifies. Named barriers split into bar.arrive + bar.sync order the same accesses, but
  // racecheck reports them as races (benchmarks/cuda_racecheck_probe.cu; NOTES-cuda.md, "v6
  // measured").

  using One = Layout<Shape<_1, _1, _1>>;
  // S = Q·Kᵀ and dP = dO·Vᵀ: 64 queries × 64 keys, K = 256, both operands K-major.
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, _64, Int<kD>>>(), One{}));
  // dV_w = Pᵀ·dO_w and dK_w = dSᵀ·Q_w: 64 keys × 128 columns, K = 64 queries. A is the transposed
  // view of the key-contiguous P/dS tile (MN-major), B the transposed view of dO/Q (MN-major).
  using MmaKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHalf>, _64>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      One{}));
  // dQ_w = dS·K_w: 64 queries × 128 columns, K = 64 keys; dS K-major, K_w viewed as Kᵀ (MN-major).
  using MmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHalf>, _64>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      One{}));

  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kD>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutV = SmemLayoutK;   // V and dO share K's and Q's layouts (Dv = Dqk)
  using SmemLayoutdO = SmemLayoutQ;
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{},
      make_ordered_layout(Shape<Int<kD>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_ordered_layout(Shape<Int<kD>, Int<kBlockN>>{}, Step<_2, _1>{})));
  // P and dS as (queries, keys), key-contiguous: one 128-B swizzle row per query.
  using SmemLayoutP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPt = decltype(composition(
      SmemLayoutP{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, Step<_2, _1>{})));

  using GmemLayout = Layout<Shape<int32_t, int32_t, int32_t, int32_t>,
                            Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemLayout{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{},
                                       Shape<Int<kBlockN>, Int<kD>>{}, _1{}));
  using TmaQdO = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                        Shape<Int<kBlockM>, Int<kD>>{}, _1{}));

  static constexpr uint32_t kBytesKV = 2 * kBlockN * kD * sizeof(Element);
  static constexpr uint32_t kBytesQdO = 2 * kBlockM * kD * sizeof(Element);
  static constexpr int kAccElems = kBlockM * kBlockN / 128;  // S/dP fp32 per consumer thread

  // v8's tile order, v7's (bwd_v5.cuh): warpgroup w's 64 x 128 half is the 8192 floats at w·8192,
  // its thread t's dQ fragment element e at (e % 4) + 4·t + 512·(e / 4): 16-byte vectors, a warp's
  // 32 lanes 512 contiguous bytes. The first 4096 floats of a half are staged in the warpgroup's
  // Q half of the step's stage, the next 4096 in its dO half (16 KiB each, the same bytes as the
  // bf16/fp16 64 x 128 operand halves).
  static constexpr int kFragFloats = kBlockM * kHalf / 128;  // accdQ per thread
  static constexpr int kHalfFloats = kBlockM * kHalf;
  static constexpr int kTileFloats = 2 * kHalfFloats;
  static constexpr int kChunkFloats = kHalfFloats / 2;  // one staged chunk, 16 KiB
  static_assert(kChunkFloats * sizeof(float) == kBlockM * kHalf * sizeof(Element),
                "a dQ chunk fills one warpgroup's Q (or dO) half of a stage");
  using DqTileLayout = Layout<Shape<_4, _128, Int<kFragFloats / 4>, _2>,
                              Stride<_1, _4, Int<4 * 128>, Int<kHalfFloats>>>;
  // The operand half of warpgroup w in stage `stage`: columns [128w, 128w + 128) of the K-major
  // 128-B swizzled Q/dO tile are two whole 64-column atom columns, contiguous after the 64 × 128w
  // elements of the atom columns before them (checked against SmemLayoutQ below).
  static constexpr int half_offset(int stage, int w) {
    return stage * kBlockM * kD + w * kBlockM * kHalf;
  }

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutP>, 1024> p;
    cute::array_aligned<Element, cosize_v<SmemLayoutP>, 1024> ds;
    // P·(1−t²) (P without softcap) in fp32, in the accumulator's register order: warpgroup 1's
    // dP fragment has warpgroup 0's S fragment layout, so thread t reads back what thread t wrote
    // (float2 per lane, a warp's 256 B contiguous: no bank conflict).
    cute::array_aligned<float, kBlockM * kBlockN, 128> g;
    cute::array_aligned<float, kStages * kBlockM, 16> lse;
    cute::array_aligned<float, kStages * kBlockM, 16> dpsum;
    uint64_t kv_full;
    uint64_t q_full[kStages];
    uint64_t q_empty[kStages];
    uint64_t p_free;   // 128 arrivals (warpgroup 1) per step but the last
    uint64_t ds_free;  // 128 arrivals (warpgroup 0) per step but the last
    // v8: warpgroup w's dQ half of stage s is staged (one arrival per warp of the warpgroup).
    // Per stage, so that a warpgroup's next arrival (two steps on) needs the stage refilled, which
    // needs the writer's q_empty arrival for this one first: its parity wait cannot miss a phase.
    uint64_t dq_full[kStages][2];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget");

  static_assert(SmemLayoutQ{}(0, kHalf, 1) == half_offset(1, 1) &&
                    SmemLayoutQ{}(kBlockM - 1, kHalf - 1, 0) < half_offset(0, 1) &&
                    SmemLayoutQ{}(0, kD - 1, 1) < half_offset(2, 0),
                "warpgroup halves of a Q/dO stage are contiguous 16 KiB blocks");

  struct Params {
    TmaQdO tma_q;
    TmaKV tma_k;
    TmaKV tma_v;
    TmaQdO tma_do;
    AttnShape s;
    Element* dk;
    int64_t dk_batch_stride, dk_seq_stride, dk_head_stride;
    Element* dv;
    int64_t dv_batch_stride, dv_seq_stride, dv_head_stride;
    float* dq_accum;        // (rows, Hq, 256) fp32
    float const* lse_log2;  // lse layout
    float const* dpsum;     // lse layout
    float scale_log2;
    float softcap;
    float softcap_scale;
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
        // Every consumer thread releases a stage after its last access of the step (v8: after
        // staging its dQ there), and in v8 the writer thread too, once its bulk reduces have read
        // that dQ. The consumers' own arrivals order their lse/dpsum reads before the stats warp's
        // next cp.async into the stage, an edge racecheck can see (through the writer alone, it
        // reported those as races: NOTES-cuda.md "v8").
        Barrier::init(&ss.q_empty[i], kConsumerThreads + (kTileDq ? 1 : 0));
        if constexpr (kTileDq) {
          Barrier::init(&ss.dq_full[i][0], 4);
          Barrier::init(&ss.dq_full[i][1], 4);
        }
      }
      Barrier::init(&ss.p_free, 128);
      Barrier::init(&ss.ds_free, 128);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (m_lo <= m_hi) {
        if (threadIdx.x == 0) {
          produce_kv_qdo<BwdKernelD256>(p, ss, seq, n_block, hk, m_lo, m_hi);
        } else if (threadIdx.x / 32 == 2) {
          load_stats_rows<BwdKernelD256>(p, ss, seq, threadIdx.x % 32, n_block, hk, b, m_lo,
                                         m_hi);
        } else if (kTileDq && threadIdx.x == 32) {
          write_dq_tiles(p, ss, seq, m_lo, m_hi);
        }
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
      consume(p, ss, seq, band, wg - 1, m_lo, m_hi);
    }
  }

  // Warpgroup 0's elementwise pass: S -> P in place, and the dS factor g = P·(1−t²) (softcap) or
  // g = P into the fp32 handoff. Rows are queries, so a thread's lse values are those of its 2
  // rows. kMask: the tile crosses a mask or sequence edge (full tiles: no branch, no select).
  template <bool kMask, bool kSoftcap, class TS, class TC, class TG>
  static __device__ __forceinline__ void p_pass(Params const& p, TS& S_rc, TC const& c_rc,
                                                TG& g_rc, float const* lse_s,
                                                BandMask const& band, int i0, int j0) {
    constexpr int kRows = decltype(size<0>(S_rc))::value;
    constexpr int kCols = decltype(size<1>(S_rc))::value;
    RowBounds<kRows> mask(c_rc, i0, j0, [&](int i, int& lo, int& hi) {
      if constexpr (kMask) band.row_keys(i, lo, hi); else lo = hi = 0;  // unused
    });
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const l = lse_s[get<0>(c_rc(r, 0))];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        float pr, g;
        if constexpr (kSoftcap) {
          float const t = tanh_fast(S_rc(r, c) * p.softcap_scale);
          pr = exp2f(p.softcap * t * p.scale_log2 - l);
          g = pr * (1.f - t * t);
        } else {
          pr = exp2f(S_rc(r, c) * p.scale_log2 - l);
          g = pr;
        }
        if constexpr (kMask) {
          if (mask.hidden(c_rc, r, c)) {
            pr = 0.f;
            g = 0.f;
          }
        }
        S_rc(r, c) = pr;
        g_rc(r, c) = g;
      }
    }
  }

  // v8's writer (lane 0 of warp 1): walks the consumers' steps; once warpgroup w has staged its
  // half of a step's dQ, adds it to the tile with two 16 KiB bulk reduces; once all four have read
  // shared memory, adds its arrival to the consumers' on the stage's q_empty. The whole tile is
  // added, rows past the sequence included (zeros: P = 0 there), into the sequence's own tiles
  // (dq_first_tile).
  static __device__ __forceinline__ void write_dq_tiles(Params const& p, SharedStorage& ss,
                                                        SeqInfo const& seq, int m_lo, int m_hi) {
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    int const count = m_hi - m_lo + 1;
    int const rot = n_block % count;  // the consumers' rotation (consume)
    int const group = p.s.heads_q / p.s.heads_k;
    int64_t const tile_stride = int64_t(p.s.heads_q) * kTileFloats;  // next query tile
    float* head_base =
        p.dq_accum + dq_tile_offset(p.s, b, seq.start_q, 0, hk * group, kBlockM, kD);
    uint32_t const q0 = static_cast<uint32_t>(__cvta_generic_to_shared(ss.q.data()));
    uint32_t const do0 = static_cast<uint32_t>(__cvta_generic_to_shared(ss.dout.data()));
    uint32_t const full0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq_full[0][0]));
    uint32_t const empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.q_empty[0]));
    constexpr int kChunkBytes = kChunkFloats * int(sizeof(float));
    int step = 0;
#pragma unroll 1
    for (int hh = 0; hh < group; ++hh, head_base += kTileFloats) {
#pragma unroll 1
      for (int i = 0; i < count; ++i, ++step) {
        int const stage = step & 1;
        uint32_t const parity = (step >> 1) & 1;
        float* const dst = head_base + query_block_at(i, m_lo, count, rot) * tile_stride;
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          uint32_t const off = half_offset(stage, w) * int(sizeof(Element));
          wait_parity(full0 + 8 * (2 * stage + w), parity);
          bulk_reduce_add_f32_s(dst + w * kHalfFloats, q0 + off, kChunkBytes);
          bulk_reduce_add_f32_s(dst + w * kHalfFloats + kChunkFloats, do0 + off, kChunkBytes);
        }
        bulk_commit();
        bulk_wait_read<0>();
        arrive_shared(empty0 + 8 * stage);
      }
    }
    // The CTA's shared memory must outlive the bulk reduces, and their adds must land.
    bulk_wait_all();
  }

  // v8: the (row, column) of the 64 × 256 tile that dQ fragment element e of thread t of
  // warpgroup w holds, from the dQ TiledMMA's own partition (read by v7's postprocess,
  // dq_postprocess_tiles, which v8 shares).
  static __host__ __device__ __forceinline__ cute::tuple<int, int> dq_cell(int w, int t, int e) {
    MmaDQ mma;
    auto const c = mma.get_thread_slice(t).partition_C(
        make_identity_tensor(Shape<Int<kBlockM>, Int<kHalf>>{}))(e);
    return cute::make_tuple(int(get<0>(c)), kHalf * w + int(get<1>(c)));
  }

  static __device__ __forceinline__ void consume(Params const& p, SharedStorage& ss,
                                                 SeqInfo const& seq, BandMask const& band, int w,
                                                 int m_lo, int m_hi) {
    int const tid = threadIdx.x % 128;
    auto const [n_block, hk, b] = bwd_block(p.head_group, p.s.heads_k);
    int const group = p.s.heads_q / p.s.heads_k;
    int const count = m_hi - m_lo + 1;
    int const rot = count <= 0 ? 0 : n_block % count;
    MmaSdP mma_sdp;
    MmaKV mma_kv;
    MmaDQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_kv = mma_kv.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutKt{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutQt{});
    Tensor sP = make_tensor(make_smem_ptr(ss.p.data()), SmemLayoutP{});
    Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), SmemLayoutPt{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutP{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutPt{});
    // Columns [128w, 128w + 128) of dO, Q (as the B operand, columns × queries) and K (columns ×
    // keys): whole 64-column swizzle atoms.
    Tensor sdOt_w =
        local_tile(sdOt, Shape<Int<kHalf>, Int<kBlockM>, Int<kStages>>{}, make_coord(w, _0{}, _0{}));
    Tensor sQt_w =
        local_tile(sQt, Shape<Int<kHalf>, Int<kBlockM>, Int<kStages>>{}, make_coord(w, _0{}, _0{}));
    Tensor sKt_w = local_tile(sKt, Shape<Int<kHalf>, Int<kBlockN>>{}, make_coord(w, _0{}));

    // Warpgroup 0: S = Q·Kᵀ; warpgroup 1: dP = dO·Vᵀ (same MMA, same fragment layouts).
    Tensor tSrA = thr_sdp.partition_fragment_A(w == 0 ? sQ : sdO);
    Tensor tSrB = thr_sdp.partition_fragment_B(w == 0 ? sK : sV);
    Tensor tVrP = thr_kv.partition_fragment_A(sPt);
    Tensor tVrdO = thr_kv.partition_fragment_B(sdOt_w);
    Tensor tKrdS = thr_kv.partition_fragment_A(sdSt);
    Tensor tKrQ = thr_kv.partition_fragment_B(sQt_w);
    Tensor tQrdS = thr_dq.partition_fragment_A(sdS);
    Tensor tQrK = thr_dq.partition_fragment_B(sKt_w);
    // Where this thread's S/dP accumulator elements live in the (queries, keys) P/dS tiles.
    Tensor tPsP = thr_sdp.partition_C(sP);
    Tensor tPsdS = thr_sdp.partition_C(sdS);

    Tensor accS = partition_fragment_C(mma_sdp, Shape<_64, _64>{});
    Tensor accdV = partition_fragment_C(mma_kv, Shape<_64, Int<kHalf>>{});
    Tensor accdK = partition_fragment_C(mma_kv, Shape<_64, Int<kHalf>>{});
    Tensor accdQ = partition_fragment_C(mma_dq, Shape<_64, Int<kHalf>>{});
    Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<_64, _64>{}));
    Tensor S_rc = make_tensor(accS.data(), acc_rowcol(accS.layout()));
    Tensor cS_rc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<_64, Int<kHalf>>{}));
    static_assert(decltype(size(accS))::value == kAccElems);

    clear(accdV);
    clear(accdK);
    int const j0 = n_block * kBlockN;
    bool const softcap = p.softcap > 0.f;
    int const row_stride = p.s.heads_q * kD;  // floats; < 2^31 (validated extents)
    float* const dq_rows =
        p.dq_accum + (int64_t(seq.tma_batch) * p.s.seqlen_q + seq.start_q) * row_stride +
        int64_t(hk) * group * kD + w * kHalf;
    // The register-order slot of this thread's first S/dP element pair in the fp32 handoff.
    float* const g_slot = ss.g.data() + 2 * tid;

    if (m_lo <= m_hi) {
      Barrier::wait(&ss.kv_full, 0);
      RingState<kStages> st;
      int step = 0;
      for (int hh = 0; hh < group; ++hh) {
        for (int i = 0; i < count; ++i, ++step) {
          int const m = query_block_at(i, m_lo, count, rot);
          int const i0 = m * kBlockM;
          bool const last = hh + 1 == group && i + 1 == count;
          Barrier::wait(&ss.q_full[st.index], st.phase);
          wg_gemm<true, -1, false>(mma_sdp, tSrA(_, _, _, st.index), tSrB, accS);
          if (w == 0) {
            bool const full = i0 + kBlockM <= seq.len_q &&
                              band.tile_is_full(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
            float const* lse_s = ss.lse.data() + st.index * kBlockM;
            // g in accumulator order: g[e] belongs to accS(e).
            float g[kAccElems];
            Tensor g_rc = make_tensor(make_rmem_ptr<float>(g), acc_rowcol(accS.layout()));
            warpgroup_wait<0>();
            warpgroup_fence_operand(accS);
            if (full) {
              if (softcap) {
                p_pass<false, true>(p, S_rc, cS_rc, g_rc, lse_s, band, i0, j0);
              } else {
                p_pass<false, false>(p, S_rc, cS_rc, g_rc, lse_s, band, i0, j0);
              }
            } else {
              if (softcap) {
                p_pass<true, true>(p, S_rc, cS_rc, g_rc, lse_s, band, i0, j0);
              } else {
                p_pass<true, false>(p, S_rc, cS_rc, g_rc, lse_s, band, i0, j0);
              }
            }
            // Warpgroup 1's reads of the previous step's P (dV GEMM) and g (dS pass) are done.
            if (step > 0) Barrier::wait(&ss.p_free, (step - 1) & 1);
            store_acc_pairs_sw128(tPsP, accS, ss.p.data());
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < kAccElems; e += 2) {
              *reinterpret_cast<float2*>(g_slot + (e / 2) * 256) = make_float2(g[e], g[e + 1]);
            }
            cutlass::arch::fence_view_async_shared();
            named_sync(kBarPReady, kConsumerThreads);
            wg_gemm<false, -1, false>(mma_kv, tVrP, tVrdO(_, _, _, st.index), accdV);
            named_sync(kBarDsReady, kConsumerThreads);
          } else {
            named_sync(kBarPReady, kConsumerThreads);
            wg_gemm<false, -1, false>(mma_kv, tVrP, tVrdO(_, _, _, st.index), accdV);
            warpgroup_wait<1>();  // dP (the older batch) is done; dV may still run
            warpgroup_fence_operand(accS);
            float const* dpsum_s = ss.dpsum.data() + st.index * kBlockM;
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < kAccElems; e += 2) {
              float2 const gg = *reinterpret_cast<float2 const*>(g_slot + (e / 2) * 256);
              float const d = dpsum_s[get<0>(cS(e))];  // both elements of a pair share a row
              accS(e) = gg.x * (accS(e) - d);
              accS(e + 1) = gg.y * (accS(e + 1) - d);
            }
            // dS overwrites the buffer warpgroup 0's dK/dQ GEMMs of the previous step read.
            // (P and g are released by this warpgroup's arrival after its last wait below,
            // once its dV GEMM has read P too.)
            if (step > 0) Barrier::wait(&ss.ds_free, (step - 1) & 1);
            store_acc_pairs_sw128(tPsdS, accS, ss.ds.data());
            cutlass::arch::fence_view_async_shared();
            named_sync(kBarDsReady, kConsumerThreads);
          }
          wg_gemm<false, -1, false>(mma_kv, tKrdS, tKrQ(_, _, _, st.index), accdK);
          if constexpr (kDqMode != D256Dq::kNone) {
            wg_gemm<true, -1, false>(mma_dq, tQrdS, tQrK, accdQ);
          }
          warpgroup_wait<0>();
          warpgroup_fence_operand(accdV);
          warpgroup_fence_operand(accdK);
          warpgroup_fence_operand(accdQ);
          // Pairs with the other warpgroup's wait before its next write (completion k of each
          // mbarrier is step k's; a warpgroup is never a whole step ahead of the other, so the
          // parity wait cannot alias). None after the last step.
          if (!last) Barrier::arrive(w == 0 ? &ss.ds_free : &ss.p_free);
          if constexpr (kTileDq) {
            // Q half w (dK_w's B, and S's A: waited before P-ready) and dO half w (dV_w's B, and
            // dP's A: waited before dS-ready) of this stage are read by no GEMM any more; the
            // other warpgroup's GEMMs read only its own halves. The stage goes back to the
            // producer once every consumer thread and the writer have arrived on q_empty.
            static_assert(decltype(size(accdQ))::value == kFragFloats);
            float* const chunk0 = reinterpret_cast<float*>(ss.q.data() + half_offset(st.index, w));
            float* const chunk1 =
                reinterpret_cast<float*>(ss.dout.data() + half_offset(st.index, w));
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < kFragFloats; e += 4) {
              int const at = DqTileLayout{}(0, tid, e / 4, 0);  // < kHalfFloats
              float* const dst = at < kChunkFloats ? chunk0 + at : chunk1 + (at - kChunkFloats);
              *reinterpret_cast<float4*>(dst) =
                  make_float4(accdQ(e), accdQ(e + 1), accdQ(e + 2), accdQ(e + 3));
            }
            // The bulk reduces read through the async proxy.
            cutlass::arch::fence_view_async_shared();
            __syncwarp();
            if (tid % 32 == 0) Barrier::arrive(&ss.dq_full[st.index][w]);
          }
          Barrier::arrive(&ss.q_empty[st.index]);
          st.advance();
          // kNoAdd keeps the dQ GEMM alive behind a condition that never holds (softcap >= 0):
          // with nothing reading accdQ, the compiler drops the GEMM's instructions.
          if (kDqMode == D256Dq::kReduce || (kDqMode == D256Dq::kNoAdd && p.softcap < 0.f)) {
            float* const dq_tile = dq_rows + int64_t(hh) * kD + int64_t(i0) * row_stride;
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(accdQ); e += 2) {
              int const row = get<0>(cdQ(e));
              if (i0 + row < seq.len_q) {
                red_add_f32x2(dq_tile + row * row_stride + get<1>(cdQ(e)), accdQ(e),
                              accdQ(e + 1));
              }
            }
          }
        }
      }
    }
    Tensor cKV = thr_kv.partition_C(make_identity_tensor(Shape<_64, Int<kHalf>>{}));
    Element* vbase = p.dv + int64_t(seq.tma_batch) * p.dv_batch_stride +
                     int64_t(seq.start_k) * p.dv_seq_stride + int64_t(hk) * p.dv_head_stride +
                     w * kHalf;
    store_rows(accdV, cKV, vbase, p.dv_seq_stride, j0, seq.len_k, 1.f);
    Element* kbase = p.dk + int64_t(seq.tma_batch) * p.dk_batch_stride +
                     int64_t(seq.start_k) * p.dk_seq_stride + int64_t(hk) * p.dk_head_stride +
                     w * kHalf;
    store_rows(accdK, cKV, kbase, p.dk_seq_stride, j0, seq.len_k, p.s.scale);
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    bwd_kernel_d256(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

}  // namespace longflash::sm90
