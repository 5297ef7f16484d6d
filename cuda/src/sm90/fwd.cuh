// Forward attention: out = softmax(mask(softcap(scale·Q·Kᵀ)))·V, lse = log-sum-exp of each query row.
// Tile 64·kConsumerWGs queries × kBlockN keys; Q read once per tile, K/V (kStages TMA ring) once per query block.
// Persistent: a grid of one CTA per SM walks the tiles heaviest first (FwdTiles), so the next tile's
// Q and K/V loads run under the current tile's last products and epilogue.
// Target sm_90a: TMA, wgmma, producer WG + 2 (default) or 3 (hd64 v3) consumer WGs, softmax overlapped with P·V.
#pragma once

#include <climits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../params.h"
#include "stream_k.h"
#include "utils.cuh"

// A lambda called from two places (a tile of the static schedule, a piece of its stream-K tail)
// must still be inlined: out of line, its captured fragments and row arrays would live in local
// memory.
#define LF_ALWAYS_INLINE __attribute__((always_inline))

namespace longflash::sm90 {

// 2^x for x <= 0 on the FMA and integer pipes instead of MUFU.EX2 (16/clk/SM, which at hd64 is
// as busy as the tensor cores). x = j + f with j = round(x), |f| <= 1/2; 2^f by a cubic fitted
// for the least maximum relative error (1.0e-4, below bf16/fp16 rounding of P); j is added to the
// exponent field. The constant term 1 makes 2^0 exact and, with x clamped at -127, gives exactly
// +0 for -127 and -inf (masked scores), so rows that see nothing still get out 0.
__device__ __forceinline__ float exp2_fma(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound holds round(x) in its low bits
  x = fmaxf(x, -127.f);
  float const t = __fadd_rn(x, kRound);
  float const f = __fsub_rn(x, __fsub_rn(t, kRound));
  float p = __fmaf_rn(0.05500843f, f, 0.24220999f);
  p = __fmaf_rn(p, f, 0.69328287f);
  p = __fmaf_rn(p, f, 1.f);
  // (bits(t) << 23) == round(x) << 23: the 1.5 * 2^23 part shifts out of the word.
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// The forward's tiles (query block, head, sequence) in the order CTAs take them: head by head
// (heads fastest, then sequences, so a GQA group's heads are neighbours), and within one head the
// query blocks from the last to the first (under a causal mask the last blocks see the most keys).
// The CTAs running at one time then share the K/V of a few heads in L2; an order that runs every
// head's heaviest block first streams each CTA's own K/V from HBM and measured ~10% slower at
// hd128, N = 4K. Round r hands tiles [r·G, (r+1)·G) to the G CTAs, in reverse CTA order on odd
// rounds (a snake), so that a CTA that took heavy tiles in one round takes lighter ones in the
// next. With one CTA per tile (G = tile count) this is a single round, the classic grid.
// The dynamic schedule (FwdKernelDynamic, FwdKernelV3Dynamic) walks an order greedily instead:
// each CTA's producer takes the next unclaimed tile from a counter in global memory when it is
// done issuing the loads of its current one, as the hardware hands out CTAs of a grid. With
// `group` > 1 (dynamic only) that order is longest first within groups of `group` consecutive
// (head, sequence) pairs: the group's last query blocks of every head, then the ones before, so
// the greedy claim balances like LPT while the CTAs in flight share a few heads' K/V in L2.
// `group` = 1 is the head-major order above (benchmarks/fwd_schedule_model.py models both).
struct FwdTiles {
  int m_blocks, heads, total, group;

  __device__ __forceinline__ FwdTiles(AttnShape const& s, int block_m, int group_ = 1)
      : m_blocks((s.seqlen_q + block_m - 1) / block_m),
        heads(s.heads_q),
        total(m_blocks * s.heads_q * s.batch),
        group(group_) {}

  __device__ __forceinline__ int rounds() const {
    return (total + int(gridDim.x) - 1) / int(gridDim.x);
  }

  // False when round r has no tile for this CTA (the last round is partial).
  __device__ __forceinline__ bool get(int r, int& m_block, int& h, int& b) const {
    int const c = (r & 1) ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
    int const idx = r * int(gridDim.x) + c;
    if (idx >= total) return false;
    decode(idx, m_block, h, b);
    return true;
  }

  __device__ __forceinline__ void decode(int idx, int& m_block, int& h, int& b) const {
    int hb;
    if (group == 1) {
      m_block = m_blocks - 1 - idx % m_blocks;
      hb = idx / m_blocks;
    } else {
      int const first = idx / (group * m_blocks) * group;  // the group's first pair
      int const size = min(group, total / m_blocks - first);  // the last group may be short
      int const in = idx - first * m_blocks;
      m_block = m_blocks - 1 - in / size;
      hb = first + in % size;
    }
    h = hb % heads;
    b = hb / heads;
  }
};

// kConsumerWGs_ = 2 is the default forward at every head dim (FwdKernel below). 3 is the hd64 v3
// variant (FwdKernelV3): 192 queries per CTA, so each K/V tile feeds three softmax chains and the
// exp unit (as busy as the tensor cores at hd64) has three warpgroups' worth of GEMMs to hide
// behind; kPingPong_ orders the warpgroups' GEMM issue round-robin with named barriers so that one
// warpgroup's GEMMs run while the others do their softmax.
// kExpEmu_: 3 of every 16 exponentials of the softmax go to exp2_fma (FMA pipe) so that the
// MUFU pipe's time per tile drops below the tensor cores' (v3-emu, an A/B variant).
// kDynamic_: tiles come from the dynamic schedule (Params::tile_counter) instead of the static one.
// kStreamK_: the static schedule with its last tiles shared by key blocks (stream_k.h); only for
// calls whose tiles all cost the same (no band, not varlen: api.cpp fwd_grid).
template <typename Element_, int kDqk_, int kDv_, int kConsumerWGs_ = 2, int kStages_ = 2,
          bool kPingPong_ = false, bool kExpEmu_ = false, bool kDynamic_ = false,
          bool kStreamK_ = false, bool kLazy_ = (kDv_ >= 192 || (kDqk_ == 128 && kDv_ == 128)),
          bool kOwnKeys_ = false>
struct FwdKernelBase {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kConsumerWGs = kConsumerWGs_;
  static constexpr int kBlockM = 64 * kConsumerWGs;
  // Largest key block whose K/V ring (2 stages) plus the Q tile fits in 227 KB of shared memory
  // and whose S accumulator (64 x kBlockN fp32 per warpgroup) leaves room for O in 240 registers.
  // With three consumers (160 registers each) S(64x128) + P + O(64x64) is the most that fits.
  static constexpr int kBlockN = kDqk <= 128 ? 128 : (kDqk <= 192 ? 96 : 64);
  static constexpr int kStages = kStages_;
  static constexpr bool kPingPong = kPingPong_;
  static constexpr bool kExpEmu = kExpEmu_;
  static constexpr bool kDynamic = kDynamic_;
  static constexpr bool kStreamK = kStreamK_;
  // kLazy_ (hd128, Dv 192 and 256, on every schedule, so that all of them compute a tile alike): a
  // row keeps its reference maximum until a score exceeds it by more than 2^kHeadroom, so most key
  // blocks skip the rescale of O (kDv/2 multiplies per thread and key block, against kBlockN/2
  // scores of ~5 softmax instructions each: about 80% of the softmax's count at hd256, 40% at
  // hd192, 20% at hd128) and its wait for P·V. P then lies in [0, 2^kHeadroom], well inside fp16
  // and bf16; O, the sum and lse all refer to the same reference, so the result is the same
  // softmax. On the H200 (NOTES-cuda.md, "Lazy rescaling" in sessions 15-17) it ran 1.025-1.035x at
  // hd256, 1.044-1.055x at hd192, 1.008-1.023x at hd128 (session 17, 4K-16K; 0.99-1.02x in session
  // 15) and 0.97-0.98x at hd64. Dqk 192 with Dv 128 stays eager (not measured).
  static constexpr bool kLazy = kLazy_;
  static constexpr float kHeadroom = 8.f;
  static_assert(!(kLazy && kExpEmu), "exp2_fma takes x <= 0 only");
  // kOwnKeys_ (LONGFLASH_CUDA_FWD=v3-ownkeys, the hd64 causal default): each consumer warpgroup
  // computes only up to the last key block its own 64 rows see and passes the tile's blocks above
  // it through the ring untouched (ConsumerState::pass). In the 192-query CTA, on the causal
  // diagonal, a tile's first key block is masked whole for one or two of its three warpgroups; at
  // 4K queries that is 1.5 warpgroup-blocks of every tile's ~51 (2.9% of the call's tensor-core and
  // softmax work). A first form, with the warpgroup index as a per-thread value, made the ring
  // state per-thread too: the v3 consumer, at its 128-register cap, spilled and ran 0.95-0.98x
  // (session 16, NOTES-cuda.md); with it warp-uniform it ran 1.031x (4K causal), 1.020x (8K) and
  // 1.008x (16K) the plain kernel in session 17. Not with kPingPong, whose turn-taking needs every
  // warpgroup to issue the same number of GEMM batches.
  static constexpr bool kOwnKeys = kOwnKeys_;
  static_assert(!(kOwnKeys && kPingPong), "ping-pong turns need equal GEMM counts");
  static_assert(!(kDynamic && kStreamK), "stream-K shares the static schedule's tail");
  // Named barriers 8 + w: consumer warpgroup w's threads around a stream-K partial.
  static constexpr int kStreamKBar = 8;
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  // setmaxnreg split: 128x24 + 256x240 or 128x24 + 384x160, all of the CTA's 168 or 128 registers
  // per thread at entry. The dynamic schedule's producer (its tile phase, the claimed index, the
  // grouped decode) keeps a few values on the stack at 24: one thread that mostly waits. With
  // three consumers it gets 32 (128x32 + 384x160 is all 64K registers), and so does the stream-K
  // tail's producer (its 64-bit run bounds spilled at 24).
  static constexpr int kProducerRegs = (kDynamic_ || kStreamK_) && kConsumerWGs_ == 3 ? 32 : 24;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;
  static_assert(kConsumerWGs == 2 || (kConsumerWGs == 3 && kDqk <= 64 && kDv <= 64),
                "three consumer warpgroups only fit 160 registers at hd64");
  static_assert(!kPingPong || kConsumerWGs >= 2);
  static_assert(fits_register_split(kThreads, kProducerRegs, kConsumerRegs));

  using AtomLayout = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kDqk>>>(),
      AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDv>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutQ =
      decltype(tile_to_shape(k_major_atom<Element, kDqk>(), Shape<Int<kBlockM>, Int<kDqk>>{}));
  using SmemLayoutK = decltype(tile_to_shape(k_major_atom<Element, kDqk>(),
                                             Shape<Int<kBlockN>, Int<kDqk>, Int<kStages>>{}));
  using SmemLayoutV = decltype(tile_to_shape(k_major_atom<Element, kDv>(),
                                             Shape<Int<kBlockN>, Int<kDv>, Int<kStages>>{}));
  // Vᵀ as the MN-major B operand of P·V: the same bytes, modes swapped.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutV{},
      make_ordered_layout(Shape<Int<kDv>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Global views (seq, d, head, batch) with unit stride along d.
  using GmemLayout = Layout<Shape<int32_t, int32_t, int32_t, int32_t>,
                            Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemLayout{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{},
                                      Shape<Int<kBlockM>, Int<kDqk>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                      take<0, 2>(SmemLayoutK{}),
                                      Shape<Int<kBlockN>, Int<kDqk>>{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                      take<0, 2>(SmemLayoutV{}),
                                      Shape<Int<kBlockN>, Int<kDv>>{}, _1{}));

  static constexpr uint32_t kBytesQ = kBlockM * kDqk * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kDqk * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kDv * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    uint64_t bar_q;
    uint64_t q_empty;  // the consumers' last QKᵀ of a tile is done: Q may be overwritten
    uint64_t k_full[kStages];
    uint64_t k_empty[kStages];
    uint64_t v_full[kStages];
    uint64_t v_empty[kStages];
    // Dynamic schedule: the producer's current tile index, handed to the consumers.
    uint64_t tile_full;
    uint64_t tile_empty;
    int tile_idx;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget");

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    AttnShape s;
    Element* o;
    int64_t o_batch_stride, o_seq_stride, o_head_stride;
    float* lse;
    float scale_log2;     // multiplies the (capped) score inside exp2
    float softcap;        // 0 = off
    float softcap_scale;  // scale / softcap
    int* tile_counter;    // dynamic schedule: zeroed before the launch; else unused
    int tile_group;       // dynamic schedule: FwdTiles::group
    float* sk_partial;    // stream-K: per (CTA, warpgroup) slot, each thread's partial O, max, sum
    int* sk_flags;        // stream-K: per (CTA, warpgroup) slot, 1 once written; zeroed before
  };

  // The stream-K tail of this launch. Calls with a band or varlen never get here (api.cpp), but
  // one key block per tile would also make every tile whole.
  static __device__ __forceinline__ StreamKTail stream_k(Params const& p, FwdTiles const& tiles) {
    bool const uniform = p.s.cu_q == nullptr && p.s.window_left < 0 && p.s.window_right < 0;
    int const blocks = uniform ? (p.s.seqlen_k + kBlockN - 1) / kBlockN : 1;
    return StreamKTail(tiles.total, int(gridDim.x), blocks);
  }

  // The tile's query rows [i0, i0 + kBlockM) of sequence b and its key blocks [n_lo, n_hi]
  // (empty: n_lo > n_hi). False when the sequence has no row in the tile (varlen: shorter than
  // the grid's longest). Producer and consumers call it with the same tile, so they agree on
  // which tiles load Q and how many K/V blocks each walks.
  // With kEndAligned the tiles are aligned to the sequence's end: tile m starts at row
  // m·kBlockM − pad, where pad (< kBlockM) tops the sequence up to whole tiles, so the one partial
  // tile is the first and its rows i0 .. −1 lie before the sequence (loaded as TMA zero fill or a
  // neighbour's rows, never stored). Under a bottom-right causal mask the first tile sees the
  // fewest keys: at 4K queries in 192-query tiles, a partial last tile ran 2 of its 3 warpgroups
  // over all 32 key blocks for rows past the end, 5.5% of the call's tensor-core work (measured:
  // hd64 4K causal 382 -> 402 TFLOP/s). Only for the 192-query CTA: with 128 rows on 128-key
  // blocks, start-aligned tiles meet the diagonal in one block each, and shifting them by the pad
  // put it across two (1000 queries, causal: 228 -> 181 TFLOP/s); with 128 rows on hd192's
  // 96-key blocks it lost 3.5% at 1000 queries, causal (the same work, more masked blocks).
  static constexpr bool kEndAligned = kConsumerWGs == 3;
  static __device__ __forceinline__ bool tile_keys(Params const& p, int m_block, int b,
                                                   SeqInfo& seq, BandMask& band, int& i0,
                                                   int& n_lo, int& n_hi) {
    seq = SeqInfo(p.s, b);
    if (m_block * kBlockM >= seq.len_q) return false;
    int const pad = kEndAligned ? (kBlockM - seq.len_q % kBlockM) % kBlockM : 0;
    i0 = m_block * kBlockM - pad;
    band = BandMask{seq.off, p.s.window_left, p.s.window_right, seq.len_q, seq.len_k};
    band.key_blocks(max(i0, 0), min(i0 + kBlockM, seq.len_q) - 1, kBlockN, n_lo, n_hi);
    return true;
  }

  static __device__ __forceinline__ void run(Params const& p, char* smem_raw) {
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
    int const wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
      Barrier::init(&ss.bar_q, 1);
      Barrier::init(&ss.q_empty, kConsumerThreads);
      if constexpr (kDynamic) {
        Barrier::init(&ss.tile_full, 1);
        Barrier::init(&ss.tile_empty, kConsumerThreads);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kStages; ++i) {
        Barrier::init(&ss.k_full[i], 1);
        Barrier::init(&ss.v_full[i], 1);
        Barrier::init(&ss.k_empty[i], kConsumerThreads);
        Barrier::init(&ss.v_empty[i], kConsumerThreads);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    FwdTiles const tiles(p.s, kBlockM, kDynamic ? p.tile_group : 1);
    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (threadIdx.x == 0) produce(p, ss, tiles);
    } else {
      cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
      consume(p, ss, tiles);
    }
  }

  // One thread: per tile with keys, Q (once the consumers are done with the previous tile's Q),
  // then K/V block by block through the ring, which carries on from tile to tile.
  static __device__ __forceinline__ void produce(Params const& p, SharedStorage& ss,
                                                 FwdTiles const& tiles) {
    Tensor mQ = p.tma_q.get_tma_tensor(
        make_shape(p.s.rows_q, int32_t(kDqk), p.s.heads_q, p.s.tma_batch));
    Tensor mK = p.tma_k.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(kDqk), p.s.heads_k, p.s.tma_batch));
    Tensor mV = p.tma_v.get_tma_tensor(
        make_shape(p.s.rows_k, int32_t(kDv), p.s.heads_k, p.s.tma_batch));
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
    RingState<kStages> st;
    uint32_t q_phase = 0;
    uint32_t tile_phase = 0;
    // Q of the tile, then its key blocks n_hi down to n_lo.
    auto load = [&](int h, SeqInfo const& seq, int i0, int n_lo, int n_hi) LF_ALWAYS_INLINE {
      int const hk = h / (p.s.heads_q / p.s.heads_k);
      Tensor gQ = local_tile(
          domain_offset(make_coord(seq.start_q + i0, _0{}), mQ(_, _, h, seq.tma_batch)),
          Shape<Int<kBlockM>, Int<kDqk>>{}, make_coord(_0{}, _0{}));
      Tensor gK =
          local_tile(domain_offset(make_coord(seq.start_k, _0{}), mK(_, _, hk, seq.tma_batch)),
                     Shape<Int<kBlockN>, Int<kDqk>>{}, make_coord(_, _0{}));
      Tensor gV =
          local_tile(domain_offset(make_coord(seq.start_k, _0{}), mV(_, _, hk, seq.tma_batch)),
                     Shape<Int<kBlockN>, Int<kDv>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                      group_modes<0, 2>(gV));

      Barrier::wait(&ss.q_empty, q_phase ^ 1);
      TxBarrier::arrive_and_expect_tx(&ss.bar_q, kBytesQ);
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      q_phase ^= 1;
      for (int n = n_hi; n >= n_lo; --n) {
        Barrier::wait(&ss.k_empty[st.index], st.phase ^ 1);
        TxBarrier::arrive_and_expect_tx(&ss.k_full[st.index], kBytesK);
        copy(p.tma_k.with(ss.k_full[st.index]), tKg(_, n), tKs(_, st.index));
        Barrier::wait(&ss.v_empty[st.index], st.phase ^ 1);
        TxBarrier::arrive_and_expect_tx(&ss.v_full[st.index], kBytesV);
        copy(p.tma_v.with(ss.v_full[st.index]), tVg(_, n), tVs(_, st.index));
        st.advance();
      }
    };
    StreamKTail const sk = kStreamK ? stream_k(p, tiles) : StreamKTail(0, 1, 1);
    int const rounds = kDynamic ? INT_MAX : (kStreamK ? sk.dp_rounds : tiles.rounds());
    for (int r = 0; r < rounds; ++r) {
      int m_block, h, b, i0, n_lo, n_hi;
      SeqInfo seq;
      BandMask band;
      if constexpr (kDynamic) {
        int const idx = fetch_tile(p, ss, r, tile_phase);
        if (idx >= tiles.total) break;
        tiles.decode(idx, m_block, h, b);
        if (!tile_keys(p, m_block, b, seq, band, i0, n_lo, n_hi) || n_lo > n_hi) continue;
      } else if (!tiles.get(r, m_block, h, b) ||
                 !tile_keys(p, m_block, b, seq, band, i0, n_lo, n_hi) || n_lo > n_hi) {
        continue;
      }
      load(h, seq, i0, n_lo, n_hi);
    }
    if constexpr (kStreamK) {
      for_each_tail_piece(p, tiles, sk,
                          [&](int h, int, SeqInfo const& seq, BandMask const&, int i0, int n_lo,
                              int n_hi, int) LF_ALWAYS_INLINE { load(h, seq, i0, n_lo, n_hi); });
    }
  }

