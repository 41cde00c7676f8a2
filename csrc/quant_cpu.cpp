// CPU int8 kernels: OpenMP over rows, fp32 math, explicit 8-lane SIMD through
// GCC/Clang vector extensions (SSE2 baseline; on x86-64 the hot row functions are
// also cloned for AVX2 and picked at load time).
//
// Exactness: quantisation divides by the scale in fp32 (never multiplies by a
// reciprocal) and rounds half to even, so results are bit-identical to the torch
// reference. Rounding uses the 1.5 * 2^23 trick after clamping to [-127, 127]
// (clamp and round commute because +-127 are integers).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "quant.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DEVIT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DEVIT_CLONES
#endif

namespace devit {
namespace {

constexpr float kQMax = 127.0f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + m) - m rounds half to even for |v| < 2^22
constexpr int64_t kSerialElems = 32768;      // below this many elements one thread is faster

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef int8_t vc __attribute__((vector_size(8)));
constexpr int kL = 8;

static inline __attribute__((always_inline)) vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline)) void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) vf vsplat(float s) { return vf{s, s, s, s, s, s, s, s}; }
static inline __attribute__((always_inline)) vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline __attribute__((always_inline)) float hmax(vf v) {
  float m = v[0];
  for (int k = 1; k < kL; ++k) m = v[k] > m ? v[k] : m;
  return m;
}
static inline __attribute__((always_inline)) float hsum(vf v) {  // pairwise, fixed order
  float a = (v[0] + v[4]) + (v[2] + v[6]);
  float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

inline float round_q(float y, float s) {  // scalar twin of the vector code below
  float t = y / s;
  t = t < -kQMax ? -kQMax : t;
  t = t > kQMax ? kQMax : t;
  return (t + kRoundMagic) - kRoundMagic;
}

DEVIT_CLONES float row_amax(const float* v, int64_t n) {
  vf m0 = vsplat(0.f), m1 = vsplat(0.f);
  int64_t i = 0;
  for (; i + 2 * kL <= n; i += 2 * kL) {
    m0 = vmax(vabs(vload(v + i)), m0);
    m1 = vmax(vabs(vload(v + i + kL)), m1);
  }
  for (; i + kL <= n; i += kL) m0 = vmax(vabs(vload(v + i)), m0);
  float m = hmax(vmax(m0, m1));
  for (; i < n; ++i) {
    float a = std::fabs(v[i]);
    m = a > m ? a : m;
  }
  return m;
}

// q[i] = round_half_even(clamp(v[i] / s)), s > 0.
DEVIT_CLONES void row_quantize(const float* v, int64_t n, float s, int8_t* q) {
  const vf vs = vsplat(s), lo = vsplat(-kQMax), hi = vsplat(kQMax), mg = vsplat(kRoundMagic);
  int64_t i = 0;
  for (; i + kL <= n; i += kL) {
    vf t = vload(v + i) / vs;
    t = t < lo ? lo : t;
    t = t > hi ? hi : t;
    t = (t + mg) - mg;
    vc c = __builtin_convertvector(__builtin_convertvector(t, vi), vc);
    std::memcpy(q + i, &c, sizeof c);
  }
  for (; i < n; ++i) q[i] = static_cast<int8_t>(static_cast<int>(round_q(v[i], s)));
}

// LayerNorm of one row into y (fp32), returns max|y|. Two-pass variance.
DEVIT_CLONES float row_layernorm(const float* v, int64_t n, const float* w, const float* b, float eps, float* y) {
  vf s0 = vsplat(0.f), s1 = vsplat(0.f);
  int64_t i = 0;
  for (; i + 2 * kL <= n; i += 2 * kL) {
    s0 += vload(v + i);
    s1 += vload(v + i + kL);
  }
  for (; i + kL <= n; i += kL) s0 += vload(v + i);
  float sum = hsum(s0 + s1);
  for (; i < n; ++i) sum += v[i];
  const float mean = sum / static_cast<float>(n);

  const vf vm = vsplat(mean);
  s0 = vsplat(0.f);
  s1 = vsplat(0.f);
  i = 0;
  for (; i + 2 * kL <= n; i += 2 * kL) {
    vf d0 = vload(v + i) - vm, d1 = vload(v + i + kL) - vm;
    s0 += d0 * d0;
    s1 += d1 * d1;
  }
  for (; i + kL <= n; i += kL) {
    vf d = vload(v + i) - vm;
    s0 += d * d;
  }
  float sq = hsum(s0 + s1);
  for (; i < n; ++i) {
    float d = v[i] - mean;
    sq += d * d;
  }
  const float var = sq / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(var + eps);

  const vf vr = vsplat(rstd);
  vf m0 = vsplat(0.f);
  i = 0;
  for (; i + kL <= n; i += kL) {
    vf t = ((vload(v + i) - vm) * vr) * vload(w + i) + vload(b + i);
    vstore(y + i, t);
    m0 = vmax(vabs(t), m0);
  }
  float amax = hmax(m0);
  for (; i < n; ++i) {
    float t = ((v[i] - mean) * rstd) * w[i] + b[i];
    y[i] = t;
    float a = std::fabs(t);
    amax = a > amax ? a : amax;
  }
  return amax;
}

DEVIT_CLONES void row_dequantize_f32(const int8_t* q, int64_t n, float s, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * s;
}

// Row r of a (rows, cols) view with element strides, as fp32. Returns a pointer
// to the row itself when it already is contiguous fp32, else fills buf.
inline const float* load_row(const void* base, int dtype, int64_t r, int64_t cols, int64_t rs, int64_t cs,
                             float* buf) {
  switch (dtype) {
    case kFloat32: {
      const float* p = static_cast<const float*>(base) + r * rs;
      if (cs == 1) return p;
      for (int64_t i = 0; i < cols; ++i) buf[i] = p[i * cs];
      return buf;
    }
    case kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + r * rs;
      if (cs == 1) {
        for (int64_t i = 0; i < cols; ++i) buf[i] = fp16_to_f32(p[i]);
      } else {
        for (int64_t i = 0; i < cols; ++i) buf[i] = fp16_to_f32(p[i * cs]);
      }
      return buf;
    }
    default: {  // kBFloat16
      const uint16_t* p = static_cast<const uint16_t*>(base) + r * rs;
      if (cs == 1) {
        for (int64_t i = 0; i < cols; ++i) buf[i] = bf16_to_f32(p[i]);
      } else {
        for (int64_t i = 0; i < cols; ++i) buf[i] = bf16_to_f32(p[i * cs]);
      }
      return buf;
    }
  }
}

