// Host side of the sm90 forward: builds the TMA descriptors and launches one CTA per tile or a
// persistent grid of one CTA per SM (FwdArgs::fwd_grid), with the hd64 v3 and ping-pong kernels
// when FwdArgs::fwd_version asks for them.
// Included only by the generated instantiation units. Target: sm_90a.
#pragma once

#include "fwd.cuh"
#include "launch_common.cuh"

namespace longflash::sm90 {

template <class K>
cudaError_t launch_fwd_kernel(FwdArgs const& a, cudaStream_t stream) {
  using Element = typename K::Element;
  constexpr int kDqk = K::kDqk;
  constexpr int kDv = K::kDv;
  AttnShape const& s = a.s;
  typename K::Params p{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.q, s.rows_q, kDqk, s.heads_q, s.tma_batch),
                    typename K::SmemLayoutQ{}, Shape<Int<K::kBlockM>, Int<kDqk>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.k, s.rows_k, kDqk, s.heads_k, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutK{}), Shape<Int<K::kBlockN>, Int<kDqk>>{},
                    _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Element>(a.v, s.rows_k, kDv, s.heads_k, s.tma_batch),
                    take<0, 2>(typename K::SmemLayoutV{}), Shape<Int<K::kBlockN>, Int<kDv>>{},
                    _1{}),
      s,
      static_cast<Element*>(a.o.ptr),
      a.o.batch_stride,
      a.o.seq_stride,
      a.o.head_stride,
      a.lse,
      (s.softcap > 0.f ? 1.f : s.scale) * kLog2e,
      s.softcap,
      s.softcap > 0.f ? s.scale / s.softcap : 0.f,
      K::kDynamic ? a.tile_counter : nullptr,
      K::kDynamic ? a.tile_group : 1,
      K::kStreamK ? a.sk_partial : nullptr,
      K::kStreamK ? a.sk_flags : nullptr,
  };
  auto kernel = fwd_kernel<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  int64_t const tiles =
      int64_t((s.seqlen_q + K::kBlockM - 1) / K::kBlockM) * s.heads_q * s.batch;
  int64_t grid = tiles;
  if (a.fwd_grid != kFwdGridPerTile) {
    int sms = 0;
    err = sm_count(sms);
    if (err != cudaSuccess) return err;
    // CTAs of this kernel that fit on one SM: a property of the kernel and the architecture, so
    // asked once per kernel rather than on every launch.
    static int const per_sm = [kernel] {
      int n = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, K::kThreads, K::kSmemBytes);
      return std::max(n, 1);
    }();
    grid = std::min<int64_t>(tiles, int64_t(sms) * per_sm);
    if (a.max_ctas > 0) grid = std::min<int64_t>(grid, a.max_ctas);
  }
  if (grid == 0) return cudaSuccess;
  if constexpr (K::kDynamic) {
    err = cudaMemsetAsync(a.tile_counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  if constexpr (K::kStreamK) {
    err = cudaMemsetAsync(a.sk_flags, 0, stream_k_flag_bytes(int(grid), K::kConsumerWGs), stream);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(unsigned(grid)), K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int kDqk, int kDv>
cudaError_t launch_fwd(FwdArgs const& a, cudaStream_t stream) {
  if constexpr (kDqk == 64 && kDv == 64) {
    if (a.fwd_version == kFwdV3) {
      return launch_fwd_kernel<FwdKernelV3<Element, kDqk, kDv, true>>(a, stream);
    }
    if (a.fwd_version == kFwdV3ExpEmu) {
      return launch_fwd_kernel<FwdKernelV3<Element, kDqk, kDv, true, true>>(a, stream);
    }
    if (a.fwd_version == kFwdV3OwnKeys) {
      return launch_fwd_kernel<FwdKernelV3OwnKeys<Element, kDqk, kDv>>(a, stream);
    }
    if (a.fwd_version == kFwdV3NoPingPong) {
      if (a.fwd_grid == kFwdGridDynamic) {
        return launch_fwd_kernel<FwdKernelV3Dynamic<Element, kDqk, kDv>>(a, stream);
      }
      if (a.fwd_grid == kFwdGridStreamK) {
        return launch_fwd_kernel<FwdKernelV3StreamK<Element, kDqk, kDv>>(a, stream);
      }
      return launch_fwd_kernel<FwdKernelV3<Element, kDqk, kDv, false>>(a, stream);
    }
  }
  if (a.fwd_grid == kFwdGridDynamic) {
    return launch_fwd_kernel<FwdKernelDynamic<Element, kDqk, kDv>>(a, stream);
  }
  if (a.fwd_grid == kFwdGridStreamK) {
    return launch_fwd_kernel<FwdKernelStreamK<Element, kDqk, kDv>>(a, stream);
  }
  return launch_fwd_kernel<FwdKernel<Element, kDqk, kDv>>(a, stream);
}

}  // namespace longflash::sm90

namespace longflash {

template <bool kBf16, int kDqk, int kDv>
cudaError_t run_fwd_sm90(FwdArgs const& args, cudaStream_t stream) {
  using Element = std::conditional_t<kBf16, cutlass::bfloat16_t, cutlass::half_t>;
  return sm90::launch_fwd<Element, kDqk, kDv>(args, stream);
}

}  // namespace longflash