  // work(h, b, seq, band, i0, n_lo, n_hi, role) for each piece of this CTA's stream-K run, top
  // down: the piece's head, sequence, rows, key blocks [n_lo, n_hi] and role.
  template <class Work>
  static __device__ __forceinline__ void for_each_tail_piece(Params const& p,
                                                             FwdTiles const& tiles,
                                                             StreamKTail const& sk, Work&& work) {
    long long lo, end;
    sk.run(int(blockIdx.x), lo, end);
    while (end > lo) {
      int tile, k0, k1, role, m_block, h, b, i0, n_lo, n_hi;
      SeqInfo seq;
      BandMask band;
      sk.piece(lo, end, tile, k0, k1, role, end);
      tiles.decode(tile, m_block, h, b);
      tile_keys(p, m_block, b, seq, band, i0, n_lo, n_hi);  // every tile has all its key blocks
      work(h, b, seq, band, i0, n_lo + k0, n_lo + k1 - 1, role);
    }
  }

  // Dynamic schedule, producer side: claim the CTA's r-th tile (the first is blockIdx.x, the
  // rest come from the counter) and hand it to the consumers once they have read the previous
  // one. An index past the last tile tells everyone to stop.
  static __device__ __forceinline__ int fetch_tile(Params const& p, SharedStorage& ss, int r,
                                                   uint32_t& phase) {
    int const idx = r == 0 ? int(blockIdx.x) : int(gridDim.x) + atomicAdd(p.tile_counter, 1);
    Barrier::wait(&ss.tile_empty, phase ^ 1);
    *reinterpret_cast<int volatile*>(&ss.tile_idx) = idx;
    __threadfence_block();
    Barrier::arrive(&ss.tile_full);
    phase ^= 1;
    return idx;
  }

