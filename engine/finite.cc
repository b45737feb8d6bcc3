#include "engine/finite.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvwave::engine {
namespace {

// Elements per chunk: the inner loop has no early exit (so it vectorises); a chunk is small
// enough that finding the culprit afterwards costs nothing, large enough to amortise the test.
constexpr size_t kChunk = 2048;

// Exponent masks: an element is Inf or NaN exactly when all its exponent bits are set.
constexpr uint32_t kF32Exponent = 0x7f800000u;
constexpr uint16_t kF16Exponent = 0x7c00u;
constexpr uint16_t kBf16Exponent = 0x7f80u;

template <typename Bits, Bits kMask>
int64_t FirstWithExponentAllOnes(const std::byte* data, size_t n) {
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t end = std::min(n, begin + kChunk);
    Bits any = 0;
    for (size_t i = begin; i < end; ++i) {
      Bits x;
      std::memcpy(&x, data + i * sizeof(Bits), sizeof(Bits));  // any alignment
      any |= static_cast<Bits>((x & kMask) == kMask);
    }
    if (any == 0) continue;
    for (size_t i = begin; i < end; ++i) {
      Bits x;
      std::memcpy(&x, data + i * sizeof(Bits), sizeof(Bits));
      if ((x & kMask) == kMask) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

absl::Status NonFiniteError(const char* what, int64_t index, float value) {
  return absl::InvalidArgumentError(absl::StrCat(what, "[", index, "] is ",
                                                 std::isnan(value) ? "NaN" : "infinite",
                                                 ": keys, values and queries must be finite"));
}

}  // namespace

int64_t FirstNonFinite(const std::byte* data, size_t n, DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return FirstWithExponentAllOnes<uint32_t, kF32Exponent>(data, n);
    case DType::kF16:
      return FirstWithExponentAllOnes<uint16_t, kF16Exponent>(data, n);
    case DType::kBF16:
      return FirstWithExponentAllOnes<uint16_t, kBf16Exponent>(data, n);
  }
  return -1;
}

absl::Status CheckFinite(const char* what, std::span<const std::byte> data, DType dtype) {
  const size_t size = ElementSize(dtype);
  const int64_t bad = FirstNonFinite(data.data(), data.size() / size, dtype);
  if (bad < 0) return absl::OkStatus();
  // The element may sit at any address (inline tensors do): copy it out before converting.
  alignas(4) std::byte element[4];
  std::memcpy(element, data.data() + bad * size, size);
  float value;
  ToFloat(element, dtype, &value, 1);
  return NonFiniteError(what, bad, value);
}

absl::Status CheckFinite(const char* what, std::span<const float> data) {
  const int64_t bad =
      FirstNonFinite(reinterpret_cast<const std::byte*>(data.data()), data.size(), DType::kF32);
  return bad < 0 ? absl::OkStatus() : NonFiniteError(what, bad, data[bad]);
}

}  // namespace kvwave::engine
