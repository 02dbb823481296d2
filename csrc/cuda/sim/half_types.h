// __half and __nv_bfloat16 for the simulator: 16-bit storage and the
// conversions the kernels use, rounded as the device rounds (to nearest even;
// NaN stays NaN). __half goes through the compiler's _Float16, an IEEE
// binary16 implementation independent of this file.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};
using __half_raw = __half;
using __nv_bfloat16_raw = __nv_bfloat16;

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(bits >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