  // Dynamic schedule, consumer side: the producer's current tile.
  static __device__ __forceinline__ int receive_tile(SharedStorage& ss, uint32_t& phase) {
    Barrier::wait(&ss.tile_full, phase);
    int const idx = *reinterpret_cast<int volatile*>(&ss.tile_idx);
    Barrier::arrive(&ss.tile_empty);
    phase ^= 1;
    return idx;
  }

  // Ring positions and the Q phase of the consumers, carried from tile to tile.
  struct ConsumerState {
    RingState<kStages> st_k, st_v;
    uint32_t q_phase = 0;
    // Releases `blocks` key blocks this warpgroup does not compute: waits for each K and V stage
    // to be filled (so that the arrival counts towards that fill, not the previous one) and
    // frees it at once.
    __device__ __forceinline__ void pass(SharedStorage& ss, int blocks) {
#pragma unroll 1
      for (int i = 0; i < blocks; ++i) {
        Barrier::wait(&ss.k_full[st_k.index], st_k.phase);
        Barrier::arrive(&ss.k_empty[st_k.index]);
        st_k.advance();
        Barrier::wait(&ss.v_full[st_v.index], st_v.phase);
        Barrier::arrive(&ss.v_empty[st_v.index]);
        st_v.advance();
      }
    }
  };

