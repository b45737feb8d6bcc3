#include "store/segment.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {

Segment::Segment() {
  // Relaxed: the id only has to be unique; the segment is published to other threads by whoever
  // shares its shared_ptr, with that publication's ordering.
  static std::atomic<uint64_t> next_id{1};
  id_ = next_id.fetch_add(1, std::memory_order_relaxed);
}

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
  const int64_t clusters = (n + tokens_per_cluster - 1) / tokens_per_cluster;
  // Every cluster can waste up to page_tokens - 1 padding rows, plus the steady pages.
  const int64_t rows = n + clusters * (page_tokens - 1) + page_tokens;
  return ChargedBytes(rows, n, static_cast<int32_t>(clusters), head_dim, dtype);
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
  seg->page_tokens_ = in.page_tokens;
  seg->row_bytes_ = static_cast<size_t>(in.head_dim) * ElementSize(in.dtype);
  seg->sizes_.assign(in.sizes.begin(), in.sizes.end());
  // Centroids at bf16 precision: what both backends rank by (see Build in segment.h).
  seg->centroids_.resize(in.centroids.size());
  for (size_t i = 0; i < in.centroids.size(); ++i)
    seg->centroids_[i] = Bf16ToFloat(FloatToBf16(in.centroids[i]));

  // Row plan: steady pages, then each cluster's pages.
  seg->cluster_row_.resize(in.num_clusters);
  int64_t row = PagesFor(in.steady_tokens, in.page_tokens) * in.page_tokens;
  for (int32_t c = 0; c < in.num_clusters; ++c) {
    seg->cluster_row_[c] = row;
    row += PagesFor(in.sizes[c], in.page_tokens) * in.page_tokens;
  }
  const int64_t rows = row;
  const int64_t d = in.head_dim;
  const int64_t bytes = ChargedBytes(rows, in.num_tokens, in.num_clusters, in.head_dim, in.dtype);
  if (bytes > reserved.bytes()) {
    return absl::InternalError(
        absl::StrCat("segment needs ", bytes, " bytes, ", reserved.bytes(), " reserved"));
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
  seg->ComputeKeySpreads();
  seg->charge_ = reserved.Split(bytes);
  return std::shared_ptr<const Segment>(std::move(seg));
}

void Segment::ComputeKeySpreads() {
  const int64_t d = head_dim_;
  key_spreads_.assign(num_clusters_, 0.0f);
  std::vector<float> k(d);
  for (int32_t c = 0; c < num_clusters_; ++c) {
    if (sizes_[c] == 0) continue;
    const float* mean = centroids_.data() + c * d;
    double sum = 0;
    for (int32_t i = 0; i < sizes_[c]; ++i) {
      ToFloat(key_row(cluster_row_[c] + i), dtype_, k.data(), d);
      for (int64_t j = 0; j < d; ++j) sum += double{k[j] - mean[j]} * (k[j] - mean[j]);
    }
    // Capped at the largest float: huge finite keys still give a stored variance that loads.
    key_spreads_[c] = static_cast<float>(
        std::min(sum / (double{sizes_[c]} * d), double{std::numeric_limits<float>::max()}));
  }
}

int32_t Segment::cluster_of_row(int64_t r) const {
  auto it = std::upper_bound(cluster_row_.begin(), cluster_row_.end(), r);
  return static_cast<int32_t>(it - cluster_row_.begin()) - 1;
}

int64_t Segment::ChargedBytes(int64_t rows, int32_t num_tokens, int32_t num_clusters,
                              int32_t head_dim, DType dtype) {
  const int64_t d = head_dim;
  const int64_t row_bytes = d * static_cast<int64_t>(ElementSize(dtype));
  return 2 * rows * row_bytes + num_clusters * (2 * d * 4 + 4 + 4 + 8) + rows * 4 +
         int64_t{num_tokens} * 8;
}

