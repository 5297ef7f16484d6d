// Internal kernel parameters: the checked, normalised form of one C API call.
// api.cpp fills these after validation; the kernel launchers read them. No framework types.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "longflash/longflash.h"

namespace longflash {

struct TensorRef {
  void* ptr;
  int64_t batch_stride;  // elements; a harmless valid value for varlen (one "batch")
  int64_t seq_stride;
  int64_t head_stride;
};

struct AttnShape {
  int batch;  // sequences
  int seqlen_q, seqlen_k;  // dense: Nq/Nk; varlen: the longest sequences (grid extent)
  int rows_q, rows_k;      // rows of the seq axis of the TMA view: Nq/Nk dense, Tq/Tk varlen
  int tma_batch;           // batch extent of the TMA view: B dense, 1 varlen
  int heads_q, heads_k;
  int dqk, dv;
  const int* cu_q;  // device; nullptr when dense
  const int* cu_k;
  float scale;
  float softcap;  // 0 = off
  int window_left, window_right;  // < 0 = unbounded, already clamped to the sequence extents
  bool deterministic;
  bool is_bf16;

  bool varlen() const { return cu_q != nullptr; }
};

struct FwdArgs {
  AttnShape s;
  TensorRef q, k, v, o;
  float* lse;  // may be nullptr
  // The kernel, as chosen by api.cpp fwd_kernel (never kFwdAuto here). kFwdV2: 128-query CTAs, two
  // consumer warpgroups (every head dim). hd64 only (other head dims run kFwdV2): kFwdV3NoPingPong:
  // 192-query CTAs, three consumer warpgroups (the hd64 default at N >= 4K, dense); kFwdV3OwnKeys:
  // the same with per-warpgroup key ranges (causal); kFwdV3: v3-no-pingpong with ping-pong GEMM
  // issue; kFwdV3ExpEmu: v3 with 3/16 of the softmax exponentials on the FMA pipe (both for A/B
  // timing).
  int fwd_version;
  // kFwdGridPerTile: one CTA per tile. kFwdGridStatic: one CTA per SM walking the tiles in a
  // static order (fwd.cuh FwdTiles). kFwdGridDynamic: the same CTAs claiming tiles from
  // tile_counter (kFwdV2 and kFwdV3NoPingPong; the other v3 variants run kFwdGridStatic for it).
  int fwd_grid;
  int* tile_counter;  // kFwdGridDynamic: 4 bytes of the workspace, zeroed before the launch
  int tile_group;     // kFwdGridDynamic: (head, sequence) pairs per longest-first group (FwdTiles)
  int max_ctas;       // > 0: at most this many persistent CTAs (LONGFLASH_CUDA_FWD_CTAS, tests)
  // kFwdGridStreamK: the workspace's flags (zeroed before the launch) and partials (stream_k.h).
  int* sk_flags;
  float* sk_partial;
};

constexpr int kFwdGridPerTile = 0;
constexpr int kFwdGridStatic = 1;
constexpr int kFwdGridDynamic = 2;
// The static schedule with its last tiles shared by key blocks (sm90/stream_k.h; kFwdV2 and
// kFwdV3NoPingPong, calls without band or varlen).
constexpr int kFwdGridStreamK = 3;
// Forward workspace under kFwdGridDynamic (the tile counter, padded).
constexpr size_t kFwdDynamicWorkspace = 16;

constexpr int kFwdAuto = 0;  // LONGFLASH_CUDA_FWD unset: fwd_kernel chooses by shape
constexpr int kFwdV2 = 2;
constexpr int kFwdV3 = 3;
constexpr int kFwdV3NoPingPong = -3;
constexpr int kFwdV3ExpEmu = 4;
// LONGFLASH_CUDA_FWD=v3-ownkeys (hd64; the default for causal calls of the 192-query CTA):
// v3-no-pingpong with each consumer warpgroup skipping the key blocks above its own rows
// (fwd.cuh kOwnKeys); static or per-tile grid.
constexpr int kFwdV3OwnKeys = 5;
// The forward's grid when LONGFLASH_CUDA_FWD names none: persistent (one CTA per SM, static
// schedule) for calls whose tiles all cost the same and for causal calls of at most 32 query
// blocks per sequence (api.cpp fwd_grid), else one CTA per tile.
constexpr bool kFwdPersistentDefault = true;

// Workspace layout of the backward (offsets in bytes from the workspace base; 256-aligned).
struct BwdWorkspace {
  // dq_tile_rows == 0: float [rows][Hq][Dqk] indexed like dq (dense (B,Nq,Hq,D); varlen (Tq,Hq,D)).
  // Else (v7, v8): one contiguous tile of dq_tile_rows x Dqk floats per (query tile, head), see
  // dq_first_tile; inside a tile the elements are in the order the kernel's dQ wgmma fragments
  // hold them (DqTileLayout in bwd_v5.cuh, bwd_d256.cuh), so the kernel adds a tile by a few bulk
  // reduces.
  size_t dq_accum;
  int dq_tile_rows;
  size_t lse_log2;   // float, lse * log2(e) in the lse layout; -inf rows become +inf (P = 0)
  size_t dpsum;      // float, rowsum(dO * O) in the lse layout
  size_t semaphores; // int, deterministic mode: one counter per (batch, head, m-block, warpgroup)
  size_t total;
};

struct BwdArgs {
  AttnShape s;
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;
  char* workspace;
  BwdWorkspace ws;
  // 2 = 64-key blocks, dQ by per-thread REDs; 3 = the same with smem staging + TMA bulk reduce;
  // 5 = 128-key blocks, one warpgroup per 64 keys, dQ reduces by writer warps (bwd_v5.cuh; hd64
  // and hd128, else v2); kBwdV6 = hd256 kernel of bwd_d256.cuh (else v2); kBwdV7 = v5 with the
  // per-tile dQ accumulator (hd64 and hd128, else v2; ws.dq_tile_rows != 0 exactly when it or v8
  // runs); kBwdV8 = v6 with the per-tile accumulator (hd256, else v2); kBwdDefault = v7 at
  // hd64/hd128, v8 at hd256, v2 elsewhere.
  int bwd_version;
  // v5-v8: 0 launches each head's key blocks in a row; G > 0 the (sequence, kv head) pairs in
  // groups of G, each group key block outermost (api.cpp bwd_head_group; sm90 bwd_block).
  int head_group;
};

// LONGFLASH_CUDA_BWD=timing-no-dq-add: the backward without its dQ reductions (dQ comes out wrong).
// It exists to measure what the reductions cost; nothing but benchmarks/cuda_bwd_ab.py sets it.
constexpr int kBwdTimingNoDqAdd = -1;
// LONGFLASH_CUDA_BWD=timing-v5-no-dq-add / timing-v5-no-reduce: v5 without the dQ staging and
// reduces, or with the staging and the hand-over to the writer warp but no reduce (dQ wrong).
constexpr int kBwdTimingV5NoDqAdd = -5;
constexpr int kBwdTimingV5NoReduce = -6;
// LONGFLASH_CUDA_BWD unset: the default, per head dim the variant that passed every check and
// both sanitizers on the H200 and ran fastest there (NOTES-cuda.md "v7", "v8"): v7 at hd64 and
// hd128, v8 at hd256; v2 at hd96/hd192 and in the deterministic mode (whose semaphore order is
// v2's).
constexpr int kBwdDefault = 0;
// LONGFLASH_CUDA_BWD=v6: the hd256 backward of bwd_d256.cuh (see NOTES-cuda.md "v6").
constexpr int kBwdV6 = 6;
// LONGFLASH_CUDA_BWD=v7: v5 with the dQ accumulator laid out per query tile (one bulk reduce per
// warpgroup half and step instead of one per row); the default since it passed on the H200
// (NOTES-cuda.md "v7"). timing-v7-no-reduce stages and hands over without reducing (dQ wrong).
constexpr int kBwdV7 = 7;
constexpr int kBwdTimingV7NoReduce = -7;
// LONGFLASH_CUDA_BWD=timing-v6-no-dq-add / timing-v6-no-dq (hd256 only, dQ wrong): v6 with the dQ
// GEMM but none of its fp32 REDs, or with neither (the cost of a dK/dV-only kernel), to measure
// what the REDs cost at hd256 (NOTES-cuda.md "v6 measured").
constexpr int kBwdTimingV6NoDqAdd = -8;
constexpr int kBwdTimingV6NoDq = -9;

// LONGFLASH_CUDA_BWD=v8: v6 (hd256) with v7's per-tile dQ accumulator. Each warpgroup stages its
// fp32 dQ half in the step's Q/dO halves its own GEMMs have finished reading, and a writer thread
// adds it with bulk reduces; the default at hd256 since it passed on the H200 at 1.42-1.59x v6
// (NOTES-cuda.md "v8").
constexpr int kBwdV8 = 8;

// Which calls fill the per-tile dQ accumulator: v7 at v5's shapes (hd64, hd128), v8 at hd256
// (both also as the default there), never in the deterministic mode. The workspace size query
// and the launcher both decide by this (through BwdWorkspace::dq_tile_rows), so the
// accumulator's layout and the kernel that fills it cannot disagree.
constexpr bool bwd_tile_dq_applies(int version, int dqk, int dv, bool deterministic) {
  if (dqk != dv || deterministic) return false;
  if (dqk == 64 || dqk == 128) {
    return version == kBwdV7 || version == kBwdDefault || version == kBwdTimingV7NoReduce;
  }
  return dqk == 256 && (version == kBwdV8 || version == kBwdDefault);
}
// Query rows of the step and dQ tile of v7 and v8 (the kernels' kBlockM; they static_assert it).
constexpr int bwd_tile_dq_rows(int dqk) { return dqk == 64 ? 128 : 64; }

// The per-tile accumulator's tiles (v7, v8), per head: dense sequence b starts at tile
// b * ceil(Nq / rows); varlen sequence b (first packed row start_q) at floor(start_q / rows) + b.
// Sequence b needs ceil(len_b / rows) tiles and floor(x + y) >= floor(x) + floor(y) gives
// floor(start_b / rows) + b + ceil(len_b / rows) <= floor(start_{b+1} / rows) + b + 1, so the
// sequences' tiles never overlap, and all of them fit in floor(Tq / rows) + B tiles (start_q is
// clamped to [0, Tq] wherever it is read). Rows past a sequence's end inside its last tile belong
// to no other sequence: the kernel adds into them (zeros) and the postprocess skips them.
// Tile t of head h starts at float ((t * Hq) + h) * rows * Dqk.
__host__ __device__ inline int64_t dq_first_tile(bool varlen, int b, int start_q, int seqlen_q,
                                                 int rows) {
  return varlen ? int64_t(start_q / rows) + b : int64_t(b) * ((seqlen_q + rows - 1) / rows);
}
// Float offset of query tile m of (sequence b, head h): tiles of rows x dqk floats, as above.
__host__ __device__ inline int64_t dq_tile_offset(AttnShape const& s, int b, int start_q, int m,
                                                  int h, int rows, int dqk) {
  int64_t const t = dq_first_tile(s.cu_q != nullptr, b, start_q, s.seqlen_q, rows) + m;
  return (t * s.heads_q + h) * (int64_t(rows) * dqk);
}
inline int64_t dq_tile_count(bool varlen, int batch, int64_t tokens_q, int seqlen_q, int rows) {
  return varlen ? tokens_q / rows + batch : int64_t(batch) * ((seqlen_q + rows - 1) / rows);
}

// Kernel entry points, one explicit instantiation per (dtype, Dqk, Dv) in generated units. The dtype
// is a bool so that this header (and api.cpp) need no CUTLASS types.
template <bool kBf16, int kDqk, int kDv>
cudaError_t run_fwd_sm90(FwdArgs const& args, cudaStream_t stream);

template <bool kBf16, int kDqk, int kDv>
cudaError_t run_bwd_sm90(BwdArgs const& args, cudaStream_t stream);

// Architecture-independent helpers (aux_kernels.cu).
cudaError_t launch_bwd_preprocess(BwdArgs const& args, cudaStream_t stream);
cudaError_t launch_dq_postprocess(BwdArgs const& args, cudaStream_t stream);
// Zeroes a q-side (rows_q x heads_q) or k-side (rows_k x heads_k) tensor of width dim.
cudaError_t launch_zero(AttnShape const& s, bool q_side, int dim, TensorRef x, cudaStream_t stream);
cudaError_t launch_fill(float* x, int64_t n, float value, cudaStream_t stream);

// Tile sizes the host needs for workspace sizing, independent of the kernel templates.
constexpr int kBwdBlockM = 64;
constexpr int kBwdBlockN = 64;

// Multiprocessors of the current device: a persistent grid's size, and what the stream-K
// workspace is sized for (api.cpp).
inline cudaError_t sm_count(int& sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

}  // namespace longflash
