// XLA FFI handlers over the C API, registered from Python with jax.ffi.register_ffi_target:
//   longflash_xla_fwd(q, k, v, cu_q, cu_k) -> (out, lse, workspace)
//   longflash_xla_bwd(q, k, v, out, dout, lse, cu_q, cu_k) -> (dq, dk, dv, workspace)
// XLA buffers are dense row-major; the workspace is an extra uint8 result sized by the Python side
// with lf_attention_*_workspace_size, so XLA owns (and can reuse) that memory.
#include <cuda_runtime.h>

#include <string>

#include "longflash/longflash.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

lf_tensor dense_tensor(ffi::AnyBuffer const& b, bool varlen) {
  auto d = b.dimensions();
  lf_tensor t{b.untyped_data(), 0, 0, 0};
  // dense (B, N, H, D) or varlen (T, H, D), row-major.
  int64_t const D = d[d.size() - 1];
  int64_t const H = d[d.size() - 2];
  t.head_stride = D;
  t.seq_stride = H * D;
  t.batch_stride = varlen ? 0 : d[1] * H * D;
  return t;
}

lf_attention_params make_params(ffi::AnyBuffer const& q, ffi::AnyBuffer const& k,
                                ffi::AnyBuffer const& v, ffi::AnyBuffer const& cu_q,
                                ffi::AnyBuffer const& cu_k, int64_t varlen, int64_t batch,
                                int64_t max_q, int64_t max_k, float scale, float softcap,
                                int64_t left, int64_t right, int64_t deterministic) {
  lf_attention_params p{};
  p.struct_size = sizeof(p);
  p.dtype = q.element_type() == ffi::DataType::BF16 ? LF_BFLOAT16 : LF_FLOAT16;
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  int const r = int(qd.size());
  p.heads_q = int32_t(qd[r - 2]);
  p.heads_k = int32_t(kd[r - 2]);
  p.head_dim_qk = int32_t(qd[r - 1]);
  p.head_dim_v = int32_t(vd[r - 1]);
  p.batch = int32_t(batch);
  if (varlen) {
    p.cu_seqlens_q = static_cast<const int32_t*>(cu_q.untyped_data());
    p.cu_seqlens_k = static_cast<const int32_t*>(cu_k.untyped_data());
    p.total_q = int32_t(qd[0]);
    p.total_k = int32_t(kd[0]);
    p.seqlen_q = int32_t(max_q);
    p.seqlen_k = int32_t(max_k);
  } else {
    p.seqlen_q = int32_t(qd[1]);
    p.seqlen_k = int32_t(kd[1]);
  }
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = int32_t(left);
  p.window_right = int32_t(right);
  p.deterministic = int32_t(deterministic);
  return p;
}

ffi::Error to_error(lf_status st) {
  if (st == LF_SUCCESS) return ffi::Error::Success();
  std::string msg = std::string(lf_status_name(st)) + ": " + lf_last_error();
  return ffi::Error(st == LF_ERROR_CUDA ? ffi::ErrorCode::kInternal : ffi::ErrorCode::kInvalidArgument,
                    msg);
}

ffi::Error fwd_impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                    int64_t varlen, int64_t batch, int64_t max_q, int64_t max_k, float scale,
                    float softcap, int64_t left, int64_t right) {
  lf_attention_params p =
      make_params(q, k, v, cu_q, cu_k, varlen, batch, max_q, max_k, scale, softcap, left, right, 0);
  lf_status st = lf_attention_forward(
      &p, dense_tensor(q, varlen), dense_tensor(k, varlen), dense_tensor(v, varlen),
      dense_tensor(*out, varlen), static_cast<float*>(lse->untyped_data()),
      workspace->untyped_data(), workspace->size_bytes(), stream);
  return to_error(st);
}

ffi::Error bwd_impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer out, ffi::AnyBuffer dout, ffi::AnyBuffer lse,
                    ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> workspace, int64_t varlen, int64_t batch,
                    int64_t max_q, int64_t max_k, float scale, float softcap, int64_t left,
                    int64_t right, int64_t deterministic) {
  lf_attention_params p = make_params(q, k, v, cu_q, cu_k, varlen, batch, max_q, max_k, scale,
                                      softcap, left, right, deterministic);
  lf_status st = lf_attention_backward(
      &p, dense_tensor(q, varlen), dense_tensor(k, varlen), dense_tensor(v, varlen),
      dense_tensor(out, varlen), dense_tensor(dout, varlen),
      static_cast<const float*>(lse.untyped_data()), dense_tensor(*dq, varlen),
      dense_tensor(*dk, varlen), dense_tensor(*dv, varlen), workspace->untyped_data(),
      workspace->size_bytes(), stream);
  return to_error(st);
}

}  // namespace

// The library hides symbols by default; these two are looked up by name from Python.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(longflash_xla_fwd, fwd_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("varlen")
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("max_seqlen_q")
                                  .Attr<int64_t>("max_seqlen_k")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(longflash_xla_bwd, bwd_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("varlen")
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("max_seqlen_q")
                                  .Attr<int64_t>("max_seqlen_k")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("deterministic"));
#pragma GCC visibility pop
