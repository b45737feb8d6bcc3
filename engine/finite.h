// Checks that keys, values and queries hold only finite numbers (no NaN, no +-Inf), per dtype.
//
// A non-finite key poisons everything built from it (k-means centroids, every later seal of the
// context), and a non-finite query makes every score NaN, so the engine refuses them at the call
// with INVALID_ARGUMENT. The checks look only at the exponent bits (all ones = Inf or NaN) with
// branch-free inner loops that the compiler vectorises: a pass over the data at memory speed.
//
// Stateless functions; thread-safe.
#ifndef KVWAVE_ENGINE_FINITE_H_
#define KVWAVE_ENGINE_FINITE_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "config/dtype.h"

namespace kvwave::engine {

// The index of the first non-finite element of `n` elements of `dtype` at `data` (any
// alignment), or -1 when all are finite.
int64_t FirstNonFinite(const std::byte* data, size_t n, DType dtype);

// OK, or INVALID_ARGUMENT naming `what`, the first bad element and its value class.
// REQUIRES: data.size() is a multiple of ElementSize(dtype).
[[nodiscard]] absl::Status CheckFinite(const char* what, std::span<const std::byte> data,
                                       DType dtype);
[[nodiscard]] absl::Status CheckFinite(const char* what, std::span<const float> data);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_FINITE_H_
