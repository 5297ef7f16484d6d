// Host helpers shared by the sm90 launchers: global tensor views for TMA descriptors.
// No kernels. Target: sm_90a hosts (descriptors are built on the CPU).
#pragma once

#include <cute/tensor.hpp>

#include "../params.h"

namespace longflash::sm90 {

// (seq, d, head, batch) view of a (batch, seq, head, d) tensor with unit stride along d; the TMA
// box clips at `rows`, so reads past the last token of the packed tensor return zeros.
template <typename Element>
auto gmem_view(TensorRef const& t, int rows, int dim, int heads, int batch) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(static_cast<Element const*>(t.ptr)),
                     make_layout(make_shape(int32_t(rows), int32_t(dim), int32_t(heads),
                                            int32_t(batch)),
                                 make_stride(t.seq_stride, _1{}, t.head_stride, t.batch_stride)));
}

}  // namespace longflash::sm90
