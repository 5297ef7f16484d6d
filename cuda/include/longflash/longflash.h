/* LongFlash C API: exact softmax attention (forward and backward) on NVIDIA GPUs.
 *
 * Framework-free: pointers, strides, shapes, a workspace and a stream. Every entry point checks its
 * arguments before touching the device and returns a status; lf_last_error() gives the message.
 * The header needs no CUDA header: streams are passed as void* (a cudaStream_t).
 *
 * Layouts (element strides; the head_dim axis always has unit stride):
 *   dense : q (B, Nq, Hq, Dqk), k (B, Nk, Hk, Dqk), v (B, Nk, Hk, Dv), out (B, Nq, Hq, Dv)
 *           lse float32 (B, Hq, Nq), contiguous.
 *   varlen: q (Tq, Hq, Dqk), k (Tk, Hk, Dqk), v (Tk, Hk, Dv), out (Tq, Hq, Dv), lse (Hq, Tq),
 *           cu_seqlens_q/k int32 device arrays of batch+1 prefix sums; batch_stride is ignored.
 * Masking: off = Nk - Nq (per sequence for varlen); query i sees key j iff
 *   i + off - window_left <= j <= i + off + window_right (a negative window side = unbounded).
 *   causal is window_right = 0. A query that sees no key gets out = 0 and lse = -inf.
 * softcap c > 0 replaces each scaled score s by c * tanh(s / c).
 * GQA/MQA: query head h reads key/value head h / (Hq / Hk).
 */
#ifndef LONGFLASH_LONGFLASH_H_
#define LONGFLASH_LONGFLASH_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LF_API __declspec(dllexport)
#else
#define LF_API __attribute__((visibility("default")))
#endif

#define LONGFLASH_API_VERSION 3  /* 2: lf_forward_plan; 3: lf_backward_head_group */

typedef enum lf_status {
  LF_SUCCESS = 0,
  LF_ERROR_INVALID_ARGUMENT = 1, /* malformed call: null pointer, bad size, inconsistent shapes */
  LF_ERROR_UNSUPPORTED = 2,      /* well formed, but this build cannot run it (head dim, strides) */
  LF_ERROR_WORKSPACE = 3,        /* workspace missing or smaller than the size query returned */
  LF_ERROR_NO_DEVICE = 4,        /* no CUDA driver or device */
  LF_ERROR_ARCH = 5,             /* the device is not one this build has kernels for */
  LF_ERROR_CUDA = 6              /* a CUDA runtime call or kernel launch failed */
} lf_status;

typedef enum lf_dtype { LF_FLOAT16 = 0, LF_BFLOAT16 = 1 } lf_dtype;

typedef struct lf_tensor {
  void* data;           /* device pointer, 16-byte aligned */
  int64_t batch_stride; /* elements; ignored for varlen */
  int64_t seq_stride;   /* elements between consecutive tokens */
  int64_t head_stride;  /* elements between consecutive heads */
} lf_tensor;

typedef struct lf_attention_params {
  uint32_t struct_size; /* sizeof(lf_attention_params): rejects a caller built against another header */
  lf_dtype dtype;
  int32_t batch;        /* B (number of sequences for varlen) */
  int32_t seqlen_q;     /* Nq; varlen: the longest query sequence */
  int32_t seqlen_k;     /* Nk; varlen: the longest key sequence */
  int32_t heads_q;
  int32_t heads_k;
  int32_t head_dim_qk;
  int32_t head_dim_v;
  const int32_t* cu_seqlens_q; /* device; NULL for dense. Both or neither. */
  const int32_t* cu_seqlens_k;
  int32_t total_q; /* varlen: rows of the packed q/out; ignored for dense */
  int32_t total_k; /* varlen: rows of the packed k/v */
  float scale;     /* finite, > 0 */
  float softcap;   /* 0 = off, else finite > 0 */
  int32_t window_left;  /* < 0 = unbounded */
  int32_t window_right; /* < 0 = unbounded; 0 = causal */
  int32_t deterministic; /* backward: 1 = reproducible dQ accumulation order (slower) */
} lf_attention_params;

/* Static name of a status ("LF_ERROR_UNSUPPORTED", ...). */
LF_API const char* lf_status_name(lf_status status);
/* Message of the last failing call in this thread ("" after a success). Valid until the next call. */
LF_API const char* lf_last_error(void);
/* The library's API version (LONGFLASH_API_VERSION it was built with). */
LF_API int lf_api_version(void);
/* Build description: "archs=90a;head_dims=64,128,192x128;dtypes=float16,bfloat16". */
LF_API const char* lf_build_config(void);
/* 1 when kernels for (head_dim_qk, head_dim_v, dtype) were compiled in, else 0. */
LF_API int lf_has_kernel(int head_dim_qk, int head_dim_v, lf_dtype dtype);
/* LF_SUCCESS when device `device` can run this build's kernels; else why (no driver, wrong arch). */
LF_API lf_status lf_check_device(int device);

/* Checks params alone (no pointers, no device): LF_SUCCESS when a call with them can run. */
LF_API lf_status lf_check_params(const lf_attention_params* params);

/* The forward kernel and grid a call with these params would run, written as the
   LONGFLASH_CUDA_FWD value that forces them, e.g. "v3-no-pingpong+persistent", whether or not
   this build compiled the head dim; NULL when the params are invalid (lf_last_error says why).
   No device access. Valid until the next call in this thread. */
LF_API const char* lf_forward_plan(const lf_attention_params* params);

/* The CTA order the backward (v5-v8) would launch with these params: 0 when each head's key
   blocks start in a row, G > 0 when the (sequence, kv head) pairs start in groups of G, key
   block outermost in a group (causal/window calls whose groups' queries fit in L2, or the
   LONGFLASH_CUDA_BWD suffix "+heads" / "+group<G>"); -1 when the params are invalid. No device
   access. */
LF_API int lf_backward_head_group(const lf_attention_params* params);

/* Workspace bytes the call needs (may be 0; then workspace may be NULL). No device access. */
LF_API lf_status lf_attention_forward_workspace_size(const lf_attention_params* params,
                                                     size_t* bytes);
LF_API lf_status lf_attention_backward_workspace_size(const lf_attention_params* params,
                                                      size_t* bytes);

/* out and lse are written in full; lse may be NULL when the caller does not want it. */
LF_API lf_status lf_attention_forward(const lf_attention_params* params, lf_tensor q, lf_tensor k,
                                      lf_tensor v, lf_tensor out, float* lse, void* workspace,
                                      size_t workspace_bytes, void* stream);

/* dq, dk, dv are written in full (dk/dv summed over the query heads that share a kv head). */
LF_API lf_status lf_attention_backward(const lf_attention_params* params, lf_tensor q, lf_tensor k,
                                       lf_tensor v, lf_tensor out, lf_tensor dout,
                                       const float* lse, lf_tensor dq, lf_tensor dk, lf_tensor dv,
                                       void* workspace, size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LONGFLASH_LONGFLASH_H_ */