// A 1-d parameter (weight / bias) as a contiguous fp32 vector; `fill` when absent.
std::vector<float> load_param(const void* p, int dtype, int64_t stride, int64_t n, float fill) {
  std::vector<float> out(static_cast<size_t>(n), fill);
  if (p != nullptr) {
    const float* row = load_row(p, dtype, 0, n, 0, stride, out.data());
    if (row != out.data()) std::memcpy(out.data(), row, static_cast<size_t>(n) * sizeof(float));
  }
  return out;
}

int pick_threads(int nthreads, int64_t rows, int64_t cols) {
#ifdef _OPENMP
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  if (rows * cols < kSerialElems) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, rows)));
#else
  (void)nthreads;
  (void)rows;
  (void)cols;
  return 1;
#endif
}

}  // namespace

void quantize_int8_cpu(const void* x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int8_t* q,
                       float* scale, int nthreads) {
  const int nt = pick_threads(nthreads, rows, cols);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> buf(dtype == kFloat32 && cs == 1 ? 0 : static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* v = load_row(x, dtype, r, cols, rs, cs, buf.data());
      const float s = row_amax(v, cols) / kQMax;
      scale[r] = s;
      if (s > 0.0f) {
        row_quantize(v, cols, s, q + r * cols);
      } else {
        std::memset(q + r * cols, 0, static_cast<size_t>(cols));
      }
    }
  }
}

void dequantize_int8_cpu(const int8_t* q, int64_t rows, int64_t cols, int64_t rs, int64_t cs, const float* scale,
                         int64_t ss, void* out, int out_dtype, int nthreads) {
  const int nt = pick_threads(nthreads, rows, cols);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int8_t> qbuf(cs == 1 ? 0 : static_cast<size_t>(cols));
    std::vector<float> fbuf(out_dtype == kFloat32 ? 0 : static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qr = q + r * rs;
      if (cs != 1) {
        for (int64_t i = 0; i < cols; ++i) qbuf[i] = qr[i * cs];
        qr = qbuf.data();
      }
      const float s = scale[r * ss];
      if (out_dtype == kFloat32) {
        row_dequantize_f32(qr, cols, s, static_cast<float*>(out) + r * cols);
      } else {
        row_dequantize_f32(qr, cols, s, fbuf.data());
        uint16_t* o = static_cast<uint16_t*>(out) + r * cols;
        if (out_dtype == kFloat16) {
          for (int64_t i = 0; i < cols; ++i) o[i] = f32_to_fp16(fbuf[i]);
        } else {
          for (int64_t i = 0; i < cols; ++i) o[i] = f32_to_bf16(fbuf[i]);
        }
      }
    }
  }
}

void layernorm_quantize_int8_cpu(const void* x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                                 const void* weight, int weight_dtype, int64_t weight_stride, const void* bias,
                                 int bias_dtype, int64_t bias_stride, float eps, int8_t* q, float* scale,
                                 int nthreads) {
  // Absent weight / bias become 1 / 0: y * 1 and y + 0 are exact in fp32.
  const std::vector<float> w = load_param(weight, weight_dtype, weight_stride, cols, 1.0f);
  const std::vector<float> b = load_param(bias, bias_dtype, bias_stride, cols, 0.0f);
  const int nt = pick_threads(nthreads, rows, cols);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> buf(dtype == kFloat32 && cs == 1 ? 0 : static_cast<size_t>(cols));
    std::vector<float> y(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* v = load_row(x, dtype, r, cols, rs, cs, buf.data());
      const float amax = row_layernorm(v, cols, w.data(), b.data(), eps, y.data());
      const float s = amax / kQMax;
      scale[r] = s;
      if (s > 0.0f) {
        row_quantize(y.data(), cols, s, q + r * cols);
      } else {
        std::memset(q + r * cols, 0, static_cast<size_t>(cols));
      }
    }
  }
}

}  // namespace devit
