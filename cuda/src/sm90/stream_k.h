// The forward's stream-K tail (LONGFLASH_CUDA_FWD "+streamk"): how a persistent grid shares the
// last tiles of a call by key blocks. Pure integer code, callable from host and device, so that
// the host test (packages/longflash-cuda/tests/test_stream_k.py) checks it exhaustively.
#pragma once

#include "band_mask.h"  // LF_HOST_DEVICE

namespace longflash::sm90 {

// `ctas` persistent CTAs over `total` tiles of `blocks` key blocks each, every tile the same (no
// band, not varlen). Whole tiles in the static schedule leave a partial last round: the hd128 4K
// bench shape has 2,048 tiles on 132 CTAs, 16 rounds of work where 15.5 would do. Here the first
// dp_rounds rounds hand out whole tiles as before, and the rest (more than ctas and at most
// 2·ctas tiles) is cut into one run of consecutive key blocks per CTA (block k of tail tile t is
// t·blocks + k), so that every CTA ends within a block of the others.
//
// A CTA walks its run downwards, one piece per tile. A tile that a cut falls in is shared by two
// neighbours: CTA c holds its first blocks at the top of its run, walks them first and writes
// them as a partial result (a WRITER piece); CTA c + 1 holds the rest at the bottom of its run,
// walks them last and merges the partial into its own (a MERGER piece). A run is never shorter
// than a tile, so no piece is both, a CTA writes at most once (its first piece) and merges at most
// once (its last), and the partial of CTA c sits in slot c. The merger waits only for a CTA of
// lower index, which the hardware started no later than itself, so the wait cannot deadlock, and
// it comes at the end of the merger's run while the write came at the start of the writer's.
struct StreamKTail {
  enum Role { kWhole = 0, kWriter = 1, kMerger = 2 };

  int total, ctas, blocks;
  int dp_rounds;   // rounds of whole tiles before the tail (all rounds when nothing is split)
  int first;       // the tail's first tile (dp_rounds · ctas); total: no tail
  long long tail;  // key blocks in the tail

  LF_HOST_DEVICE StreamKTail(int total_, int ctas_, int blocks_)
      : total(total_), ctas(ctas_), blocks(blocks_) {
    int const rounds = (total + ctas - 1) / ctas;
    bool const split = blocks > 1 && rounds >= 2 && total % ctas != 0;
    dp_rounds = split ? rounds - 2 : rounds;
    first = split ? dp_rounds * ctas : total;
    tail = (long long)(total - first) * blocks;
  }

  // CTA c's run [lo, hi) of the tail's blocks.
  LF_HOST_DEVICE void run(int c, long long& lo, long long& hi) const {
    lo = tail * c / ctas;
    hi = tail * (c + 1) / ctas;
  }

  // The piece of a run that ends at `end` (exclusive; the first is the run's hi): the tile
  // (absolute index), its blocks [k0, k1) and the piece's role. The next piece ends at
  // next_end; the run is done when that reaches lo.
  LF_HOST_DEVICE void piece(long long lo, long long end, int& tile, int& k0, int& k1, int& role,
                            long long& next_end) const {
    long long const t = (end - 1) / blocks;
    long long const start = t * blocks;
    k1 = int(end - start);
    k0 = int((lo > start ? lo : start) - start);
    tile = first + int(t);
    role = k0 == 0 ? (k1 == blocks ? kWhole : kWriter) : kMerger;
    next_end = start + k0;
  }
};

// Bytes of the stream-K workspace: one flag per (CTA, consumer warpgroup), padded to 256 bytes,
// then each consumer thread's partial O (kDv / 2 floats: 64 rows x kDv per warpgroup over 128
// threads) with the max and sum of its two rows.
LF_HOST_DEVICE constexpr long long stream_k_flag_bytes(int ctas, int consumer_wgs) {
  return ((long long)ctas * consumer_wgs * 4 + 255) / 256 * 256;
}
LF_HOST_DEVICE constexpr int stream_k_thread_floats(int dv) { return dv / 2 + 4; }
LF_HOST_DEVICE constexpr long long stream_k_workspace_bytes(int ctas, int consumer_wgs, int dv) {
  return stream_k_flag_bytes(ctas, consumer_wgs) +
         (long long)ctas * consumer_wgs * 128 * stream_k_thread_floats(dv) * 4;
}

}  // namespace longflash::sm90
