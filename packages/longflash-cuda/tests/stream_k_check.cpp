// Exhaustive host check of cuda/src/sm90/stream_k.h over small grids (driven by
// test_stream_k.py): every (tile, key block) is computed exactly once, each split tile has one
// writer piece (the first of CTA c's run) and one merger piece (the last of CTA c + 1's run) that
// together cover it, and the CTAs' work differs by at most one key block.
#include <cstdio>
#include <vector>

#include "stream_k.h"

using longflash::sm90::StreamKTail;

static int fail(char const* what, int total, int ctas, int blocks) {
  std::printf("FAIL %s: total=%d ctas=%d blocks=%d\n", what, total, ctas, blocks);
  return 1;
}

int main() {
  long long checks = 0;
  for (int ctas = 1; ctas <= 40; ++ctas) {
    for (int total = 1; total <= 5 * ctas + 3; ++total) {
      for (int blocks = 1; blocks <= 12; ++blocks) {
        StreamKTail const s(total, ctas, blocks);
        std::vector<int> seen(size_t(total) * blocks, 0);
        std::vector<int> writer_of(total, -1), merger_of(total, -1), writer_k1(total, -1),
            merger_k0(total, -1);
        long long lo_work = -1, hi_work = -1;
        for (int c = 0; c < ctas; ++c) {
          long long work = 0;
          for (int r = 0; r < s.dp_rounds; ++r) {  // whole tiles: any bijection of a round works
            int const tile = r * ctas + c;
            if (tile >= total) continue;
            for (int k = 0; k < blocks; ++k) ++seen[size_t(tile) * blocks + k];
            work += blocks;
          }
          long long lo, hi;
          s.run(c, lo, hi);
          if (s.tail > 0 && hi - lo < blocks) return fail("run shorter than a tile", total, ctas, blocks);
          int pieces = 0;
          for (long long end = hi; end > lo; ++pieces) {
            int tile, k0, k1, role;
            long long next;
            s.piece(lo, end, tile, k0, k1, role, next);
            if (next >= end || k0 >= k1 || tile < s.first || tile >= total) {
              return fail("piece out of range", total, ctas, blocks);
            }
            for (int k = k0; k < k1; ++k) ++seen[size_t(tile) * blocks + k];
            work += k1 - k0;
            if (role == StreamKTail::kWriter) {
              if (pieces != 0 || writer_of[tile] != -1) return fail("writer", total, ctas, blocks);
              writer_of[tile] = c;
              writer_k1[tile] = k1;
            } else if (role == StreamKTail::kMerger) {
              if (next != lo || merger_of[tile] != -1) return fail("merger", total, ctas, blocks);
              merger_of[tile] = c;
              merger_k0[tile] = k0;
            } else if (k0 != 0 || k1 != blocks) {
              return fail("whole piece not whole", total, ctas, blocks);
            }
            end = next;
            ++checks;
          }
          lo_work = lo_work < 0 || work < lo_work ? work : lo_work;
          hi_work = work > hi_work ? work : hi_work;
        }
        for (size_t i = 0; i < seen.size(); ++i) {
          if (seen[i] != 1) return fail("block not computed exactly once", total, ctas, blocks);
        }
        for (int t = 0; t < total; ++t) {
          bool const w = writer_of[t] >= 0, m = merger_of[t] >= 0;
          if (w != m) return fail("split tile without its partner", total, ctas, blocks);
          if (w && (merger_of[t] != writer_of[t] + 1 || writer_k1[t] != merger_k0[t])) {
            return fail("writer and merger do not meet", total, ctas, blocks);
          }
        }
        // Balanced where there is a tail: the whole-tile rounds are equal, the runs differ by one.
        if (s.tail > 0 && hi_work - lo_work > 1) return fail("unbalanced", total, ctas, blocks);
        bool const expect_tail = blocks > 1 && total > ctas && total % ctas != 0;
        if ((s.tail > 0) != expect_tail) return fail("tail where none belongs", total, ctas, blocks);
        ++checks;
      }
    }
  }
  std::printf("ok %lld\n", checks);
  return 0;
}
