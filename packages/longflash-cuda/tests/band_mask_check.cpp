// Host check of cuda/src/sm90/band_mask.h against brute force over small shapes: the key blocks a
// query tile meets (forward), the query blocks a key tile meets (backward), which tiles need no
// per-element mask, and the per-row key / per-key query intervals the kernels mask scores with.
// Built and run by test_band_mask.py; prints one line per failure (at most 20) and "ok N" at the
// end.
#include <cstdio>
#include <initializer_list>

#include "band_mask.h"

using longflash::sm90::BandMask;

namespace {

int failures = 0;
long checks = 0;

void fail(const char* what, int lq, int lk, int left, int right, int a, int b) {
  if (++failures <= 20) {
    std::printf("FAIL %s lq=%d lk=%d left=%d right=%d at %d %d\n", what, lq, lk, left, right, a, b);
  }
}

// The last index of block `blk` of `size` over [0, len).
int block_end(int blk, int size, int len) {
  return (blk + 1) * size < len ? (blk + 1) * size - 1 : len - 1;
}

bool meets(BandMask const& m, int i0, int i1, int j0, int j1) {
  for (int i = i0; i <= i1; ++i) {
    for (int j = j0; j <= j1; ++j) {
      if (m.visible(i, j)) return true;
    }
  }
  return false;
}

void check_shape(int lq, int lk, int left, int right) {
  BandMask const m{lk - lq, left, right, lq, lk};
  // Intervals per row (rows before the sequence included: the 192-query forward's first tile
  // starts there) and per key.
  for (int i = -70; i < lq + 3; ++i) {
    int lo, hi;
    m.row_keys(i, lo, hi);
    for (int j = 0; j < lk + 3; ++j, ++checks) {
      if ((lo <= j && j < hi) != (m.visible(i, j) && i < lq)) {
        fail("row_keys", lq, lk, left, right, i, j);
      }
    }
  }
  for (int j = 0; j < lk + 3; ++j) {
    int lo, hi;
    m.key_queries(j, lo, hi);
    for (int i = 0; i < lq + 3; ++i, ++checks) {
      if ((lo <= i && i < hi) != (m.visible(i, j) && i < lq)) {
        fail("key_queries", lq, lk, left, right, i, j);
      }
    }
  }
  for (int bm : {1, 3, 64, 128, 192}) {
    for (int bn : {1, 2, 64, 96, 128}) {
      int const mb = (lq + bm - 1) / bm, nb = (lk + bn - 1) / bn;
      for (int mi = 0; mi < mb; ++mi) {
        int const i0 = mi * bm, i1 = block_end(mi, bm, lq);
        int lo, hi;
        m.key_blocks(i0, i1, bn, lo, hi);
        for (int n = 0; n < nb; ++n, ++checks) {
          int const j0 = n * bn, j1 = block_end(n, bn, lk);
          bool const want = meets(m, i0, i1, j0, j1);
          if ((lo <= n && n <= hi) != want) fail("key_blocks", lq, lk, left, right, mi, n);
          // The whole tile (rows past the sequence kept) needs no mask exactly when every
          // score of it is visible.
          int const j1_full = (n + 1) * bn - 1, i1_full = (mi + 1) * bm - 1;
          bool full = j1_full < lk;
          for (int i = i0; full && i <= i1_full; ++i) {
            for (int j = j0; full && j <= j1_full; ++j) full = m.visible(i, j);
          }
          if (m.tile_is_full(i0, i1_full, j0, j1_full) != full) {
            fail("tile_is_full", lq, lk, left, right, mi, n);
          }
        }
      }
      for (int n = 0; n < nb; ++n) {
        int const j0 = n * bn, j1 = block_end(n, bn, lk);
        int lo, hi;
        m.query_blocks(j0, j1, bm, lo, hi);
        for (int mi = 0; mi < mb; ++mi, ++checks) {
          int const i0 = mi * bm, i1 = block_end(mi, bm, lq);
          if ((lo <= mi && mi <= hi) != meets(m, i0, i1, j0, j1)) {
            fail("query_blocks", lq, lk, left, right, n, mi);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  for (int lq : {1, 5, 64, 130, 300}) {
    for (int lk : {1, 7, 64, 129, 260}) {
      for (int left : {-1, 0, 1, 17, 128, 400}) {
        for (int right : {-1, 0, 3, 64, 400}) check_shape(lq, lk, left, right);
      }
    }
  }
  if (failures) {
    std::printf("%d failures in %ld checks\n", failures, checks);
    return 1;
  }
  std::printf("ok %ld\n", checks);
  return 0;
}
