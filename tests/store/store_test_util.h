// Helpers shared by the store tests: random sealed segments and a bit-exact comparison.
#ifndef KVWAVE_TESTS_STORE_STORE_TEST_UTIL_H_
#define KVWAVE_TESTS_STORE_STORE_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "config/dtype.h"
#include "store/host_memory.h"
#include "store/segment.h"

namespace kvwave::store::testing {

struct RandomSegmentSpec {
  int32_t tokens = 100;
  int32_t head_dim = 16;
  int32_t steady = 4;
  int32_t clusters = 7;
  int32_t page_tokens = 8;
  int64_t first_position = 0;
  DType dtype = DType::kF32;
};

// Build's input for float32 rows k, v [n x d] of which tokens [steady, n) are clustered by
// `assignment`; the spans must outlive the input.
inline SegmentInput Float32Input(const std::vector<float>& k, const std::vector<float>& v, int n,
                                 int d, int steady, const std::vector<int32_t>& assignment,
                                 const std::vector<float>& centroids,
                                 const std::vector<int32_t>& sizes) {
  SegmentInput in;
  in.num_tokens = n;
  in.steady_tokens = steady;
  in.head_dim = d;
  in.dtype = DType::kF32;
  in.page_tokens = 8;
  in.keys = reinterpret_cast<const std::byte*>(k.data());
  in.values = reinterpret_cast<const std::byte*>(v.data());
  in.num_clusters = static_cast<int32_t>(sizes.size());
  in.assignment = assignment;
  in.centroids = centroids;
  in.sizes = sizes;
  return in;
}

// A segment of random (never zero) keys and values and a random clustering in which the last
// cluster stays empty. The charge comes from `budget`.
inline std::shared_ptr<const Segment> RandomSegment(const RandomSegmentSpec& spec,
                                                    std::mt19937& rng, MemoryBudget& budget) {
  const int64_t n = spec.tokens, d = spec.head_dim;
  std::normal_distribution<float> normal(0.5f, 1.0f);
  std::vector<float> kf(n * d), vf(n * d);
  for (auto& x : kf) x = normal(rng);
  for (auto& x : vf) x = normal(rng);
  const size_t es = ElementSize(spec.dtype);
  std::vector<std::byte> k(n * d * es), v(n * d * es);
  FromFloat(kf.data(), spec.dtype, k.data(), kf.size());
  FromFloat(vf.data(), spec.dtype, v.data(), vf.size());
  std::vector<int32_t> assignment(n - spec.steady), sizes(spec.clusters, 0);
  std::uniform_int_distribution<int> pick(0, std::max(0, spec.clusters - 2));
  for (auto& a : assignment) ++sizes[a = pick(rng)];
  std::vector<float> centroids(spec.clusters * d);
  for (auto& x : centroids) x = normal(rng);
  SegmentInput in;
  in.first_position = spec.first_position;
  in.num_tokens = spec.tokens;
  in.steady_tokens = spec.steady;
  in.head_dim = spec.head_dim;
  in.dtype = spec.dtype;
  in.page_tokens = spec.page_tokens;
  in.keys = k.data();
  in.values = v.data();
  in.num_clusters = spec.clusters;
  in.assignment = assignment;
  in.centroids = centroids;
  in.sizes = sizes;
  MemoryCharge reserved =
      budget.Reserve(Segment::MaxBytes(spec.tokens, spec.head_dim, spec.dtype, spec.page_tokens, 1))
          .value();
  auto seg = Segment::Build(in, DefaultHostAllocator(), reserved);
  EXPECT_TRUE(seg.ok()) << seg.status();
  return seg.ok() ? *seg : nullptr;
}

// Bit-exact equality of everything a segment holds.
inline void ExpectSameSegment(const Segment& a, const Segment& b) {
  EXPECT_EQ(a.first_position(), b.first_position());
  EXPECT_EQ(a.num_tokens(), b.num_tokens());
  EXPECT_EQ(a.steady_tokens(), b.steady_tokens());
  EXPECT_EQ(a.num_clusters(), b.num_clusters());
  EXPECT_EQ(a.head_dim(), b.head_dim());
  EXPECT_EQ(a.dtype(), b.dtype());
  EXPECT_EQ(a.page_tokens(), b.page_tokens());
  EXPECT_EQ(a.bytes(), b.bytes());
  ASSERT_EQ(a.num_rows(), b.num_rows());
  ASSERT_EQ(a.key_bytes().size(), b.key_bytes().size());
  EXPECT_EQ(std::memcmp(a.key_bytes().data(), b.key_bytes().data(), a.key_bytes().size()), 0);
  EXPECT_EQ(std::memcmp(a.value_bytes().data(), b.value_bytes().data(), a.value_bytes().size()), 0);
  EXPECT_EQ(a.sizes(), b.sizes());
  ASSERT_EQ(a.centroids().size(), b.centroids().size());
  EXPECT_EQ(a.centroids(), b.centroids());  // bit-exact (no NaN in these tests)
  ASSERT_EQ(a.value_sums().size(), b.value_sums().size());
  EXPECT_EQ(a.value_sums(), b.value_sums());
  EXPECT_EQ(a.key_spreads(), b.key_spreads());
  EXPECT_EQ(a.token_of_rows(), b.token_of_rows());
  for (int32_t c = 0; c < a.num_clusters(); ++c) EXPECT_EQ(a.cluster_row(c), b.cluster_row(c));
  for (int32_t t = 0; t < a.num_tokens(); ++t) EXPECT_EQ(a.row_of_token(t), b.row_of_token(t));
}

}  // namespace kvwave::store::testing

#endif  // KVWAVE_TESTS_STORE_STORE_TEST_UTIL_H_
