// Host side of the sm90 backward: TMA descriptors and the launch of the main kernel (one CTA per
// (key block, kv head, sequence)): v2/v3 (64 keys), v5 (128 keys, hd64/hd128), v6 (64 keys, hd256,
// the default there), v7 (v5 with the per-tile dQ accumulator, the default at hd64/hd128) and v8
// (v6 with it, hd256); v7 and v8 launch their own postprocess. The other preprocess/postprocess
// kernels live in aux_kernels.cu.
// Target: sm_90a.
#pragma once

#include "bwd.cuh"
#include "bwd_d256.cuh"
#include "bwd_v5.cuh"
#include "launch_common.cuh"

namespace longflash::sm90 {

// v5 takes the shapes it is written for (hd64, hd128) when asked for, outside the deterministic
// mode (whose semaphore order is per 64-key block); every other call runs v2/v3.
template <typename Element, int kDqk, int kDv>
bool bwd_v5_applies(BwdArgs const& a) {
  return kBwdV5Supported<kDqk, kDv> &&
         (a.bwd_version == 5 ||
          a.bwd_version == kBwdTimingV5NoDqAdd || a.bwd_version == kBwdTimingV5NoReduce) &&
         !a.s.deterministic;
}

// K: BwdKernelV5 or BwdKernelV7 (the same Params).
template <class K>
cudaError_t launch_bwd_v5(BwdArgs const& a, DqMode mode, cudaStream_t stream) {
  using Element = typename K::Element;
  constexpr int kDqk = K::kDqk;
  constexpr int kDv = K::kDv;
  AttnShape const& s = a.s;
  dim3 const grid = bwd_grid(a, (s.seqlen_k + K::kBlockN - 1) / K::kBlockN);
  typename K::Params const p{
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.q, s.rows_q, kDqk, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutQ{}), Shape<Int<K::kBlockM>, Int<kDqk>>{},
                    _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.k, s.rows_k, kDqk, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutK{}, Shape<Int<K::kBlockN>, Int<kDqk>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.v, s.rows_k, kDv, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutV{}, Shape<Int<K::kBlockN>, Int<kDv>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.dout, s.rows_q, kDv, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutdO{}), Shape<Int<K::kBlockM>, Int<kDv>>{},
                    _1{}),
      s,
      static_cast<Element*>(a.dk.ptr),
      a.dk.batch_stride,
      a.dk.seq_stride,
      a.dk.head_stride,
      static_cast<Element*>(a.dv.ptr),
      a.dv.batch_stride,
      a.dv.seq_stride,
      a.dv.head_stride,
      reinterpret_cast<float*>(a.workspace + a.ws.dq_accum),
      reinterpret_cast<float const*>(a.workspace + a.ws.lse_log2),
      reinterpret_cast<float const*>(a.workspace + a.ws.dpsum),
      (s.softcap > 0.f ? 1.f : s.scale) * kLog2e,
      s.softcap,
      s.softcap > 0.f ? s.scale / s.softcap : 0.f,
      mode,
      a.head_group,
  };
  auto kernel = bwd_kernel_v5<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The hd256 kernel of bwd_d256.cuh (v6, v8, the timing variants), outside the deterministic mode.
template <typename Element, D256Dq kDqMode = D256Dq::kReduce>
cudaError_t launch_bwd_d256(BwdArgs const& a, cudaStream_t stream) {
  using K = BwdKernelD256<Element, kDqMode>;
  AttnShape const& s = a.s;
  dim3 const grid = bwd_grid(a, (s.seqlen_k + K::kBlockN - 1) / K::kBlockN);
  typename K::Params const p{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.q, s.rows_q, 256, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutQ{}), Shape<Int<K::kBlockM>, _256>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.k, s.rows_k, 256, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutK{}, Shape<Int<K::kBlockN>, _256>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.v, s.rows_k, 256, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutK{}, Shape<Int<K::kBlockN>, _256>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.dout, s.rows_q, 256, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutQ{}), Shape<Int<K::kBlockM>, _256>{}, _1{}),
      s,
      static_cast<Element*>(a.dk.ptr),
      a.dk.batch_stride,
      a.dk.seq_stride,
      a.dk.head_stride,
      static_cast<Element*>(a.dv.ptr),
      a.dv.batch_stride,
      a.dv.seq_stride,
      a.dv.head_stride,
      reinterpret_cast<float*>(a.workspace + a.ws.dq_accum),
      reinterpret_cast<float const*>(a.workspace + a.ws.lse_log2),
      reinterpret_cast<float const*>(a.workspace + a.ws.dpsum),
      (s.softcap > 0.f ? 1.f : s.scale) * kLog2e,
      s.softcap,
      s.softcap > 0.f ? s.scale / s.softcap : 0.f,
      a.head_group,
  };
  auto kernel = bwd_kernel_d256<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The postprocess of the per-tile accumulator that kernel K filled (v7, v8): dq = scale · tile
// (the row-layout one in aux_kernels.cu cannot read tiles; api.cpp skips it when ws.dq_tile_rows
// is set).
template <class K>
cudaError_t launch_dq_postprocess_tiles(BwdArgs const& a, cudaStream_t stream) {
  AttnShape const& s = a.s;
  DqTileArgs const pa{s,
                      reinterpret_cast<float const*>(a.workspace + a.ws.dq_accum),
                      a.dq.ptr,
                      a.dq.batch_stride,
                      a.dq.seq_stride,
                      a.dq.head_stride};
  dim3 grid((s.seqlen_q + K::kBlockM - 1) / K::kBlockM, s.heads_q, s.batch);
  dq_postprocess_tiles<K><<<grid, DqTileArgs::kThreads, 0, stream>>>(pa);
  return cudaGetLastError();
}

