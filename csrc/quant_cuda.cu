// CUDA int8 kernels: one launch for all rows, one warp per row (8 rows per
// 256-thread block), fp32 math with explicitly rounded intrinsics (__fdiv_rn,
// __fmul_rn, ...: no FMA contraction, no approximate division), so quantisation
// is bit-identical to the torch reference.
//
// Loads are 16 bytes wide (float4 / 8 halves) when the row is contiguous and
// 16-byte aligned, with a scalar tail; otherwise a strided scalar loop. A row is
// re-read for each pass (amax, then write; LayerNorm: mean, variance, amax,
// write): the later passes hit L1/L2, so DRAM sees one read of x and one write
// of q.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"
#include "quant.h"

namespace devit {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// max that propagates NaN (fmaxf drops it): the reference's amax gives NaN for
// a row holding one, and the row must then dequantise to NaN, not to a finite token.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(__shfl_xor_sync(0xffffffffu, v, o), v);
  return v;
}

// A scale that quantises: finite and positive (false for 0, NaN and Inf: q = 0, as in the reference).
__device__ __forceinline__ bool usable_scale(float s) { return s > 0.0f && s <= 3.40282347e+38f; }

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// q = round_half_even(clamp(y / s, -127, 127)), s > 0
__device__ __forceinline__ int8_t quant1(float y, float s) {
  float t = rintf(__fdiv_rn(y, s));
  t = fminf(fmaxf(t, -127.0f), 127.0f);
  return static_cast<int8_t>(static_cast<int>(t));
}

// Calls f(i, x[i] as fp32) for this lane's elements of a row.
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* xr, int64_t cols, int64_t cs, int lane, F&& f) {
  constexpr int V = 16 / sizeof(T);
  if (cs == 1 && aligned(xr, 16)) {
    const int64_t nv = cols / V;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t c = lane; c < nv; c += 32) {
      const uint4 u = __ldg(xv + c);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < V; ++j) f(c * V + j, to_f32(e[j]));
    }
    for (int64_t i = nv * V + lane; i < cols; i += 32) f(i, to_f32(xr[i]));
  } else {
    for (int64_t i = lane; i < cols; i += 32) f(i, to_f32(xr[i * cs]));
  }
}

// Writes q for this lane's elements: q[i] = quant1(g(i, x[i]), s). Packed int8
// stores (V bytes) when the q row allows it.
template <typename T, typename G>
__device__ __forceinline__ void write_row(const T* xr, int64_t cols, int64_t cs, int lane, float s, int8_t* qr,
                                          G&& g) {
  constexpr int V = 16 / sizeof(T);  // 4 (fp32) or 8 (fp16 / bf16)
  if (cs == 1 && aligned(xr, 16) && aligned(qr, V)) {
    const int64_t nv = cols / V;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t c = lane; c < nv; c += 32) {
      const uint4 u = __ldg(xv + c);
      const T* e = reinterpret_cast<const T*>(&u);
      struct alignas(V) Pack {
        int8_t v[V];
      } p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = quant1(g(c * V + j, to_f32(e[j])), s);
      reinterpret_cast<Pack*>(qr)[c] = p;
    }
    for (int64_t i = nv * V + lane; i < cols; i += 32) qr[i] = quant1(g(i, to_f32(xr[i])), s);
  } else {
    for (int64_t i = lane; i < cols; i += 32) qr[i] = quant1(g(i, to_f32(xr[i * cs])), s);
  }
}

__device__ __forceinline__ void zero_row(int8_t* qr, int64_t cols, int lane) {
  for (int64_t i = lane; i < cols; i += 32) qr[i] = 0;
}

// 6 blocks of 256 threads per SM (<= 42 registers): without the minimum ptxas aims at 8 blocks (32
// registers) and spills 8-16 B around __fdiv_rn's slow-path call (the static check, issue 12); this
// memory-bound kernel keeps 48 of 64 warps resident, enough to cover its 16-byte loads.
template <typename T>
__global__ void __launch_bounds__(kThreads, 6)
    quantize_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                    int8_t* __restrict__ q, float* __restrict__ scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // uniform per warp
  const T* xr = x + row * rs;
  int8_t* qr = q + row * cols;

  float amax = 0.0f;
  bool nan = false;  // fmaxf drops NaN: track it apart (fewer registers than a NaN-propagating max per element)
  for_row(xr, cols, cs, lane, [&](int64_t, float v) {
    amax = fmaxf(amax, fabsf(v));
    nan |= v != v;
  });
  amax = __any_sync(0xffffffffu, nan) ? __int_as_float(0x7fc00000) : warp_max(amax);
  const float s = __fdiv_rn(amax, 127.0f);
  if (lane == 0) scale[row] = s;
  if (usable_scale(s)) {
    write_row(xr, cols, cs, lane, s, qr, [](int64_t, float v) { return v; });
  } else {
    zero_row(qr, cols, lane);
  }
}