  // The consumer main loop. K and V walk the same ring; V lags K by one block, since P·V of block
  // n is issued together with QKᵀ of block n-1 and softmax(n-1) runs while both are in flight.
  // With kPingPong each warpgroup's GEMM issue also takes a turn: named barrier 1 + w gates
  // warpgroup w; it completes when w (128 threads) syncs on it and w's predecessor (128 threads)
  // has arrived, so GEMM batches reach the tensor cores in round-robin order and each
  // warpgroup's softmax runs under the others' GEMMs. All consumers walk the same key blocks, so
  // each issues the same number of batches: the first consumer's first turn is a free arrival,
  // and the last consumer skips its final arrival (nobody waits for it), which leaves every
  // barrier balanced at the end of each tile.
  template <class MmaQK, class MmaPV, class TQ, class TK, class TV, class TS, class TO, class ORc,
            class Softmax>
  static __device__ __forceinline__ void mainloop(SharedStorage& ss, ConsumerState& cs, int n_lo,
                                                  int n_hi, int wgc, MmaQK& mma_qk,
                                                  MmaPV& mma_pv, TQ const& tSrQ, TK const& tSrK,
                                                  TV const& tOrV, TS& tSrS, TO& tOrO, ORc& O_rc,
                                                  Softmax& softmax_step) {
    constexpr int kRows = decltype(size<0>(O_rc))::value;
    constexpr int kTurnThreads = 2 * 128;
    int const my_turn = 1 + wgc;
    int const next_turn = 1 + (wgc + 1 == kConsumerWGs ? 0 : wgc + 1);
    auto take_turn = [&] {
      if constexpr (kPingPong) named_sync(my_turn, kTurnThreads);
    };
    auto pass_turn = [&] {
      if constexpr (kPingPong) named_arrive(next_turn, kTurnThreads);
    };
    RingState<kStages>& st_k = cs.st_k;
    RingState<kStages>& st_v = cs.st_v;
    if constexpr (kPingPong) {
      if (wgc == 0) named_arrive(my_turn, kTurnThreads);
    }
    TxBarrier::wait(&ss.bar_q, cs.q_phase);
    float corr[kRows];
    Tensor rP = make_tensor<Element>(tSrS.layout());
    Tensor tOrP = make_tensor(rP.data(), acc_as_A(rP.layout()));

    Barrier::wait(&ss.k_full[st_k.index], st_k.phase);
    take_turn();
    wg_gemm<true, -1, false>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index), tSrS);
    pass_turn();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    Barrier::arrive(&ss.k_empty[st_k.index]);
    if (n_lo == n_hi) Barrier::arrive(&ss.q_empty);
    st_k.advance();
    softmax_step(n_hi, corr);
    convert_pairs(tSrS, rP);  // P, the A operand of P·V

    for (int n = n_hi - 1; n >= n_lo; --n) {
      if constexpr (kPingPong) {
        // Wait for the data before taking the turn, so a late tile never holds up the others.
        Barrier::wait(&ss.k_full[st_k.index], st_k.phase);
        Barrier::wait(&ss.v_full[st_v.index], st_v.phase);
        take_turn();
        wg_gemm<true, -1, false>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index), tSrS);
        wg_gemm<false, -1, true>(mma_pv, tOrP, tOrV(_, _, _, st_v.index), tOrO);
        pass_turn();
      } else {
        Barrier::wait(&ss.k_full[st_k.index], st_k.phase);
        wg_gemm<true, -1, false>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index), tSrS);
        Barrier::wait(&ss.v_full[st_v.index], st_v.phase);
        wg_gemm<false, -1, true>(mma_pv, tOrP, tOrV(_, _, _, st_v.index), tOrO);
      }
      warpgroup_wait<1>();  // QKᵀ of block n is done (batches complete in issue order)
      warpgroup_fence_operand(tSrS);
      Barrier::arrive(&ss.k_empty[st_k.index]);
      if (n == n_lo) Barrier::arrive(&ss.q_empty);
      st_k.advance();
      softmax_step(n, corr);
      warpgroup_wait<0>();  // P·V of the previous block is done: O and P are free again
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      Barrier::arrive(&ss.v_empty[st_v.index]);
      st_v.advance();
      bool rescale = !kLazy;
      if constexpr (kLazy) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) rescale |= corr[r] != 1.f;
      }
      if (rescale) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= corr[r];
        }
      }
      convert_pairs(tSrS, rP);  // P, the A operand of P·V
    }
    Barrier::wait(&ss.v_full[st_v.index], st_v.phase);
    take_turn();
    wg_gemm<false, -1, true>(mma_pv, tOrP, tOrV(_, _, _, st_v.index), tOrO);
    if (wgc + 1 != kConsumerWGs) pass_turn();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(rP);
    Barrier::arrive(&ss.v_empty[st_v.index]);
    st_v.advance();
  }

  static __device__ __forceinline__ void consume(Params const& p, SharedStorage& ss,
                                                 FwdTiles const& tiles) {
    int const tid = threadIdx.x - 128;
    TiledMmaQK mma_qk;
    TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutVt{});
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
    Tensor tSrK = thr_qk.partition_fragment_B(sK);
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);

    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kDv>>{});
    Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDv>>{}));
    Tensor S_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    Tensor cS_rc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    constexpr int kRows = decltype(size<0>(S_rc))::value;
    static_assert(kRows == decltype(size<0>(O_rc))::value);
    float const scale_log2 = p.scale_log2;
    ConsumerState cs;
    uint32_t tile_phase = 0;

    // One tile, or one stream-K piece of it: its key blocks n_hi down to n_lo, then O and lse (a
    // writer piece leaves those to the merger; a merger folds the writer's partial in first).
    auto process = [&](int h, int b, SeqInfo const& seq, BandMask const& band, int i0, int n_lo,
                       int n_hi, int role) LF_ALWAYS_INLINE {
      float row_max[kRows];
      float row_sum[kRows];
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.f;
      }
      clear(tOrO);

      // Softcap, mask and the online-softmax update of one key block's scores (in tSrS, turned
      // into unnormalised probabilities); corr[r] rescales what row r accumulated before.
      auto softmax_step = [&](int n, float (&corr)[kRows]) {
        int const j0 = n * kBlockN;
        if (p.softcap > 0.f) {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(tSrS); ++i) {
            tSrS(i) = p.softcap * tanh_fast(tSrS(i) * p.softcap_scale);
          }
        }
        bool full;
        if constexpr (kConsumerWGs == 2) {
          full = band.tile_is_full(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
        } else {
          // Each warpgroup asks about its own 64 rows: with 192-row blocks the causal diagonal
          // crosses ~2.5 key tiles per block, and only one warpgroup's rows meet each edge.
          int const r0 = i0 + 64 * (tid / 128);
          full = band.tile_is_full(r0, r0 + 63, j0, j0 + kBlockN - 1);
        }
        if (!full) {
          RowBounds<kRows> const mask(cS_rc, i0, j0, [&](int i, int& lo, int& hi) {
            band.row_keys(i, lo, hi);
          });
          mask.fill_hidden(S_rc, cS_rc, -INFINITY);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          float mx = row_max[r];
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < size<1>(S_rc); ++c) mx = fmaxf(mx, S_rc(r, c));
          mx = quad_max(mx);
          // A row with no visible key so far keeps max -inf; subtract 0 then so exp2 gives 0,
          // not NaN.
          float const mx_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
          bool const keep = kLazy && mx * scale_log2 <= row_max[r] * scale_log2 + kHeadroom;
          float const ref_scaled =
              keep ? (row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2) : mx_scaled;
          corr[r] = keep ? 1.f : exp2f(row_max[r] * scale_log2 - mx_scaled);
          if (!keep) row_max[r] = mx;
          float sum = 0.f;
          if constexpr (kExpEmu) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < size<1>(S_rc); ++c) {
              float const x = S_rc(r, c) * scale_log2 - ref_scaled;
              float const e = c % 16 >= 13 ? exp2_fma(x) : exp2f(x);
              S_rc(r, c) = e;
              sum += e;
            }
          } else {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < size<1>(S_rc); ++c) {
              float const e = exp2f(S_rc(r, c) * scale_log2 - ref_scaled);
              S_rc(r, c) = e;
              sum += e;
            }
          }
          row_sum[r] = row_sum[r] * corr[r] + sum;
        }
      };

      if (n_lo <= n_hi) {
        // The last key block this warpgroup's own rows see (kOwnKeys); below n_lo when they see
        // none in this tile, or all lie outside the sequence (the end-aligned first tile's
        // padding). Only the leading blocks are skipped: the blocks a left window hides at the
        // bottom stay masked, which keeps no extra value live through the main loop (the
        // 128-register v3 consumer spilled in the loop with both ends skipped).
        int w_hi = n_hi;
        if constexpr (kOwnKeys) {
          // the warpgroup's index as a warp-uniform value, so that the ring's index and phase
          // stay in uniform registers
          int const wgu = __shfl_sync(0xffffffff, tid / 128, 0);
          int const r0 = max(i0 + 64 * wgu, 0);
          int const r1 = min(i0 + 64 * wgu + 63, seq.len_q - 1);
          int lo = 0, hi = -1;
          if (r0 <= r1) band.key_blocks(r0, r1, kBlockN, lo, hi);
          w_hi = lo <= hi ? min(n_hi, hi) : n_lo - 1;
        }
        if (n_lo <= w_hi) {
          cs.pass(ss, n_hi - w_hi);
          mainloop(ss, cs, n_lo, w_hi, tid / 128, mma_qk, mma_pv, tSrQ, tSrK, tOrV, tSrS, tOrO,
                   O_rc, softmax_step);
        } else {
          // Done with Q once it has arrived (an earlier arrival would count towards the
          // previous tile's Q); its rows keep max -inf and sum 0, so out 0 and lse -inf.
          TxBarrier::wait(&ss.bar_q, cs.q_phase);
          Barrier::arrive(&ss.q_empty);
          cs.pass(ss, n_hi - n_lo + 1);
        }
        cs.q_phase ^= 1;
      }
      if constexpr (kStreamK) {
        if (role != StreamKTail::kWhole) {
          if (stream_k_partial(p, role, tid, O_rc, row_max, row_sum)) return;
        }
      }

      // Epilogue: normalise, write O (pairs of adjacent columns) and the natural-log lse. The
      // producer is already loading the next tile's Q and K/V meanwhile.
      float lse_row[kRows];
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float const sum = quad_sum(row_sum[r]);
        float const inv = sum > 0.f ? 1.f / sum : 0.f;
        lse_row[r] = sum > 0.f ? (row_max[r] * scale_log2 + __log2f(sum)) * kLn2 : -INFINITY;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= inv;
      }
      Element* o_base = p.o + int64_t(seq.tma_batch) * p.o_batch_stride +
                        int64_t(seq.start_q) * p.o_seq_stride + int64_t(h) * p.o_head_stride;
      static_assert(decltype(size<0, 0>(tOrO))::value == 2, "pairs of adjacent columns");
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tOrO); i += 2) {
        int const row = i0 + get<0>(cO(i));
        if (row >= 0 && row < seq.len_q) {
          alignas(4) Element pair[2] = {Element(tOrO(i)), Element(tOrO(i + 1))};
          *reinterpret_cast<uint32_t*>(o_base + int64_t(row) * p.o_seq_stride + get<1>(cO(i))) =
              *reinterpret_cast<uint32_t*>(pair);
        }
      }
      if (p.lse != nullptr && tid % 4 == 0) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          int const row = i0 + get<0>(cS_rc(r, 0));
          if (row >= 0 && row < seq.len_q) {
            int64_t const idx = p.s.cu_q != nullptr
                                    ? int64_t(h) * p.s.rows_q + seq.start_q + row
                                    : (int64_t(b) * p.s.heads_q + h) * p.s.seqlen_q + row;
            p.lse[idx] = lse_row[r];
          }
        }
      }
    };

    StreamKTail const sk = kStreamK ? stream_k(p, tiles) : StreamKTail(0, 1, 1);
    int const rounds = kDynamic ? INT_MAX : (kStreamK ? sk.dp_rounds : tiles.rounds());
    for (int round = 0; round < rounds; ++round) {
      int m_block, h, b, i0, n_lo, n_hi;
      SeqInfo seq;
      BandMask band;
      if constexpr (kDynamic) {
        int const idx = receive_tile(ss, tile_phase);
        if (idx >= tiles.total) break;
        tiles.decode(idx, m_block, h, b);
        if (!tile_keys(p, m_block, b, seq, band, i0, n_lo, n_hi)) continue;
      } else if (!tiles.get(round, m_block, h, b) ||
                 !tile_keys(p, m_block, b, seq, band, i0, n_lo, n_hi)) {
        continue;
      }
      process(h, b, seq, band, i0, n_lo, n_hi, StreamKTail::kWhole);
    }
    if constexpr (kStreamK) for_each_tail_piece(p, tiles, sk, process);
  }

  // A stream-K piece's hand-over, per consumer warpgroup (its 64 rows; slot = the writer CTA).
  // Writer: store this thread's O accumulator, row maxima and partial row sums, then publish
  // (fence, the warpgroup's barrier, a release store of the flag); returns true: no epilogue.
  // Merger: wait for the flag (acquire), fold the partial into this thread's state as the online
  // softmax would fold one more key block, return false: the epilogue writes O and lse. Writer
  // and merger threads hold the same rows and columns (same warpgroup, same thread index).
  template <class ORc>
  static __device__ __forceinline__ bool stream_k_partial(Params const& p, int role, int tid,
                                                          ORc& O_rc, float* row_max,
                                                          float* row_sum) {
    constexpr int kRows = decltype(size<0>(O_rc))::value;
    constexpr int kCols = decltype(size<1>(O_rc))::value;
    static_assert(kRows == 2 && kRows * kCols + 2 * kRows == stream_k_thread_floats(kDv),
                  "stream_k.h sizes the partial as kDv / 2 accumulators and 2 rows per thread");
    constexpr int kFloats = stream_k_thread_floats(kDv);
    int const wgc = tid / 128, t = tid % 128;
    int const slot = (role == StreamKTail::kWriter ? int(blockIdx.x) : int(blockIdx.x) - 1) *
                         kConsumerWGs + wgc;
    int* flag = p.sk_flags + slot;
    float* part = p.sk_partial + int64_t(slot) * 128 * kFloats + t;  // [value][thread]
    if (role == StreamKTail::kWriter) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) part[(r * kCols + c) * 128] = O_rc(r, c);
        part[(kRows * kCols + r) * 128] = row_max[r];
        part[(kRows * kCols + kRows + r) * 128] = row_sum[r];
      }
      __threadfence();
      named_sync(kStreamKBar + wgc, 128);
      if (t == 0) st_release(flag, 1);
      return true;
    }
    if (t == 0) {
      while (ld_acquire(flag) != 1) {
      }
    }
    named_sync(kStreamKBar + wgc, 128);
    float const scale_log2 = p.scale_log2;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const other_max = __ldcg(part + (kRows * kCols + r) * 128);
      float const other_sum = __ldcg(part + (kRows * kCols + kRows + r) * 128);
      float const mx = fmaxf(row_max[r], other_max);
      float const mx_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
      float const mine = exp2f(row_max[r] * scale_log2 - mx_scaled);
      float const theirs = exp2f(other_max * scale_log2 - mx_scaled);
      row_max[r] = mx;
      row_sum[r] = row_sum[r] * mine + other_sum * theirs;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        O_rc(r, c) = O_rc(r, c) * mine + __ldcg(part + (r * kCols + c) * 128) * theirs;
      }
    }
    return false;
  }
};