// v7: the main kernel into the per-tile accumulator, then its postprocess.
template <typename Element, int kDqk, int kDv>
cudaError_t launch_bwd_v7(BwdArgs const& a, cudaStream_t stream) {
  using K = BwdKernelV7<Element, kDqk, kDv>;
  if (a.ws.dq_tile_rows != K::kBlockM) return cudaErrorInvalidValue;  // sized for another tile
  cudaError_t err = launch_bwd_v5<K>(
      a, a.bwd_version == kBwdTimingV7NoReduce ? DqMode::kStageOnly : DqMode::kReduce, stream);
  if (err != cudaSuccess) return err;
  return launch_dq_postprocess_tiles<K>(a, stream);
}

// v8: v6 into the per-tile accumulator, then the same postprocess.
template <typename Element>
cudaError_t launch_bwd_v8(BwdArgs const& a, cudaStream_t stream) {
  using K = BwdKernelD256<Element, D256Dq::kTile>;
  if (a.ws.dq_tile_rows != K::kBlockM) return cudaErrorInvalidValue;  // sized for another tile
  cudaError_t err = launch_bwd_d256<Element, D256Dq::kTile>(a, stream);
  if (err != cudaSuccess) return err;
  return launch_dq_postprocess_tiles<K>(a, stream);
}

template <typename Element, int kDqk, int kDv>
cudaError_t launch_bwd(BwdArgs const& a, cudaStream_t stream) {
  if constexpr (kBwdV5Supported<kDqk, kDv>) {
    // ws.dq_tile_rows is set exactly when params.h's bwd_tile_dq_applies holds: the workspace
    // holds the per-tile accumulator, which at these head dims only v7 fills.
    if (a.ws.dq_tile_rows != 0) return launch_bwd_v7<Element, kDqk, kDv>(a, stream);
    if (bwd_v5_applies<Element, kDqk, kDv>(a)) {
      DqMode const mode = a.bwd_version == kBwdTimingV5NoDqAdd    ? DqMode::kSkip
                          : a.bwd_version == kBwdTimingV5NoReduce ? DqMode::kStageOnly
                                                                  : DqMode::kReduce;
      return launch_bwd_v5<BwdKernelV5<Element, kDqk, kDv>>(a, mode, stream);
    }
  }
  if constexpr (kBwdD256Supported<kDqk, kDv>) {
    // The per-tile accumulator at hd256 is v8's (params.h bwd_tile_dq_applies).
    if (a.ws.dq_tile_rows != 0) return launch_bwd_v8<Element>(a, stream);
    // v6: asked for by name, or its dQ timing variants; never deterministic. (The default is v8,
    // which the workspace's per-tile accumulator sent above.)
    if (!a.s.deterministic) {
      if (a.bwd_version == kBwdV6) {
        return launch_bwd_d256<Element>(a, stream);
      }
      if (a.bwd_version == kBwdTimingV6NoDqAdd) {
        return launch_bwd_d256<Element, D256Dq::kNoAdd>(a, stream);
      }
      if (a.bwd_version == kBwdTimingV6NoDq) {
        return launch_bwd_d256<Element, D256Dq::kNone>(a, stream);
      }
    }
  }
  if (a.ws.dq_tile_rows != 0) return cudaErrorInvalidValue;  // bwd_tile_dq_applies: never here
  using K = BwdKernel<Element, kDqk, kDv>;
  AttnShape const& s = a.s;
  typename K::Params p{
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.q, s.rows_q, kDqk, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutQ{}), Shape<Int<K::kBlockM>, Int<kDqk>>{},
                    _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.k, s.rows_k, kDqk, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutK{}, Shape<Int<K::kBlockN>, Int<kDqk>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.v, s.rows_k, kDv, s.heads_k, s.tma_batch),
                    typename K::SmemLayoutV{}, Shape<Int<K::kBlockN>, Int<kDv>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_view<Element>(a.dout, s.rows_q, kDv, s.heads_q, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutdO{}), Shape<Int<K::kBlockM>, Int<kDv>>{},
                    _1{}),
      s,
      static_cast<Element*>(a.dk.ptr),
      a.dk.batch_stride,
      a.dk.seq_stride,
      a.dk.head_stride,
      static_cast<Element*>(a.dv.ptr),
      a.dv.batch_stride,
      a.dv.seq_stride,
      a.dv.head_stride,
      reinterpret_cast<float*>(a.workspace + a.ws.dq_accum),
      reinterpret_cast<float const*>(a.workspace + a.ws.lse_log2),
      reinterpret_cast<float const*>(a.workspace + a.ws.dpsum),
      reinterpret_cast<int*>(a.workspace + a.ws.semaphores),
      (s.softcap > 0.f ? 1.f : s.scale) * kLog2e,
      s.softcap,
      s.softcap > 0.f ? s.scale / s.softcap : 0.f,
      // The deterministic order releases a semaphore after its REDs land; v3 keeps to v2 there.
      a.bwd_version == 3 && !s.deterministic && K::kDqBufs > 0,
      a.bwd_version == kBwdTimingNoDqAdd,
  };
  auto kernel = bwd_kernel<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  dim3 grid((s.seqlen_k + K::kBlockN - 1) / K::kBlockN, s.heads_k, s.batch);
  kernel<<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace longflash::sm90

namespace longflash {

template <bool kBf16, int kDqk, int kDv>
cudaError_t run_bwd_sm90(BwdArgs const& args, cudaStream_t stream) {
  using Element = std::conditional_t<kBf16, cutlass::bfloat16_t, cutlass::half_t>;
  return sm90::launch_bwd<Element, kDqk, kDv>(args, stream);
}

}  // namespace longflash
