// Element types of keys, values and queries, and conversions to and from float32.
// Stateless functions; thread-safe.
#ifndef KVWAVE_CONFIG_DTYPE_H_
#define KVWAVE_CONFIG_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvwave {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Bytes per element: 4 for f32, 2 for f16 and bf16.
constexpr size_t ElementSize(DType t) { return t == DType::kF32 ? 4 : 2; }
absl::string_view DTypeName(DType t);
absl::StatusOr<DType> ParseDType(absl::string_view name);  // "f32", "f16", "bf16"

// Scalar conversions (round-to-nearest-even on the way down).
inline float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t FloatToBf16(float f);
float F16ToFloat(uint16_t h);
uint16_t FloatToF16(float f);

// Bulk conversions of n elements; `src` and `dst` must not overlap. Vectorised (F16C / AVX2).
void ToFloat(const void* src, DType src_type, float* dst, size_t n);
void FromFloat(const float* src, DType dst_type, void* dst, size_t n);

}  // namespace kvwave

#endif  // KVWAVE_CONFIG_DTYPE_H_
