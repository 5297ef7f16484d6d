// How fast can 132 CTAs add fp32 dQ tiles into an L2/HBM accumulator, by mechanism? The hd256
// backward (v6, cuda/src/sm90/bwd_d256.cuh) adds a 64 x 256 fp32 tile per step by 8-byte REDs, and
// without them it runs 1.96x faster (NOTES-cuda.md, "hd256: what the dQ REDs cost"). This probe
// does nothing but the adds, at v6's traffic (64 KiB per step, 1,024 tiles of one 4K x 16-head
// call), and times each way of issuing them:
//   red2   v6's: each thread REDs its m64n128 fragment as 32 8-byte pairs into the row layout
//   red4   the fragment's row pairs swapped between neighbouring lanes (2 shuffles per 4 floats),
//          so each thread REDs 16-byte vectors: half the RED instructions, the same sectors
//   bulk   the tile staged in shared memory and added by 4 bulk reduces of 16 KiB
//          (cp.reduce.async.bulk) into a per-tile contiguous layout, two staging buffers
// Every mode adds 1.0 to each element of the tiles it visits; the sums are checked on the host.
// Build and run (sm_90a):
//   nvcc -O3 -arch=sm_90a -o /tmp/reduce_probe benchmarks/cuda_reduce_probe.cu
//   /tmp/reduce_probe            (prints one line per mode and footprint, GB/s of fp32 added)
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 64, kCols = 256, kTileFloats = kRows * kCols;  // one dQ tile, 64 KiB
constexpr int kThreads = 256;                                           // two warpgroups
constexpr int kCtas = 132;

__device__ __forceinline__ void red2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void red4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c),
               "f"(d)
               : "memory");
}

// The tile a CTA adds at a step: spread like v6's rotated query blocks, so concurrent CTAs hit
// different tiles and every tile gets the same number of adds over the run.
__device__ __forceinline__ int tile_at(int cta, int step, int tiles) {
  return (cta * 7 + step) % tiles;
}

// The row layout (rows, heads, 256): tile t = (query block t / heads, head t % heads).
__device__ __forceinline__ float* row_tile(float* acc, int t, int heads) {
  int const m = t / heads, h = t % heads;
  return acc + (int64_t(m) * kRows * heads + h) * kCols;
}

// Thread t of warpgroup w holds, like an m64n128 wgmma accumulator, rows r0 = 16 * warp + lane / 4
// and r0 + 8, columns 128 w + 8 j + 2 (lane % 4) + {0, 1} for j < 16: 64 floats.
__global__ void __launch_bounds__(kThreads) add_red(float* acc, int heads, int tiles, int steps,
                                                    int vec4) {
  int const w = threadIdx.x / 128, t = threadIdx.x % 128, lane = t % 32;
  int const r0 = 16 * (t / 32) + lane / 4;
  int const row_stride = heads * kCols;
  for (int s = 0; s < steps; ++s) {
    float* const base = row_tile(acc, tile_at(blockIdx.x, s, tiles), heads) + 128 * w;
    if (!vec4) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        int const c = 8 * j + 2 * (lane % 4);
        red2(base + r0 * row_stride + c, 1.f, 1.f);
        red2(base + (r0 + 8) * row_stride + c, 1.f, 1.f);
      }
    } else {
      // Lanes 2k and 2k+1 hold columns c, c+1 and c+2, c+3 of rows r0 and r0+8. After swapping
      // one pair each way, the even lane holds row r0's four columns, the odd lane row r0+8's.
      bool const odd = lane & 1;
      int const row = odd ? r0 + 8 : r0;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        float const a0 = 1.f, a1 = 1.f, b0 = 1.f, b1 = 1.f;  // (r0: c, c+1), (r0+8: c, c+1)
        float const s0 = odd ? a0 : b0, s1 = odd ? a1 : b1;  // what the neighbour needs
        float const o0 = __shfl_xor_sync(0xffffffffu, s0, 1);
        float const o1 = __shfl_xor_sync(0xffffffffu, s1, 1);
        int const c = 8 * j + 4 * ((lane % 4) / 2);
        if (!odd) {
          red4(base + row * row_stride + c, a0, a1, o0, o1);
        } else {
          red4(base + row * row_stride + c, o0, o1, b0, b1);
        }
      }
    }
  }
}

