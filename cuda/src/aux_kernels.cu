// Small memory-bound kernels around the attention kernels: backward preprocess (lse·log2e and
// rowsum(dO·O)), postprocess (fp32 dQ accumulator -> dq), and fills for empty problems.
// IO: each reads/writes its tensors once. Any arch (sm_90 build).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "params.h"

namespace longflash {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// Token t of the packed/dense token axis -> (batch, position) and the lse index of (t, h).
struct TokenMap {
  int seqlen;  // dense Nq/Nk; 0 for varlen (one packed axis)
  int heads;
  int rows;    // tokens on this axis
  __device__ __forceinline__ void split(int t, int& b, int& i) const {
    if (seqlen > 0) {
      b = t / seqlen;
      i = t - b * seqlen;
    } else {
      b = 0;
      i = t;
    }
  }
  __device__ __forceinline__ int64_t lse_index(int t, int h) const {
    if (seqlen > 0) {
      int b, i;
      split(t, b, i);
      return (int64_t(b) * heads + h) * seqlen + i;
    }
    return int64_t(h) * rows + t;
  }
};

__device__ __forceinline__ int64_t elem_offset(TensorRef const& r, int b, int i, int h) {
  return int64_t(b) * r.batch_stride + int64_t(i) * r.seq_stride + int64_t(h) * r.head_stride;
}

// The backward's preprocess: lse_log2 = lse·log2(e) and dpsum = rowsum(dO∘O) per (token, head)
// row. Eight lanes share a row and read it in 16-byte vectors (chunk g, g + 8, ... of its dv / 8;
// the API guarantees 16-byte aligned rows and dv a multiple of 8): kChunks per lane, and
// 4 / kChunks rows per thread, so that every thread has 4 chunks of O and 4 of dO in flight
// before its first sum (hd64: 4 rows, hd128: 2, hd256: 1). A CTA's rows are consecutive tokens of
// one head, so the lse reads and both writes are coalesced as well. On the H200 at 16K tokens × 32
// heads, hd64: this kernel 52 µs; one warp per row with 2-byte loads took 142 µs; 8 lanes per row
// and 2 rows per thread, 64 µs; the same with rows in memory order (heads fastest, whole tokens'
// O and dO contiguous), 72 µs.
constexpr int kPreLanes = 8;
constexpr int kPreThreads = 256;
constexpr int kPreChunksInFlight = 4;  // per thread and tensor

template <typename T>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  T const* x = reinterpret_cast<T const*>(&a);
  T const* y = reinterpret_cast<T const*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(to_float(x[i]), to_float(y[i]), acc);
  return acc;
}

template <int kChunks>
constexpr int pre_rows_per_cta() {
  return kPreThreads / kPreLanes * (kPreChunksInFlight / kChunks);
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(kPreThreads)
    bwd_preprocess_kernel(TokenMap map, int dv, TensorRef o, TensorRef dout,
                          float const* __restrict__ lse, float* __restrict__ lse_log2,
                          float* __restrict__ dpsum) {
  constexpr int kRows = kPreChunksInFlight / kChunks;
  int const h = blockIdx.y;
  int const g = threadIdx.x % kPreLanes;
  int const chunks = dv / 8;
  int t[kRows];
  uint4 vo[kRows][kChunks];
  uint4 vd[kRows][kChunks];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    t[r] = blockIdx.x * pre_rows_per_cta<kChunks>() + r * (kPreThreads / kPreLanes) +
           threadIdx.x / kPreLanes;
    bool const row = t[r] < map.rows;
    int b = 0, i = 0;
    if (row) map.split(t[r], b, i);
    uint4 const* po =
        reinterpret_cast<uint4 const*>(static_cast<T const*>(o.ptr) + elem_offset(o, b, i, h));
    uint4 const* pd = reinterpret_cast<uint4 const*>(static_cast<T const*>(dout.ptr) +
                                                     elem_offset(dout, b, i, h));
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      int const c = g + kPreLanes * k;
      bool const live = row && c < chunks;
      vo[r][k] = live ? __ldg(po + c) : make_uint4(0, 0, 0, 0);
      vd[r][k] = live ? __ldg(pd + c) : make_uint4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) acc += dot8<T>(vo[r][k], vd[r][k]);
#pragma unroll
    for (int s = kPreLanes / 2; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffff, acc, s);
    if (g == 0 && t[r] < map.rows) {
      int64_t const idx = map.lse_index(t[r], h);
      float const l = lse[idx];
      // A row that saw no key has lse = -inf; +inf makes its P = exp2(s - lse) exactly 0.
      lse_log2[idx] = l == -INFINITY ? INFINITY : l * kLog2e;
      dpsum[idx] = acc;
    }
  }
}

template <typename T>
__global__ void dq_postprocess_kernel(TokenMap map, int dqk, float scale, float const* accum,
                                      TensorRef dq) {
  int64_t const total = int64_t(map.rows) * map.heads * dqk;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int const d = int(e % dqk);
    int64_t const th = e / dqk;
    int const h = int(th % map.heads);
    int const t = int(th / map.heads);
    int b, i;
    map.split(t, b, i);
    static_cast<T*>(dq.ptr)[elem_offset(dq, b, i, h) + d] = from_float<T>(accum[e] * scale);
  }
}

