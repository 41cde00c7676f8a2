// dtype codes shared by the Python side (devit_ext/checks.py DTYPE_CODES) and the kernels,
// plus host-side fp16/bf16 <-> fp32 conversions (no torch headers, no intrinsics).
//
// The conversions are bit-exact with torch's (c10/util/Half.h and BFloat16.h use
// the same algorithms): round to nearest even, denormals kept, overflow to inf.
// They rely on IEEE fp32 arithmetic without flush-to-zero and without FMA
// contraction: CMakeLists.txt compiles with -ffp-contract=off and never with
// -ffast-math (which would also link crtfastmath.o and turn on FTZ for the
// whole process).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace devit {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_float_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

inline float f32_from_bits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}

// ---- bfloat16 ------------------------------------------------------------
inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN (what torch returns)
  u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// ---- float16 (IEEE binary16) ---------------------------------------------
// Branch-free algorithms of the FP16 library (Marat Dukhan), as used by c10.
inline float fp16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = f32_from_bits(0x7800000u);  // 2^-112
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return f32_from_bits(result);
}

inline uint16_t f32_to_fp16(float f) {
  const float scale_to_inf = f32_from_bits(0x77800000u);   // 2^112
  const float scale_to_zero = f32_from_bits(0x08800000u);  // 2^-110
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace devit
