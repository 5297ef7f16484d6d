// Small memory-bound kernels around the attention kernels: backward preprocess (lse·log2e and
// rowsum(dO·O)), postprocess (fp32 dQ accumulator -> dq), and fills for empty problems.
// IO: each reads/writes its tensors once, one warp per (token, head) row. Any arch (sm_90 build).
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

template <typename T>
__global__ void bwd_preprocess_kernel(TokenMap map, int dv, TensorRef o, TensorRef dout,
                                      float const* lse, float* lse_log2, float* dpsum) {
  int const t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int const h = blockIdx.y;
  int const lane = threadIdx.x % 32;
  if (t >= map.rows) return;
  int b, i;
  map.split(t, b, i);
  T const* po = static_cast<T const*>(o.ptr) + elem_offset(o, b, i, h);
  T const* pd = static_cast<T const*>(dout.ptr) + elem_offset(dout, b, i, h);
  float acc = 0.f;
  for (int d = lane; d < dv; d += 32) acc += to_float(po[d]) * to_float(pd[d]);
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffff, acc, s);
  if (lane == 0) {
    int64_t const idx = map.lse_index(t, h);
    float const l = lse[idx];
    // A row that saw no key has lse = -inf; +inf makes its P = exp2(s - lse) exactly 0.
    lse_log2[idx] = l == -INFINITY ? INFINITY : l * kLog2e;
    dpsum[idx] = acc;
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

}  // namespace

cudaError_t launch_bwd_preprocess(BwdArgs const& a, cudaStream_t stream) {
  TokenMap const map = q_map(a.s);
  dim3 grid((map.rows + 7) / 8, a.s.heads_q);
  float* lse_log2 = reinterpret_cast<float*>(a.workspace + a.ws.lse_log2);
  float* dpsum = reinterpret_cast<float*>(a.workspace + a.ws.dpsum);
  if (a.s.is_bf16) {
    bwd_preprocess_kernel<__nv_bfloat16>
        <<<grid, 256, 0, stream>>>(map, a.s.dv, a.o, a.dout, a.lse, lse_log2, dpsum);
  } else {
    bwd_preprocess_kernel<__half>
        <<<grid, 256, 0, stream>>>(map, a.s.dv, a.o, a.dout, a.lse, lse_log2, dpsum);
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