// The forward at every head dim (LONGFLASH_CUDA_FWD=v2), and the hd64 default below 4K queries. A
// class of its own (not an alias) so that its kernel symbols and code stay those of the
// 2-consumer kernel it always was.
template <typename Element, int kDqk, int kDv>
struct FwdKernel : FwdKernelBase<Element, kDqk, kDv> {};

// LONGFLASH_CUDA_FWD=v3 at hd64: 192 queries per CTA (three consumer warpgroups, 24/160
// registers), a 4-stage K/V ring (4 x 2 x 16 KiB + 24 KiB Q = 152 KiB), ping-pong issue order.
// kPingPong false (v3-no-pingpong): the same without the turn-taking; the hd64 default from 4K
// queries (api.cpp fwd_kernel).
// kExpEmu: the same with part of the exponentials on the FMA pipe (exp2_fma).
template <typename Element, int kDqk, int kDv, bool kPingPong, bool kExpEmu = false>
struct FwdKernelV3 : FwdKernelBase<Element, kDqk, kDv, 3, 4, kPingPong, kExpEmu> {};

// The default kernel on the dynamic schedule (LONGFLASH_CUDA_FWD=+dynamic): persistent and
// balanced under causal masks, at the cost of one global atomic per tile.
template <typename Element, int kDqk, int kDv>
struct FwdKernelDynamic : FwdKernelBase<Element, kDqk, kDv, 2, 2, false, false, true> {};