namespace {

absl::Status CheckPartsShape(const SegmentParts& p) {
  if (p.num_tokens < 1 || p.steady_tokens < 0 || p.steady_tokens > p.num_tokens || p.head_dim < 1 ||
      p.head_dim > 4096 || p.page_tokens < 1 || p.num_clusters < 0 ||
      p.num_clusters > p.num_tokens || static_cast<uint8_t>(p.dtype) > 2) {
    return absl::InvalidArgumentError("segment parts: bad meta");
  }
  const int64_t cd = int64_t{p.num_clusters} * p.head_dim;
  if (static_cast<int64_t>(p.sizes.size()) != p.num_clusters ||
      static_cast<int64_t>(p.centroids.size()) != cd ||
      static_cast<int64_t>(p.value_sums.size()) != cd ||
      (!p.key_spreads.empty() && static_cast<int64_t>(p.key_spreads.size()) != p.num_clusters)) {
    return absl::InvalidArgumentError("segment parts: cluster arrays do not match the meta");
  }
  for (float x : p.key_spreads) {  // a variance: finite and not negative (NaN fails too)
    if (!(x >= 0.0f && x <= std::numeric_limits<float>::max())) {
      return absl::InvalidArgumentError("segment parts: a key spread that is not a variance");
    }
  }
  int64_t members = 0;
  for (int32_t s : p.sizes) {
    if (s < 0) return absl::InvalidArgumentError("segment parts: negative cluster size");
    members += s;
  }
  if (members != p.num_tokens - p.steady_tokens) {
    return absl::InvalidArgumentError("segment parts: cluster sizes do not add up to the tokens");
  }
  return absl::OkStatus();
}

// Checks token_of_row against the plan; fills row_of_token.
absl::Status CheckPermutation(const SegmentParts& p, const std::vector<int64_t>& cluster_row,
                              std::vector<int64_t>& row_of_token) {
  row_of_token.assign(p.num_tokens, -1);
  const std::vector<int32_t>& tor = p.token_of_row;
  const int64_t steady_rows = PagesFor(p.steady_tokens, p.page_tokens) * p.page_tokens;
  for (int64_t r = 0; r < steady_rows; ++r) {
    const int32_t want = r < p.steady_tokens ? static_cast<int32_t>(r) : -1;
    if (tor[r] != want) return absl::InvalidArgumentError("segment parts: bad steady rows");
    if (want >= 0) row_of_token[want] = r;
  }
  for (int32_t c = 0; c < p.num_clusters; ++c) {
    const int64_t first = cluster_row[c];
    const int64_t end = first + PagesFor(p.sizes[c], p.page_tokens) * p.page_tokens;
    for (int64_t r = first; r < end; ++r) {
      const int32_t t = tor[r];
      if (r >= first + p.sizes[c]) {
        if (t != -1) return absl::InvalidArgumentError("segment parts: token in a padding row");
        continue;
      }
      if (t < p.steady_tokens || t >= p.num_tokens || row_of_token[t] != -1) {
        return absl::InvalidArgumentError(absl::StrCat("segment parts: bad token at row ", r));
      }
      row_of_token[t] = r;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Segment>> Segment::FromParts(SegmentParts p,
                                                                  MemoryCharge& reserved) {
  KVWAVE_RETURN_IF_ERROR(CheckPartsShape(p));
  if (p.pending != nullptr && p.pending->num_clusters() != p.num_clusters) {
    return absl::InvalidArgumentError("segment parts: pending rows of another cluster count");
  }
  std::vector<int64_t> cluster_row(p.num_clusters);
  int64_t row = PagesFor(p.steady_tokens, p.page_tokens) * p.page_tokens;
  for (int32_t c = 0; c < p.num_clusters; ++c) {
    cluster_row[c] = row;
    row += PagesFor(p.sizes[c], p.page_tokens) * p.page_tokens;
  }
  const int64_t rows = row;
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * ElementSize(p.dtype);
  if (static_cast<int64_t>(p.token_of_row.size()) != rows ||
      p.keys.size() != static_cast<size_t>(rows) * row_bytes ||
      p.values.size() != static_cast<size_t>(rows) * row_bytes) {
    return absl::InvalidArgumentError("segment parts: row count does not match the plan");
  }
  std::vector<int64_t> row_of_token;
  KVWAVE_RETURN_IF_ERROR(CheckPermutation(p, cluster_row, row_of_token));
  const int64_t bytes = ChargedBytes(rows, p.num_tokens, p.num_clusters, p.head_dim, p.dtype);
  if (bytes > reserved.bytes()) {
    return absl::InternalError(
        absl::StrCat("segment needs ", bytes, " bytes, ", reserved.bytes(), " reserved"));
  }
  auto seg = std::shared_ptr<Segment>(new Segment());
  seg->first_position_ = p.first_position;
  seg->num_tokens_ = p.num_tokens;
  seg->steady_tokens_ = p.steady_tokens;
  seg->num_clusters_ = p.num_clusters;
  seg->head_dim_ = p.head_dim;
  seg->dtype_ = p.dtype;
  seg->page_tokens_ = p.page_tokens;
  seg->row_bytes_ = row_bytes;
  seg->keys_ = std::move(p.keys);
  seg->values_ = std::move(p.values);
  seg->cluster_row_ = std::move(cluster_row);
  seg->sizes_ = std::move(p.sizes);
  seg->centroids_ = std::move(p.centroids);
  seg->value_sums_ = std::move(p.value_sums);
  seg->token_of_row_ = std::move(p.token_of_row);
  seg->row_of_token_ = std::move(row_of_token);
  seg->charge_ = reserved.Split(bytes);
  if (!p.key_spreads.empty()) {
    seg->key_spreads_ = std::move(p.key_spreads);
  } else if (p.pending == nullptr) {
    seg->ComputeKeySpreads();
  } else {
    seg->key_spreads_.assign(p.num_clusters, 0.0f);  // the rows are not here yet
  }
  if (p.pending != nullptr) {
    p.pending->Bind(seg->keys_.data(), seg->values_.data());
    seg->pending_ = std::move(p.pending);
  }
  return std::shared_ptr<const Segment>(std::move(seg));
}

}  // namespace kvwave::store
