// CPU int8 kernels: OpenMP over rows, fp32 math, explicit 8-lane SIMD through
// GCC/Clang vector extensions (SSE2 baseline; on x86-64 the hot row functions are
// also cloned for AVX2 and picked at load time).
//
// Exactness: quantisation divides by the scale in fp32 (never multiplies by a
// reciprocal) and rounds half to even, so results are bit-identical to the torch
// reference. Rounding uses the 1.5 * 2^23 trick after clamping to [-127, 127]
// (clamp and round commute because +-127 are integers).
//
// Non-finite rows follow the reference: the row max propagates NaN (a plain
// `a > m ? a : m` would skip it), so a row with a NaN has scale NaN and a row
// with an Inf scale Inf; only a finite positive scale quantises, every other
// row gets q = 0.
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

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant_cpu.cpp assumes a little-endian CPU (int8 from the low byte of an fp32)"
#endif

namespace devit {
namespace {

constexpr float kQMax = 127.0f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + m) - m rounds half to even for |v| < 2^22
constexpr int64_t kSerialElems = 32768;      // below this many elements one thread is faster

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef int64_t vl __attribute__((vector_size(32)));
typedef int8_t vb __attribute__((vector_size(32)));
constexpr int kL = 8;
constexpr vb kLowBytes = {0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0,
                          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
// index >= 32 selects from the second (zero) operand of __builtin_shuffle
constexpr vb kTopBytes = {32, 32, 32, 0, 32, 32, 32, 1, 32, 32, 32, 2, 32, 32, 32, 3,
                          32, 32, 32, 4, 32, 32, 32, 5, 32, 32, 32, 6, 32, 32, 32, 7};
constexpr vb kLow2Bytes = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29,
                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

static inline __attribute__((always_inline)) vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline)) void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) vf vsplat(float s) { return vf{s, s, s, s, s, s, s, s}; }
static inline __attribute__((always_inline)) vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
// max that propagates NaN from either side: a wins when it is larger or NaN,
// and a NaN in b is kept because no comparison with it is true.
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return (a > b) | (a != a) ? a : b; }
static inline __attribute__((always_inline)) float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
static inline __attribute__((always_inline)) float hmax(vf v) {
  float m = v[0];
  for (int k = 1; k < kL; ++k) m = max_nan(v[k], m);
  return m;
}
// A scale that quantises: finite and positive (false for 0, NaN and Inf).
static inline bool usable_scale(float s) { return s > 0.0f && s <= 3.40282347e+38f; }
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
  for (; i < n; ++i) m = max_nan(std::fabs(v[i]), m);
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
    // t + 1.5 * 2^23 has the bits 0x4B400000 + k for the rounded integer k in
    // [-127, 127]: its low byte is k as int8. Gather the 8 low bytes.
    vb bytes = (vb)(t + mg);
    vb packed = __builtin_shuffle(bytes, kLowBytes);
    std::memcpy(q + i, &packed, kL);
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
    amax = max_nan(std::fabs(t), amax);
  }
  return amax;
}

// Vector twins of f32_to_bf16 / f32_to_fp16 (dtype.h), 8 lanes, result in the low
// 16 bits of each 32-bit lane.
static inline __attribute__((always_inline)) vu vbf16_bits(vf f) {
  const vu u = (vu)f;
  const vu nan = (u & 0x7fffffffu) > 0x7f800000u;
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return nan ? (vu){0x7fc0, 0x7fc0, 0x7fc0, 0x7fc0, 0x7fc0, 0x7fc0, 0x7fc0, 0x7fc0} : r;
}

static inline __attribute__((always_inline)) vu vfp16_bits(vf f) {
  const vf scale_to_inf = vsplat(f32_from_bits(0x77800000u));
  const vf scale_to_zero = vsplat(f32_from_bits(0x08800000u));
  vf base = (vabs(f) * scale_to_inf) * scale_to_zero;
  const vu w = (vu)f;
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  const vu min_bias = bias * 0u + 0x71000000u;
  bias = bias < min_bias ? min_bias : bias;
  base = (vf)((bias >> 1) + 0x07800000u) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu nan = shl1_w > 0xFF000000u;
  return (sign >> 16) | (nan ? (vu){0x7E00, 0x7E00, 0x7E00, 0x7E00, 0x7E00, 0x7E00, 0x7E00, 0x7E00} : nonsign);
}

static inline __attribute__((always_inline)) void vstore_u16(uint16_t* p, vu bits) {
  const vb packed = __builtin_shuffle((vb)bits, kLow2Bytes);
  std::memcpy(p, &packed, 2 * kL);
}

// 8 int8 -> 8 fp32: byte k goes to the top byte of lane k (zeros below), then an
// arithmetic shift sign-extends it (GCC scalarises a direct int8 -> int32 convert).
static inline __attribute__((always_inline)) vf vwiden(const int8_t* p) {
  int64_t bits;
  std::memcpy(&bits, p, sizeof bits);  // one 8-byte load into a register (no store-forwarding stall)
  const vb b = (vb)vl{bits, 0, 0, 0};
  const vb top = __builtin_shuffle(b, vb{}, kTopBytes);
  return __builtin_convertvector((vi)top >> 24, vf);
}

// out[i] = q[i] * s in fp32, stored as out_dtype (round to nearest even).
DEVIT_CLONES void row_dequantize(const int8_t* q, int64_t n, float s, void* out, int out_dtype) {
  const vf vs = vsplat(s);
  int64_t i = 0;
  if (out_dtype == kFloat32) {
    float* o = static_cast<float*>(out);
    for (; i + kL <= n; i += kL) vstore(o + i, vwiden(q + i) * vs);
    for (; i < n; ++i) o[i] = static_cast<float>(q[i]) * s;
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    const bool half = out_dtype == kFloat16;
    if (half) {
      for (; i + kL <= n; i += kL) vstore_u16(o + i, vfp16_bits(vwiden(q + i) * vs));
    } else {
      for (; i + kL <= n; i += kL) vstore_u16(o + i, vbf16_bits(vwiden(q + i) * vs));
    }
    for (; i < n; ++i) {
      const float v = static_cast<float>(q[i]) * s;
      o[i] = half ? f32_to_fp16(v) : f32_to_bf16(v);
    }
  }
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
      if (usable_scale(s)) {
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
    const int64_t osize = dtype_size(out_dtype);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qr = q + r * rs;
      if (cs != 1) {
        for (int64_t i = 0; i < cols; ++i) qbuf[i] = qr[i * cs];
        qr = qbuf.data();
      }
      row_dequantize(qr, cols, scale[r * ss], static_cast<char*>(out) + r * cols * osize, out_dtype);
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
      if (usable_scale(s)) {
        row_quantize(y.data(), cols, s, q + r * cols);
      } else {
        std::memset(q + r * cols, 0, static_cast<size_t>(cols));
      }
    }
  }
}

}  // namespace devit
