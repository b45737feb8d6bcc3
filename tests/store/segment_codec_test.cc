#include "store/segment_codec.h"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>

#include "store/host_memory.h"
#include "store/segment.h"
#include "tests/store/store_test_util.h"

namespace kvwave::store {
namespace {

using testing::ExpectSameSegment;
using testing::RandomSegment;
using testing::RandomSegmentSpec;

class SegmentCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed %u\n", seed_);
  }
  std::shared_ptr<const Segment> Decode(const std::string& bytes) {
    auto s = DecodeSegment(bytes, DefaultHostAllocator(), budget_);
    return s.ok() ? *s : nullptr;
  }
  absl::StatusCode DecodeCode(absl::string_view bytes) {
    return DecodeSegment(bytes, DefaultHostAllocator(), budget_).status().code();
  }
  unsigned seed_ = 0;
  std::mt19937 rng_;
  MemoryBudget budget_{int64_t{1} << 32};
};

TEST_F(SegmentCodecTest, RoundTripIsBitExactForEveryDtypeAndLayout) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  const RandomSegmentSpec specs[] = {
      {.tokens = 203,
       .head_dim = 64,
       .steady = 4,
       .clusters = 13,
       .page_tokens = 8,
       .first_position = 0,
       .dtype = DType::kF32},
      {.tokens = 517,
       .head_dim = 128,
       .steady = 0,
       .clusters = 33,
       .page_tokens = 16,
       .first_position = 8192,
       .dtype = DType::kBF16},
      {.tokens = 64,
       .head_dim = 8,
       .steady = 64,
       .clusters = 0,
       .page_tokens = 4,
       .first_position = 0,
       .dtype = DType::kF16},
      {.tokens = 1,
       .head_dim = 8,
       .steady = 0,
       .clusters = 1,
       .page_tokens = 1,
       .first_position = 12345678901,
       .dtype = DType::kF16},
  };
  for (const auto& spec : specs) {
    auto seg = RandomSegment(spec, rng_, budget_);
    ASSERT_NE(seg, nullptr);
    const std::string bytes = EncodeSegment(*seg);
    EXPECT_EQ(bytes.size(), EncodedSegmentSize(*seg));
    EXPECT_TRUE(VerifySegmentRecord(bytes).ok());
    EXPECT_EQ(DecodedSegmentBytes(bytes).value(), seg->bytes());
    const int64_t before = budget_.used();
    auto back = Decode(bytes);
    ASSERT_NE(back, nullptr);
    EXPECT_EQ(budget_.used() - before, back->bytes());  // charged exactly its bytes
    ExpectSameSegment(*seg, *back);
    EXPECT_EQ(EncodeSegment(*back), bytes);  // re-encoding is stable
  }
}

TEST_F(SegmentCodecTest, EveryFlippedByteIsDataLoss) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  auto seg = RandomSegment({.tokens = 150, .head_dim = 16, .clusters = 9}, rng_, budget_);
  const std::string good = EncodeSegment(*seg);
  std::uniform_int_distribution<size_t> where(0, good.size() - 1);
  std::uniform_int_distribution<int> bit(0, 7);
  for (int trial = 0; trial < 500; ++trial) {
    std::string bad = good;
    const size_t at = trial < 64 ? static_cast<size_t>(trial) : where(rng_);  // all of the header
    bad[at] = static_cast<char>(bad[at] ^ (1 << bit(rng_)));
    EXPECT_EQ(DecodeCode(bad), absl::StatusCode::kDataLoss) << "byte " << at;
    EXPECT_EQ(VerifySegmentRecord(bad).code(), absl::StatusCode::kDataLoss) << "byte " << at;
  }
  // Bursts of random bytes.
  for (int trial = 0; trial < 100; ++trial) {
    std::string bad = good;
    const size_t at = where(rng_);
    for (size_t i = at; i < std::min(bad.size(), at + 32); ++i) bad[i] = static_cast<char>(rng_());
    if (bad == good) continue;
    EXPECT_EQ(DecodeCode(bad), absl::StatusCode::kDataLoss);
  }
}

TEST_F(SegmentCodecTest, TruncatedOrExtendedIsDataLoss) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  auto seg = RandomSegment({.tokens = 90, .head_dim = 32, .clusters = 5}, rng_, budget_);
  const std::string good = EncodeSegment(*seg);
  for (size_t len : {size_t{0}, size_t{1}, size_t{47}, size_t{48}, size_t{56}, good.size() - 1,
                     good.size() - 8, good.size() / 2}) {
    EXPECT_EQ(DecodeCode(absl::string_view(good).substr(0, len)), absl::StatusCode::kDataLoss)
        << len;
  }
  std::uniform_int_distribution<size_t> len(0, good.size() - 1);
  for (int trial = 0; trial < 200; ++trial) {
    EXPECT_EQ(DecodeCode(absl::string_view(good).substr(0, len(rng_))),
              absl::StatusCode::kDataLoss);
  }
  EXPECT_EQ(DecodeCode(good + "x"), absl::StatusCode::kDataLoss);
}

TEST_F(SegmentCodecTest, GarbageIsDataLossNeverACrash) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  std::uniform_int_distribution<size_t> len(0, 4096);
  for (int trial = 0; trial < 300; ++trial) {
    std::string junk(len(rng_), '\0');
    for (auto& c : junk) c = static_cast<char>(rng_());
    if (trial % 2 == 0 && junk.size() >= 8) std::memcpy(junk.data(), "KVWS\1\0\0\0", 8);
    TEST_ResealSegment(junk);  // a valid checksum: the structural checks must catch it
    EXPECT_EQ(DecodeCode(junk), absl::StatusCode::kDataLoss);
  }
}

