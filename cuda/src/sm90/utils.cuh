// Shared device helpers of the sm90 kernels: wgmma issue, register-layout views, barriers.
// No tiles or IO of their own; used by the forward and backward kernels.
// Target: sm_90a (wgmma, setmaxnreg, mbarrier transactions).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "band_mask.h"

namespace longflash::sm90 {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// setmaxnreg only moves registers between a CTA's warpgroups, within what the CTA got at launch:
// threads x the entry count, which __launch_bounds__(threads, 1) caps at 64K / threads rounded
// down to a multiple of 8 (168 at 384 threads, 128 at 512). A split that asks for more makes
// setmaxnreg.inc wait forever for registers no warp will free: the kernel hangs.
constexpr bool fits_register_split(int threads, int producer_regs, int consumer_regs) {
  int const entry_regs = (65536 / threads) / 8 * 8;
  return 128 * producer_regs + (threads - 128) * consumer_regs <= entry_regs * threads;
}

// One warpgroup MMA over all k-blocks of its operands. kARegs: A comes from registers (RS), whose
// registers must be fenced like the accumulator. kWait < 0 returns with the batch still in flight.
template <bool kZeroInit, int kWait, bool kARegs, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(TiledMma& mma, TA const& tA, TB const& tB, TC& tC) {
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(tA));
}

// Accumulator ((2,2,N/8), M, N) viewed as rows x cols: ((2,M), (2,N/8,N)). Thread t of a warpgroup
// holds rows r0 + {0,8} of each 64-row atom, columns 8j + 2(t%4) + {0,1}.
template <class L>
__device__ __forceinline__ constexpr auto acc_rowcol(L l) {
  static_assert(decltype(rank<0>(l))::value == 3);
  auto v = get<0>(l);
  return make_layout(make_layout(get<1>(v), get<1>(l)),
                     make_layout(get<0>(v), get<2>(v), get<2>(l)));
}

// Accumulator of C = A·B (fp32, ((2,2,N/8), M, 1)) viewed as the A operand of a following
// register-sourced wgmma with K = N: ((2,2,2), M, N/16). The value order of the m64nNk16
// accumulator (col pair, row half, 8-col group) matches the A fragment (col pair, row half, k half)
// k-block by k-block, so no data moves: only the layout changes.
template <class L>
__device__ __forceinline__ constexpr auto acc_as_A(L l) {
  auto v = get<0>(l);
  static_assert(decltype(size<2>(v))::value % 2 == 0);
  auto s2 = stride<2>(v);
  auto va = make_layout(make_shape(_2{}, _2{}, _2{}), make_stride(stride<0>(v), stride<1>(v), s2));
  auto k = make_layout(make_shape(Int<decltype(size<2>(v))::value / 2>{}, size<2>(l)),
                       make_stride(s2 * _2{}, stride<2>(l)));
  return make_layout(va, get<1>(l), k);
}

template <typename To, class Tensor>
__device__ __forceinline__ auto convert_to(Tensor const& t) {
  auto out = make_tensor<To>(t.layout());
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(t); ++i) out(i) = static_cast<To>(t(i));
  return out;
}

// dst(i) = To(src(i)) for two register fragments of the same layout, two elements per conversion
// (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 through cutlass's NumericArrayConverter). In storage
// order, which the equal layouts make the same as index order. The element-wise cast of the
// forward's P (a fragment that the P·V wgmma reads as its A operand) compiled, with nvcc 13.0, to
// one F2FP per element and a PRMT per pair: 3 instructions per pair instead of 1.
template <class Src, class Dst>
__device__ __forceinline__ void convert_pairs(Src const& src, Dst& dst) {
  using From = typename Src::value_type;
  using To = typename Dst::value_type;
  static_assert(std::is_same_v<decltype(src.layout()), decltype(dst.layout())>);
  constexpr int kN = decltype(cosize(src.layout()))::value;
  static_assert(kN % 2 == 0 && kN == decltype(size(src))::value, "a compact fragment of pairs");
  using Conv = cutlass::NumericArrayConverter<To, From, 2>;
  auto const* s = reinterpret_cast<cutlass::Array<From, 2> const*>(raw_pointer_cast(src.data()));
  auto* d = reinterpret_cast<cutlass::Array<To, 2>*>(raw_pointer_cast(dst.data()));
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kN / 2; ++k) d[k] = Conv{}(s[k]);
}

// GPU-scope flags between CTAs: the waiter spins on ld_acquire, the setter publishes with a
// release (after a fence and a barrier over the threads whose writes the flag covers).
__device__ __forceinline__ int ld_acquire(int const* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads). Counts are in threads, multiples of 32.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
using Barrier = cutlass::arch::ClusterBarrier;

// Index and phase of a ring of `Stages` buffers.
template <int Stages>
struct RingState {
  int index = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++index == Stages) {
      index = 0;
      phase ^= 1;
    }
  }
};

