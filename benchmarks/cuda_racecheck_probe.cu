// What does compute-sanitizer's racecheck accept as ordering between two warpgroups? A probe with
// the v6 backward's (cuda/src/sm90/bwd_d256.cuh) handoff protocol and plain shared-memory loads and
// stores only, so every access is one racecheck tracks. Three protocols, all race-free by the PTX
// barrier semantics (the argument is in benchmarks/NOTES-cuda.md, "v6 measured"):
//   split     the ready hand-overs by bar.sync on both sides, the free hand-backs by bar.arrive
//             (reader) + bar.sync (writer): v6 as first written
//   sync      the ready hand-overs alone (they already order a read of step s before the write
//             of step s+1, since both warpgroups pass the step's second barrier in between)
//   mbarrier  the free hand-backs by mbarrier arrive + parity wait: v6 as it is now
// Build and run (sm_90a):
//   nvcc -O2 -arch=sm_90a -o /tmp/probe benchmarks/cuda_racecheck_probe.cu
//   for m in split sync mbarrier; do compute-sanitizer --tool racecheck /tmp/probe $m; done
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr int kSteps = 8;
constexpr int kSlots = 16;  // floats per thread per buffer, like v6's 16 float2 of g

__device__ __forceinline__ void bar_sync(int id) {
  asm volatile("bar.sync %0, 256;" ::"r"(id) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id) {
  asm volatile("bar.arrive %0, 256;" ::"r"(id) : "memory");
}
__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  uint32_t const a = static_cast<uint32_t>(__cvta_generic_to_shared(b));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  uint32_t const a = static_cast<uint32_t>(__cvta_generic_to_shared(b));
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(a) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, int parity) {
  uint32_t const a = static_cast<uint32_t>(__cvta_generic_to_shared(b));
  asm volatile(
      "{\n.reg .pred p;\nLF_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra LF_WAIT_%=;\n}\n" ::"r"(a),
      "r"(parity)
      : "memory");
}

// mode 0 split, 1 sync, 2 mbarrier. Warpgroup 0 stands for v6's producer and leaves at once;
// warpgroup 1 writes g and reads dS (v6's warpgroup 0), warpgroup 2 reads g and writes dS.
__global__ void probe(int mode, float* out) {
  __shared__ float g[kSlots * 128];
  __shared__ float ds[kSlots * 128];
  __shared__ uint64_t p_free, ds_free;
  int const wg = threadIdx.x / 128;
  int const tid = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    mbar_init(&p_free, 128);
    mbar_init(&ds_free, 128);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) return;
  float acc = 0.f;
  for (int step = 0; step < kSteps; ++step) {
    bool const last = step + 1 == kSteps;
    if (wg == 1) {
      if (step > 0 && mode == 0) bar_sync(3);
      if (step > 0 && mode == 2) mbar_wait(&p_free, (step - 1) & 1);
      for (int e = 0; e < kSlots; ++e) g[e * 128 + tid] = float(step + e);
      bar_sync(1);
      bar_sync(2);
      for (int e = 0; e < kSlots; ++e) acc += ds[e * 128 + tid];
      if (!last && mode == 0) bar_arrive(4);
      if (!last && mode == 2) mbar_arrive(&ds_free);
    } else {
      bar_sync(1);
      float v[kSlots];
      for (int e = 0; e < kSlots; ++e) v[e] = g[e * 128 + tid];
      if (step > 0 && mode == 0) bar_sync(4);
      if (step > 0 && mode == 2) mbar_wait(&ds_free, (step - 1) & 1);
      for (int e = 0; e < kSlots; ++e) ds[e * 128 + tid] = v[e] * 2.f;
      bar_sync(2);
      if (!last && mode == 0) bar_arrive(3);
      if (!last && mode == 2) mbar_arrive(&p_free);
    }
  }
  out[threadIdx.x] = acc;
}

}  // namespace

int main(int argc, char** argv) {
  char const* names[] = {"split", "sync", "mbarrier"};
  int mode = -1;
  for (int m = 0; m < 3; ++m) {
    if (argc > 1 && std::strcmp(argv[1], names[m]) == 0) mode = m;
  }
  if (mode < 0) {
    std::fprintf(stderr, "usage: %s split|sync|mbarrier\n", argv[0]);
    return 2;
  }
  float* out = nullptr;
  cudaMalloc(&out, 384 * sizeof(float));
  probe<<<4, 384>>>(mode, out);
  cudaError_t const err = cudaDeviceSynchronize();
  float h[384];
  cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
  // Warpgroup 1 sums dS = 2 (s + e) over steps s and slots e.
  float want = 0.f;
  for (int s = 0; s < kSteps; ++s)
    for (int e = 0; e < kSlots; ++e) want += 2.f * float(s + e);
  bool ok = err == cudaSuccess;
  for (int t = 128; t < 256; ++t) ok = ok && h[t] == want;
  std::printf("probe %s: %s (%s)\n", names[mode], ok ? "ok" : "WRONG", cudaGetErrorString(err));
  cudaFree(out);
  return ok ? 0 : 1;
}