__device__ __forceinline__ void bulk_add(float* dst, uint32_t src, int bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
      "r"(src), "r"(bytes)
      : "memory");
}

// The same adds through shared memory: every thread stages its 64 floats as 16-byte vectors (the
// v7 fragment order: the per-tile layout), thread 0 issues four 16 KiB bulk reduces. Two staging
// buffers of 64 KiB: a buffer is rewritten only once the reduces of two steps ago have read it.
__global__ void __launch_bounds__(kThreads) add_bulk(float* acc, int tiles, int steps) {
  extern __shared__ __align__(128) float stage[];
  for (int s = 0; s < steps; ++s) {
    float* const buf = stage + (s & 1) * kTileFloats;
    if (threadIdx.x == 0 && s >= 2) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    __syncthreads();
#pragma unroll
    for (int v = 0; v < 16; ++v) {
      reinterpret_cast<float4*>(buf)[v * kThreads + threadIdx.x] = make_float4(1.f, 1.f, 1.f, 1.f);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x == 0) {
      float* const dst = acc + int64_t(tile_at(blockIdx.x, s, tiles)) * kTileFloats;
      uint32_t const src = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
      for (int q = 0; q < 4; ++q) bulk_add(dst + q * 4096, src + q * 16384, 16384);
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                  \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                               \
    }                                                                         \
  } while (0)

}  // namespace

int main() {
  int failures = 0;
  // 1,024 tiles = a 4K x 16-head hd256 call (64 MiB, over the 50 MiB L2); 256 tiles = 16 MiB.
  for (int tiles : {1024, 256}) {
    int const heads = 16;
    // Steps per CTA: 65,536 tile-adds in all, a 4K x 16-head backward's (64 key blocks x 1,024).
    int const steps = 65536 / kCtas;
    size_t const floats = size_t(tiles) * kTileFloats;
    float* acc;
    CHECK(cudaMalloc(&acc, floats * sizeof(float)));
    CHECK(cudaFuncSetAttribute(add_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               2 * kTileFloats * int(sizeof(float))));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    for (char const* mode : {"red2", "red4", "bulk"}) {
      auto launch = [&] {
        if (!std::strcmp(mode, "bulk")) {
          add_bulk<<<kCtas, kThreads, 2 * kTileFloats * sizeof(float)>>>(acc, tiles, steps);
        } else {
          add_red<<<kCtas, kThreads>>>(acc, heads, tiles, steps, !std::strcmp(mode, "red4"));
        }
      };
      CHECK(cudaMemset(acc, 0, floats * sizeof(float)));
      launch();  // warm-up, and the run whose sums are checked
      CHECK(cudaDeviceSynchronize());
      std::vector<float> host(floats);
      CHECK(cudaMemcpy(host.data(), acc, floats * sizeof(float), cudaMemcpyDeviceToHost));
      double sum = 0;
      for (float x : host) sum += x;
      double const want = double(kCtas) * steps * kTileFloats;
      bool const ok = sum == want;
      failures += !ok;
      float best = 1e30f;
      for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(e0));
        launch();
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        best = ms < best ? ms : best;
      }
      double const bytes = double(kCtas) * steps * kTileFloats * sizeof(float);
      std::printf("%-5s footprint %3d MiB  %8.3f ms  %7.0f GB/s  sums %s\n", mode,
                  int(floats * 4 >> 20), best, bytes / best * 1e-6, ok ? "ok" : "WRONG");
    }
    CHECK(cudaFree(acc));
  }
  return failures ? 1 : 0;
}
