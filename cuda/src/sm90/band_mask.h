// The band mask (causal, sliding window, Nq != Nk aligned bottom-right) as integer ranges: which
// key blocks a query tile meets, which query blocks a key tile meets, and which keys a row sees.
// Pure integer code, callable from host and device, so that the host test
// (packages/longflash-cuda/tests/test_band_mask.py) checks it against brute force.
#pragma once

#ifdef __CUDACC__
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE inline
#endif

namespace longflash::sm90 {

// CUDA's integer min/max on the device (what the kernels always used), plain C++ on the host.
#ifdef __CUDA_ARCH__
LF_HOST_DEVICE int lf_min(int a, int b) { return min(a, b); }
LF_HOST_DEVICE int lf_max(int a, int b) { return max(a, b); }
#else
LF_HOST_DEVICE int lf_min(int a, int b) { return a < b ? a : b; }
LF_HOST_DEVICE int lf_max(int a, int b) { return a > b ? a : b; }
#endif

LF_HOST_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The tile (rows [i0, i1], cols [j0, j1]) intersects the visible band iff some j - i lies in
// [off - left, off + right]. Block ranges below are the exact solutions of that, so that the
// forward's key-block range for a query block and the backward's query-block range for a key block
// describe the same set of tiles (the deterministic backward relies on it).
struct BandMask {
  int off, left, right;  // left/right < 0: unbounded
  int len_q, len_k;

  // Key blocks [lo, hi] of width bn that meet query rows [i0, i1] (i1 < len_q). Empty: lo > hi.
  LF_HOST_DEVICE void key_blocks(int i0, int i1, int bn, int& lo, int& hi) const {
    lo = 0;
    hi = (len_k + bn - 1) / bn - 1;
    if (right >= 0) hi = lf_min(hi, floor_div(i1 + off + right, bn));
    if (left >= 0) {
      int t = i0 + off - left;
      if (t > len_k - 1) {
        hi = -1;
      } else {
        lo = lf_max(lo, floor_div(t, bn));
      }
    }
  }

  // Query blocks [lo, hi] of height bm that meet key cols [j0, j1] (j1 < len_k).
  LF_HOST_DEVICE void query_blocks(int j0, int j1, int bm, int& lo, int& hi) const {
    lo = 0;
    hi = (len_q + bm - 1) / bm - 1;
    if (right >= 0) {
      int t = j0 - off - right;
      if (t > len_q - 1) {
        hi = -1;
      } else {
        lo = lf_max(lo, floor_div(t, bm));
      }
    }
    if (left >= 0) hi = lf_min(hi, floor_div(j1 - off + left, bm));
  }

  // True when every (i, j) of the tile with j < len_k is visible: no per-element mask needed.
  LF_HOST_DEVICE bool tile_is_full(int i0, int i1, int j0, int j1) const {
    if (j1 >= len_k) return false;
    if (right >= 0 && j1 - i0 > off + right) return false;
    if (left >= 0 && j0 - i1 < off - left) return false;
    return true;
  }

  LF_HOST_DEVICE bool visible(int i, int j) const {
    return j < len_k && (right < 0 || j - i <= off + right) && (left < 0 || j - i >= off - left);
  }

  // The keys [lo, hi) that query row i sees: (lo <= j && j < hi) == (visible(i, j) && i < len_q)
  // for every j >= 0; empty (hi = 0) for a row past len_q.
  LF_HOST_DEVICE void row_keys(int i, int& lo, int& hi) const {
    hi = right >= 0 ? lf_min(len_k, i + off + right + 1) : len_k;
    lo = left >= 0 ? i + off - left : 0;
    if (i >= len_q) hi = 0;
  }

  // The queries [lo, hi) that see key j: (lo <= i && i < hi) == (visible(i, j) && i < len_q) for
  // every i >= 0; empty (hi = 0) for a key past len_k.
  LF_HOST_DEVICE void key_queries(int j, int& lo, int& hi) const {
    lo = right >= 0 ? j - off - right : 0;
    hi = left >= 0 ? lf_min(len_q, j - off + left + 1) : len_q;
    if (j >= len_k) hi = 0;
  }
};

}  // namespace longflash::sm90
