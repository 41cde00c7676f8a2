// int8 feature-transfer kernels: per-row symmetric int8 over the last dimension.
//
// Numerics (defined by devit_ext/ops/reference.py):
//   scale = max|row| / 127 (fp32 division); q = round_half_even(x / scale) (fp32
//   division), clamped to [-127, 127]; scale == 0 gives q = 0. All math in fp32.
//
// Every input is a 2-d view (rows, cols) given by a pointer, a dtype code (see
// dtype.h) and element strides, so non-contiguous inputs need no copy. Outputs
// are contiguous: q (rows, cols) int8, scale (rows) fp32, out (rows, cols).
// The caller guarantees cols >= 1 and valid pointers; rows may be 0.
#pragma once

#include <cstdint>

namespace devit {

// ---- CPU (OpenMP over rows; nthreads <= 0 means the OpenMP default) ----
void quantize_int8_cpu(const void* x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                       int64_t col_stride, int8_t* q, float* scale, int nthreads);

void dequantize_int8_cpu(const int8_t* q, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                         const float* scale, int64_t scale_stride, void* out, int out_dtype, int nthreads);

// weight / bias may be null (then 1 / 0); each has its own dtype code and stride.
void layernorm_quantize_int8_cpu(const void* x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                                 int64_t col_stride, const void* weight, int weight_dtype, int64_t weight_stride,
                                 const void* bias, int bias_dtype, int64_t bias_stride, float eps, int8_t* q,
                                 float* scale, int nthreads);

// ---- CUDA (one launch for all rows, one warp per row; `stream` is a cudaStream_t
//      as an integer, `device` the CUDA device index the pointers live on) ----
bool cuda_compiled();

void quantize_int8_cuda(const void* x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                        int64_t col_stride, int8_t* q, float* scale, int device, intptr_t stream);

void dequantize_int8_cuda(const int8_t* q, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                          const float* scale, int64_t scale_stride, void* out, int out_dtype, int device,
                          intptr_t stream);

void layernorm_quantize_int8_cuda(const void* x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                                  int64_t col_stride, const void* weight, int weight_dtype, int64_t weight_stride,
                                  const void* bias, int bias_dtype, int64_t bias_stride, float eps, int8_t* q,
                                  float* scale, int device, intptr_t stream);

}  // namespace devit