// v3-no-pingpong on the dynamic schedule (LONGFLASH_CUDA_FWD=v3-no-pingpong+dynamic, hd64).
template <typename Element, int kDqk, int kDv>
struct FwdKernelV3Dynamic : FwdKernelBase<Element, kDqk, kDv, 3, 4, false, false, true> {};

// The static schedule with a stream-K tail (LONGFLASH_CUDA_FWD=+streamk; stream_k.h), for the
// default kernel and the hd64 192-query one.
template <typename Element, int kDqk, int kDv>
struct FwdKernelStreamK : FwdKernelBase<Element, kDqk, kDv, 2, 2, false, false, false, true> {};
template <typename Element, int kDqk, int kDv>
struct FwdKernelV3StreamK : FwdKernelBase<Element, kDqk, kDv, 3, 4, false, false, false, true> {};
// v3-no-pingpong with per-warpgroup key ranges (LONGFLASH_CUDA_FWD=v3-ownkeys; kOwnKeys above):
// the hd64 causal default from 4K queries (api.cpp fwd_kernel).
template <typename Element, int kDqk, int kDv>
struct FwdKernelV3OwnKeys
    : FwdKernelBase<Element, kDqk, kDv, 3, 4, false, false, false, false, false, true> {};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel::run(params, smem);
}

}  // namespace longflash::sm90