__device__ __forceinline__ float load_param(const void* p, int dtype, int64_t stride, int64_t i, float fill) {
  if (p == nullptr) return fill;
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(p)[i * stride];
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i * stride]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i * stride]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    layernorm_quantize_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                              const void* __restrict__ w, int wd, int64_t ws, const void* __restrict__ b, int bd,
                              int64_t bs, float eps, int8_t* __restrict__ q, float* __restrict__ scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * rs;
  int8_t* qr = q + row * cols;
  const float n = static_cast<float>(cols);

  float sum = 0.0f;
  for_row(xr, cols, cs, lane, [&](int64_t, float v) { sum = __fadd_rn(sum, v); });
  const float mean = __fdiv_rn(warp_sum(sum), n);

  float sq = 0.0f;
  for_row(xr, cols, cs, lane, [&](int64_t, float v) {
    const float d = __fsub_rn(v, mean);
    sq = __fadd_rn(sq, __fmul_rn(d, d));
  });
  const float var = __fdiv_rn(warp_sum(sq), n);
  const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(var, eps)));

  auto ln = [&](int64_t i, float v) {
    const float t = __fmul_rn(__fsub_rn(v, mean), rstd);
    return __fadd_rn(__fmul_rn(t, load_param(w, wd, ws, i, 1.0f)), load_param(b, bd, bs, i, 0.0f));
  };
  float amax = 0.0f;
  for_row(xr, cols, cs, lane, [&](int64_t i, float v) { amax = max_nan(fabsf(ln(i, v)), amax); });
  amax = warp_max(amax);
  const float s = __fdiv_rn(amax, 127.0f);
  if (lane == 0) scale[row] = s;
  if (usable_scale(s)) {
    write_row(xr, cols, cs, lane, s, qr, ln);
  } else {
    zero_row(qr, cols, lane);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const int8_t* __restrict__ q, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                      const float* __restrict__ scale, int64_t ss, T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int8_t* qr = q + row * rs;
  T* orow = out + row * cols;
  const float s = scale[row * ss];
  constexpr int V = 8;  // 8 int8 in (8 bytes), 8 T out (16 or 32 bytes)
  struct alignas(V * sizeof(T)) Pack {
    T v[V];
  };
  if (cs == 1 && aligned(qr, V) && aligned(orow, V * sizeof(T))) {
    const int64_t nv = cols / V;
    for (int64_t c = lane; c < nv; c += 32) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(qr) + c);
      const int8_t* e = reinterpret_cast<const int8_t*>(&u);
      Pack p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = from_f32<T>(__fmul_rn(static_cast<float>(e[j]), s));
      reinterpret_cast<Pack*>(orow)[c] = p;
    }
    for (int64_t i = nv * V + lane; i < cols; i += 32) orow[i] = from_f32<T>(__fmul_rn(static_cast<float>(qr[i]), s));
  } else {
    for (int64_t i = lane; i < cols; i += 32)
      orow[i] = from_f32<T>(__fmul_rn(static_cast<float>(qr[i * cs]), s));
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("devit CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the previous device.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != device) check(cudaSetDevice(device), "cudaSetDevice");
    else prev = -1;
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

dim3 grid_for(int64_t rows) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("devit CUDA: too many rows for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

// Calls f(T{}) with T the CUDA element type of a dtype code: the one dtype switch of the launchers.
template <class F>
void with_element_type(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;  // kBFloat16 (validated by the bindings)
  }
}

}  // namespace

bool cuda_compiled() { return true; }

void quantize_int8_cuda(const void* x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int8_t* q,
                        float* scale, int device, intptr_t stream) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  const dim3 grid = grid_for(rows);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_kernel<<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), rows, cols, rs, cs, q, scale);
  });
  check(cudaGetLastError(), "quantize_int8 launch");
}

void dequantize_int8_cuda(const int8_t* q, int64_t rows, int64_t cols, int64_t rs, int64_t cs, const float* scale,
                          int64_t ss, void* out, int out_dtype, int device, intptr_t stream) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  const dim3 grid = grid_for(rows);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  with_element_type(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<<<grid, kThreads, 0, st>>>(q, rows, cols, rs, cs, scale, ss, static_cast<T*>(out));
  });
  check(cudaGetLastError(), "dequantize_int8 launch");
}

void layernorm_quantize_int8_cuda(const void* x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                                  const void* w, int wd, int64_t ws, const void* b, int bd, int64_t bs, float eps,
                                  int8_t* q, float* scale, int device, intptr_t stream) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  const dim3 grid = grid_for(rows);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    layernorm_quantize_kernel<<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), rows, cols, rs, cs, w, wd, ws, b,
                                                         bd, bs, eps, q, scale);
  });
  check(cudaGetLastError(), "layernorm_quantize_int8 launch");
}

}  // namespace devit
