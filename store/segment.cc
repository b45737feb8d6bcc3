#include "store/segment.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

absl::Status CheckInput(const SegmentInput& in) {
  if (in.num_tokens < 1 || in.steady_tokens < 0 || in.steady_tokens > in.num_tokens ||
      in.head_dim < 1 || in.page_tokens < 1 || in.keys == nullptr || in.values == nullptr) {
    return absl::InvalidArgumentError("segment: bad token counts or null rows");
  }
  int64_t clustered = in.num_tokens - in.steady_tokens;
  if (static_cast<int64_t>(in.assignment.size()) != clustered ||
      static_cast<int64_t>(in.sizes.size()) != in.num_clusters ||
      static_cast<int64_t>(in.centroids.size()) != int64_t{in.num_clusters} * in.head_dim) {
    return absl::InvalidArgumentError("segment: clustering does not match the tokens");
  }
  std::vector<int32_t> counted(in.num_clusters, 0);
  for (int32_t c : in.assignment) {
    if (c < 0 || c >= in.num_clusters) {
      return absl::InvalidArgumentError(absl::StrCat("segment: cluster ", c, " out of range"));
    }
    ++counted[c];
  }
  for (int32_t c = 0; c < in.num_clusters; ++c) {
    if (counted[c] != in.sizes[c]) {
      return absl::InvalidArgumentError(absl::StrCat("segment: size of cluster ", c, " is ",
                                                     in.sizes[c], ", assignment has ", counted[c]));
    }
  }
  return absl::OkStatus();
}

int64_t PagesFor(int64_t n, int32_t page_tokens) { return (n + page_tokens - 1) / page_tokens; }

}  // namespace

int64_t Segment::MaxBytes(int32_t n, int32_t head_dim, DType dtype, int32_t page_tokens,
                          int32_t tokens_per_cluster) {
  int64_t clusters = (n + tokens_per_cluster - 1) / tokens_per_cluster;
  // Every cluster can waste up to page_tokens - 1 padding rows, plus the steady pages.
  int64_t rows = n + clusters * (page_tokens - 1) + page_tokens;
  int64_t row_bytes = int64_t{head_dim} * static_cast<int64_t>(ElementSize(dtype));
  int64_t meta = clusters * (2 * int64_t{head_dim} * 4 + 4 + 8);
  return 2 * rows * row_bytes + meta + rows * 4 + int64_t{n} * 8;
}

absl::StatusOr<std::shared_ptr<const Segment>> Segment::Build(const SegmentInput& in,
                                                              HostAllocator* allocator,
                                                              MemoryCharge& reserved) {
  KVWAVE_RETURN_IF_ERROR(CheckInput(in));
  auto seg = std::shared_ptr<Segment>(new Segment());
  seg->first_position_ = in.first_position;
  seg->num_tokens_ = in.num_tokens;
  seg->steady_tokens_ = in.steady_tokens;
  seg->num_clusters_ = in.num_clusters;
  seg->head_dim_ = in.head_dim;
  seg->dtype_ = in.dtype;
  seg->row_bytes_ = static_cast<size_t>(in.head_dim) * ElementSize(in.dtype);
  seg->sizes_.assign(in.sizes.begin(), in.sizes.end());
  seg->centroids_.assign(in.centroids.begin(), in.centroids.end());

  // Row plan: steady pages, then each cluster's pages.
  seg->cluster_row_.resize(in.num_clusters);
  int64_t row = PagesFor(in.steady_tokens, in.page_tokens) * in.page_tokens;
  for (int32_t c = 0; c < in.num_clusters; ++c) {
    seg->cluster_row_[c] = row;
    row += PagesFor(in.sizes[c], in.page_tokens) * in.page_tokens;
  }
  const int64_t rows = row;
  const int64_t d = in.head_dim;
  int64_t bytes = 2 * rows * static_cast<int64_t>(seg->row_bytes_) +
                  in.num_clusters * (2 * d * 4 + 4 + 8) + rows * 4 + int64_t{in.num_tokens} * 8;
  if (bytes > reserved.bytes()) {
    return absl::InternalError(absl::StrCat("segment needs ", bytes, " bytes, ",
                                            reserved.bytes(), " reserved"));
  }
  KVWAVE_ASSIGN_OR_RETURN(seg->keys_, HostBuffer::Allocate(allocator, rows * seg->row_bytes_));
  KVWAVE_ASSIGN_OR_RETURN(seg->values_, HostBuffer::Allocate(allocator, rows * seg->row_bytes_));
  std::memset(seg->keys_.data(), 0, seg->keys_.size());
  std::memset(seg->values_.data(), 0, seg->values_.size());
  seg->token_of_row_.assign(rows, -1);
  seg->row_of_token_.assign(in.num_tokens, -1);

  auto place = [&](int32_t token, int64_t r) {
    std::memcpy(seg->keys_.data() + r * seg->row_bytes_, in.keys + token * seg->row_bytes_,
                seg->row_bytes_);
    std::memcpy(seg->values_.data() + r * seg->row_bytes_, in.values + token * seg->row_bytes_,
                seg->row_bytes_);
    seg->token_of_row_[r] = token;
    seg->row_of_token_[token] = r;
  };
  for (int32_t t = 0; t < in.steady_tokens; ++t) place(t, t);
  std::vector<int64_t> next(seg->cluster_row_);
  for (size_t i = 0; i < in.assignment.size(); ++i) {
    place(in.steady_tokens + static_cast<int32_t>(i), next[in.assignment[i]]++);
  }

  // Value sums in float32, from the stored rows.
  seg->value_sums_.assign(in.num_clusters * d, 0.0f);
  std::vector<float> v(d);
  for (int32_t c = 0; c < in.num_clusters; ++c) {
    float* sum = seg->value_sums_.data() + c * d;
    for (int32_t i = 0; i < in.sizes[c]; ++i) {
      ToFloat(seg->value_row(seg->cluster_row_[c] + i), in.dtype, v.data(), d);
      for (int64_t j = 0; j < d; ++j) sum[j] += v[j];
    }
  }
  seg->charge_ = reserved.Split(bytes);
  return std::shared_ptr<const Segment>(std::move(seg));
}

}  // namespace kvwave::store