// With a valid checksum, a body that breaks the layout must still be refused.
TEST_F(SegmentCodecTest, ResealedInconsistentBodyIsDataLoss) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  auto seg =
      RandomSegment({.tokens = 120, .head_dim = 8, .steady = 4, .clusters = 6}, rng_, budget_);
  const std::string good = EncodeSegment(*seg);
  const size_t rows = static_cast<size_t>(seg->num_rows());
  const size_t tor = good.size() - 8 - rows * 4;  // token_of_row section
  const size_t sizes = 48 + 2 * rows * 8 * 4 + 6 * 8 * 4;
  auto edit = [&](size_t offset, int32_t value) {
    std::string bad = good;
    std::memcpy(bad.data() + offset, &value, 4);
    TEST_ResealSegment(bad);
    return DecodeCode(bad);
  };
  // A duplicated token: row 10 claims row 9's token.
  EXPECT_EQ(edit(tor + 10 * 4, seg->token_of_row(9)), absl::StatusCode::kDataLoss);
  EXPECT_EQ(edit(tor + 0 * 4, 7), absl::StatusCode::kDataLoss);   // steady row moved
  EXPECT_EQ(edit(tor + 5 * 4, 99), absl::StatusCode::kDataLoss);  // token in a padding row
  EXPECT_EQ(edit(sizes, seg->sizes()[0] + 1), absl::StatusCode::kDataLoss);  // sizes disagree
  EXPECT_EQ(edit(16, 121), absl::StatusCode::kDataLoss);                     // num_tokens
  EXPECT_EQ(edit(4, 3), absl::StatusCode::kDataLoss);                        // version
  const size_t spreads = tor - 6 * 4;  // the key spreads, just before token_of_row
  EXPECT_EQ(edit(spreads, 0x7fc00000), absl::StatusCode::kDataLoss);  // NaN
  EXPECT_EQ(edit(spreads + 4, static_cast<int32_t>(0xbf800000u)),
            absl::StatusCode::kDataLoss);                                 // -1
  EXPECT_EQ(edit(spreads + 8, 0x7f800000), absl::StatusCode::kDataLoss);  // +inf
  // Untouched, resealing changes nothing.
  std::string same = good;
  TEST_ResealSegment(same);
  EXPECT_EQ(same, good);
}

// A version-1 record (written before the key spreads were stored) still decodes, with the spreads
// computed from its rows: the same segment as the version-2 record of it.
TEST_F(SegmentCodecTest, VersionOneRecordDecodesWithSpreadsFromItsRows) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  auto seg = RandomSegment(
      {.tokens = 300, .head_dim = 16, .steady = 4, .clusters = 11, .dtype = DType::kBF16}, rng_,
      budget_);
  const std::string v2 = EncodeSegment(*seg);
  const size_t rows = static_cast<size_t>(seg->num_rows());
  const size_t clusters = static_cast<size_t>(seg->num_clusters());
  const size_t tor = v2.size() - 8 - rows * 4;  // token_of_row; the spreads just before it
  std::string v1 = v2.substr(0, tor - clusters * 4) + v2.substr(tor);
  const uint32_t version = 1;
  std::memcpy(v1.data() + 4, &version, 4);
  TEST_ResealSegment(v1);
  auto old = Decode(v1);
  ASSERT_NE(old, nullptr);
  ExpectSameSegment(*old, *seg);  // key spreads included, bit for bit
  EXPECT_EQ(DecodeCode(v1.substr(0, v1.size() - 1)), absl::StatusCode::kDataLoss);
}

// Keys so large that their variance overflows a float (finite keys, which Append accepts): the
// stored spread is capped at the largest float, so the record still decodes.
TEST_F(SegmentCodecTest, HugeKeysGiveASpreadThatStillDecodes) {
  const int n = 40, d = 8, clusters = 2;
  std::vector<float> k(n * d), v(n * d, 1.0f), centroids(clusters * d, 0.0f);
  for (int i = 0; i < n * d; ++i) k[i] = (i % 2 == 0 ? 3e30f : -3e30f);
  std::vector<int32_t> assignment(n), sizes = {n / 2, n / 2};
  for (int i = 0; i < n; ++i) assignment[i] = i < n / 2 ? 0 : 1;
  MemoryCharge reserved = budget_.Reserve(Segment::MaxBytes(n, d, DType::kF32, 8, 16)).value();
  const SegmentInput in = testing::Float32Input(k, v, n, d, 0, assignment, centroids, sizes);
  auto seg = Segment::Build(in, DefaultHostAllocator(), reserved);
  ASSERT_TRUE(seg.ok()) << seg.status();
  EXPECT_EQ((*seg)->key_spreads()[0], std::numeric_limits<float>::max());
  auto back = Decode(EncodeSegment(**seg));
  ASSERT_NE(back, nullptr);
  ExpectSameSegment(*back, **seg);
}

TEST_F(SegmentCodecTest, DecodeRespectsTheMemoryBudget) {
  auto seg = RandomSegment({.tokens = 100, .head_dim = 16}, rng_, budget_);
  const std::string bytes = EncodeSegment(*seg);
  MemoryBudget small(seg->bytes() - 1);
  EXPECT_EQ(DecodeSegment(bytes, DefaultHostAllocator(), small).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(small.used(), 0);
}

}  // namespace
}  // namespace kvwave::store