template <typename T>
__global__ void zero_kernel(TokenMap map, int dim, TensorRef x) {
  int64_t const total = int64_t(map.rows) * map.heads * dim;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int const d = int(e % dim);
    int64_t const th = e / dim;
    int const h = int(th % map.heads);
    int const t = int(th / map.heads);
    int b, i;
    map.split(t, b, i);
    static_cast<T*>(x.ptr)[elem_offset(x, b, i, h) + d] = from_float<T>(0.f);
  }
}

__global__ void fill_kernel(float* x, int64_t n, float value) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    x[e] = value;
  }
}

int grid_for(int64_t n) {
  int64_t const blocks = (n + 255) / 256;
  return int(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

TokenMap q_map(AttnShape const& s) {
  return TokenMap{s.varlen() ? 0 : s.seqlen_q, s.heads_q, s.varlen() ? s.rows_q
                                                                      : s.batch * s.seqlen_q};
}
TokenMap k_map(AttnShape const& s) {
  return TokenMap{s.varlen() ? 0 : s.seqlen_k, s.heads_k, s.varlen() ? s.rows_k
                                                                      : s.batch * s.seqlen_k};
}

template <typename T, int kChunks>
void launch_preprocess_chunks(BwdArgs const& a, TokenMap const& map, cudaStream_t stream) {
  constexpr int kRowsPerCta = pre_rows_per_cta<kChunks>();
  dim3 grid((map.rows + kRowsPerCta - 1) / kRowsPerCta, a.s.heads_q);
  float* lse_log2 = reinterpret_cast<float*>(a.workspace + a.ws.lse_log2);
  float* dpsum = reinterpret_cast<float*>(a.workspace + a.ws.dpsum);
  bwd_preprocess_kernel<T, kChunks>
      <<<grid, kPreThreads, 0, stream>>>(map, a.s.dv, a.o, a.dout, a.lse, lse_log2, dpsum);
}

template <typename T>
void launch_preprocess_typed(BwdArgs const& a, TokenMap const& map, cudaStream_t stream) {
  // 16-byte chunks per lane: dv 64 -> 1, 96 and 128 -> 2, 192 -> 3 (rounded up to 4), 256 -> 4
  int const chunks = (a.s.dv / 8 + kPreLanes - 1) / kPreLanes;
  if (chunks <= 1) {
    launch_preprocess_chunks<T, 1>(a, map, stream);
  } else if (chunks == 2) {
    launch_preprocess_chunks<T, 2>(a, map, stream);
  } else {
    launch_preprocess_chunks<T, 4>(a, map, stream);
  }
}

}  // namespace

cudaError_t launch_bwd_preprocess(BwdArgs const& a, cudaStream_t stream) {
  if (a.s.dv > 8 * kPreLanes * kPreChunksInFlight) return cudaErrorInvalidValue;
  TokenMap const map = q_map(a.s);
  if (a.s.is_bf16) {
    launch_preprocess_typed<__nv_bfloat16>(a, map, stream);
  } else {
    launch_preprocess_typed<__half>(a, map, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_dq_postprocess(BwdArgs const& a, cudaStream_t stream) {
  // The row layout only: v7's per-tile accumulator is read back by its own postprocess
  // (sm90/bwd_v5.cuh, dq_postprocess_tiles), which shares the kernel's fragment order.
  if (a.ws.dq_tile_rows != 0) return cudaErrorInvalidValue;
  TokenMap const map = q_map(a.s);
  int const grid = grid_for(int64_t(map.rows) * map.heads * a.s.dqk);
  float const* accum = reinterpret_cast<float const*>(a.workspace + a.ws.dq_accum);
  if (a.s.is_bf16) {
    dq_postprocess_kernel<__nv_bfloat16>
        <<<grid, 256, 0, stream>>>(map, a.s.dqk, a.s.scale, accum, a.dq);
  } else {
    dq_postprocess_kernel<__half><<<grid, 256, 0, stream>>>(map, a.s.dqk, a.s.scale, accum, a.dq);
  }
  return cudaGetLastError();
}

cudaError_t launch_zero(AttnShape const& s, bool q_side, int dim, TensorRef x,
                        cudaStream_t stream) {
  TokenMap const map = q_side ? q_map(s) : k_map(s);
  int const grid = grid_for(int64_t(map.rows) * map.heads * dim);
  if (s.is_bf16) {
    zero_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(map, dim, x);
  } else {
    zero_kernel<__half><<<grid, 256, 0, stream>>>(map, dim, x);
  }
  return cudaGetLastError();
}

cudaError_t launch_fill(float* x, int64_t n, float value, cudaStream_t stream) {
  fill_kernel<<<grid_for(n), 256, 0, stream>>>(x, n, value);
  return cudaGetLastError();
}

}  // namespace longflash