__device__ __forceinline__ float tanh_fast(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Warp-quad reductions: the 4 threads t, t^1, t^2, t^3 share accumulator rows.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Swizzled K-major smem atom for a row of D 16-bit elements: 128B swizzle when D is a multiple of
// 64 (d64/128/192/256), 64B for d96.
template <typename T, int D>
__host__ __device__ constexpr auto k_major_atom() {
  if constexpr (D % 64 == 0) {
    return GMMA::Layout_K_SW128_Atom<T>{};
  } else if constexpr (D % 32 == 0) {
    return GMMA::Layout_K_SW64_Atom<T>{};
  } else {
    return GMMA::Layout_K_SW32_Atom<T>{};
  }
}

// Per-sequence geometry of one (batch) entry: where its rows start and how many there are.
struct SeqInfo {
  int start_q, start_k;  // row offsets into the packed tensors (0 for dense)
  int len_q, len_k;
  int tma_batch;         // batch coordinate of the TMA views (0 for varlen)
  int off;               // len_k - len_q: the diagonal of causal/window masks

  SeqInfo() = default;
  template <class Shape>
  __device__ __forceinline__ SeqInfo(Shape const& s, int b) {
    if (s.cu_q != nullptr) {
      // Clamp to the packed extents so that a malformed cu_seqlens never indexes out of bounds.
      int q0 = min(max(__ldg(s.cu_q + b), 0), s.rows_q);
      int q1 = min(max(__ldg(s.cu_q + b + 1), q0), s.rows_q);
      int k0 = min(max(__ldg(s.cu_k + b), 0), s.rows_k);
      int k1 = min(max(__ldg(s.cu_k + b + 1), k0), s.rows_k);
      start_q = q0;
      start_k = k0;
      len_q = q1 - q0;
      len_k = k1 - k0;
      tma_batch = 0;
    } else {
      start_q = start_k = 0;
      len_q = s.seqlen_q;
      len_k = s.seqlen_k;
      tma_batch = b;
    }
    off = len_k - len_q;
  }
};

// A band mask over a thread's share of an accumulator, as bounds per row of its row-col view
// (acc_rowcol): element (r, c) is hidden when its column lies outside row r's [lo, hi). The
// bounds are kept relative to the thread's first column, so each element's test compares them
// with a compile-time offset: two compares and a select per element. (BandMask::visible per
// element compiled to ~12 instructions and 3 branches each, so a diagonal block cost several
// unmasked ones.) `range(row, lo, hi)` is BandMask::row_keys when rows are queries (Q·Kᵀ) and
// BandMask::key_queries when rows are keys (K·Qᵀ); row0/col0 are the tile's first row and column.
template <int kRows>
struct RowBounds {
  int lo[kRows], hi[kRows];

  template <class TC, class Range>
  __device__ __forceinline__ RowBounds(TC const& c_rc, int row0, int col0, Range const& range) {
    int const base = col0 + get<1>(c_rc(0, 0));
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      range(row0 + get<0>(c_rc(r, 0)), lo[r], hi[r]);
      lo[r] -= base;
      hi[r] -= base;
    }
  }

  template <class TC>
  __device__ __forceinline__ bool hidden(TC const& c_rc, int r, int c) const {
    int const k = get<1>(c_rc(r, c)) - get<1>(c_rc(0, 0));
    return k < lo[r] || k >= hi[r];
  }

  // Sets every hidden element of the row-col view S_rc to `fill`.
  template <class TS, class TC>
  __device__ __forceinline__ void fill_hidden(TS& S_rc, TC const& c_rc, float fill) const {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S_rc); ++c) {
        if (hidden(c_rc, r, c)) S_rc(r, c) = fill;
      }
    }
  }
};

// The element half of store_acc_pairs_sw128's split, checked at compile time: every pair's
// offset d keeps off bits 0-3 and 7-9 (the thread's), so the sum never carries into the swizzle's
// bits.
template <class Layout>
constexpr bool sw128_pair_offsets_split() {
  for (int e = 0; e < int(size(Layout{})); e += 2) {
    if ((uint32_t(Layout{}(e)) * 2u) & 0x38Fu) return false;
  }
  return true;
}

// Stores a thread's accumulator fragment `acc` (fp32, or already Element) as Element pairs through
// `dst`, that thread's partition_C of a shared-memory tile laid out with a 128-byte-swizzled GMMA
// atom (Swizzle<3,4,3>: byte-address bits 4-6 ^= bits 7-9) whose first element is `tile`
// (1024-byte aligned). Storing through `&dst(e)` applies the swizzle to each element's 64-bit
// address: ~8 integer instructions per 4-byte store, ~240 per step of the hd64 backward's dS, as
// many as its whole P and dS passes. Here the swizzle is split between the thread and the
// element: for m64nNk16 wgmma accumulator fragments the thread's unswizzled byte offset u0 sets
// bits 2-3 and 7-9 (column pair, row within 8) and whole atoms, and the element's offset d sets
// bits 4-6 and whole atoms, so swz(u0 + d) = u0 + (d & ~0x70) + ((d & 0x70) ^ s) with the thread's
// s = (u0 >> 3) & 0x70. d is a compile-time constant, so each store is one STS at one of eight
// registers plus an immediate. (d's side is the static_assert below; u0's follows from the
// fragment layout and is exercised by every backward check: a wrong address corrupts dK and dQ.)
template <class TDst, class TAcc, class Element>
__device__ __forceinline__ void store_acc_pairs_sw128(TDst const& dst, TAcc const& acc,
                                                      Element const* tile) {
  static_assert(sizeof(Element) == 2);
  using DstLayout = decltype(dst.layout());
  static_assert(is_static<DstLayout>::value && sw128_pair_offsets_split<DstLayout>(),
                "the fragment's element offsets must leave the thread's swizzle bits alone");
  uint32_t const base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  uint32_t const u0 = uint32_t(raw_pointer_cast(dst.data()) - tile) * 2u;  // unswizzled
  uint32_t const s = (u0 >> 3) & 0x70u;
  uint32_t const a0 = base + u0;
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < size(acc); e += 2) {
    uint32_t const d = uint32_t(dst.layout()(e)) * 2u;
    alignas(4) Element pair[2] = {Element(acc(e)), Element(acc(e + 1))};
    uint32_t const a = a0 + (d & ~0x70u) + ((d & 0x70u) ^ s);
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(*reinterpret_cast<uint32_t*>(pair))
                 : "memory");
  }
}

}  // namespace longflash::sm90
