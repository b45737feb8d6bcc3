#include "store/model_shape.h"

#include "absl/strings/str_cat.h"

namespace kvwave::store {

absl::Status Validate(const ModelShape& s) {
  if (s.layers < 1 || s.layers > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("layers = ", s.layers, " not in [1, 1024]"));
  }
  if (s.kv_heads < 1 || s.kv_heads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads = ", s.kv_heads, " not in [1, 1024]"));
  }
  if (s.q_heads < s.kv_heads || s.q_heads % s.kv_heads != 0 || s.q_heads > 8192) {
    return absl::InvalidArgumentError(
        absl::StrCat("q_heads = ", s.q_heads, " is not a multiple of kv_heads = ", s.kv_heads));
  }
  if (s.head_dim < 8 || s.head_dim > 1024 || s.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim = ", s.head_dim, " is not a multiple of 8 in [8, 1024]"));
  }
  if (s.dtype != DType::kF32 && s.dtype != DType::kF16 && s.dtype != DType::kBF16) {
    return absl::InvalidArgumentError("unknown dtype");
  }
  return absl::OkStatus();
}

std::string ToString(const ModelShape& s) {
  return absl::StrCat("layers=", s.layers, " q_heads=", s.q_heads, " kv_heads=", s.kv_heads,
                      " head_dim=", s.head_dim, " dtype=", DTypeName(s.dtype));
}

}  // namespace kvwave::store
