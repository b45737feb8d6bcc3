// What a client can make the real kvwaved hold or compute on (issue 15, items 10 and 13):
//   - an Open is charged to store.memory_limit_bytes before anything is built: the context's
//     layers and heads and its token ids (RESOURCE_EXHAUSTED past the limit, mem_used in Stats);
//   - keys, values (every dtype) and queries that are not finite are refused with
//     INVALID_ARGUMENT at the call, and change nothing.
#include <cmath>
#include <cstring>
#include <limits>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

int64_t MemUsed(client::Client& c) {
  auto s = c.Stats();
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? s->memory_used_bytes : -1;
}

TEST(OpenChargeTest, ContextSkeletonIsChargedAndRefusedPastTheLimit) {
  auto daemon = StartDaemon({"store.memory_limit_bytes=" + std::to_string(64 << 20)});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  ASSERT_EQ(MemUsed(*c), 0);
  // 1024 x 1024 (layer, KV head) pairs: over 100 MiB of bookkeeping before any token.
  const client::ModelShape huge{1024, 1024, 1024, 8, DType::kBF16};
  auto refused = c->Open({huge, {}, ""});
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_EQ(MemUsed(*c), 0);
  // A smaller one fits, and is charged until it is closed.
  const client::ModelShape big{256, 256, 256, 8, DType::kBF16};  // 65536 pairs
  auto opened = c->Open({big, {}, ""});
  ASSERT_TRUE(opened.ok()) << opened.status();
  const int64_t used = MemUsed(*c);
  EXPECT_GE(used, 65536 * 64) << "the heads of an open context are not charged";
  EXPECT_LE(used, 65536 * 512);
  ASSERT_TRUE(c->Close(opened->id).ok());
  EXPECT_EQ(MemUsed(*c), 0);
}

TEST(OpenChargeTest, TokenIdsAreChargedAndRefusedPastTheLimit) {
  auto daemon = StartDaemon({"store.memory_limit_bytes=" + std::to_string(8 << 20)});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const client::ModelShape shape{2, 2, 1, 64, DType::kF32};
  std::vector<int32_t> ids(4 << 20);  // 16 MiB of token ids
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % 50000);
  auto refused = c->Open({shape, ids, ""});
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_EQ(MemUsed(*c), 0);
  ids.resize(1 << 20);  // 4 MiB fits
  auto opened = c->Open({shape, ids, ""});
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_GE(MemUsed(*c), int64_t{4} << 20) << "token ids held by a context are not charged";
  ASSERT_TRUE(c->Close(opened->id).ok());
  EXPECT_EQ(MemUsed(*c), 0);
}

// Rows of finite values of `dtype`, as raw bytes.
std::vector<std::byte> FiniteRows(DType dtype, size_t elements, uint32_t salt) {
  std::vector<std::byte> out(elements * ElementSize(dtype));
  for (size_t i = 0; i < elements; ++i) {
    const float x = static_cast<float>((i * 37 + salt * 101) % 2001) / 1000.0f - 1.0f;
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &x, 4);
    } else {
      const uint16_t h = dtype == DType::kF16 ? FloatToF16(x) : FloatToBf16(x);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

void Put(std::vector<std::byte>& rows, DType dtype, size_t index, float value) {
  if (dtype == DType::kF32) {
    std::memcpy(rows.data() + 4 * index, &value, 4);
  } else {
    const uint16_t h = dtype == DType::kF16 ? FloatToF16(value) : FloatToBf16(value);
    std::memcpy(rows.data() + 2 * index, &h, 2);
  }
}

class FiniteInputTest : public ::testing::TestWithParam<DType> {};

TEST_P(FiniteInputTest, NonFiniteKeysAndValuesAreRefusedAndChangeNothing) {
  const DType dtype = GetParam();
  constexpr int kDim = 32, kBlock = 64, kRecent = 8;
  auto daemon = StartDaemon({"store.prefill_segment_tokens=" + std::to_string(kBlock),
                             "store.recent_tokens=" + std::to_string(kRecent)});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const client::ModelShape shape{1, 4, 2, kDim, dtype};
  auto opened = c->Open({shape, {}, ""});
  ASSERT_TRUE(opened.ok()) << opened.status();
  const int64_t n = 16;
  const size_t elements = n * shape.kv_heads * kDim;
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity()};
  int64_t appended = 0;
  uint32_t salt = 0;
  for (float value : bad) {
    for (bool in_k : {true, false}) {
      for (size_t at : {size_t{0}, elements / 2 + 3, elements - 1}) {
        std::vector<std::byte> k = FiniteRows(dtype, elements, ++salt);
        std::vector<std::byte> v = FiniteRows(dtype, elements, ++salt);
        Put(in_k ? k : v, dtype, at, value);
        absl::Status s = c->Append(opened->id, 0, n, k, v);
        EXPECT_TRUE(absl::IsInvalidArgument(s)) << s << " value " << value << " at " << at;
        EXPECT_NE(s.message().find("finite"), absl::string_view::npos) << s;
        // A good append right after is accepted.
        Put(in_k ? k : v, dtype, at, 0.5f);
        ASSERT_TRUE(c->Append(opened->id, 0, n, k, v).ok());
        appended += n;
      }
    }
  }
  // The context still seals (a NaN key in a tail used to make every seal fail). Seal waits for
  // the seals the appends queued in the background.
  ASSERT_TRUE(c->Seal(opened->id).ok());
  auto info = c->Info(opened->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens_per_layer[0], appended);  // refused appends added nothing
  EXPECT_GT(info->sealed_segments, 0);
  auto stats = c->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->tokens_appended, appended);
  // Attend over what was sealed stays finite.
  std::vector<float> q(shape.q_heads * kDim, 0.25f), out(q.size()), lse(shape.q_heads);
  ASSERT_TRUE(c->Attend(opened->id, 0, q, {1.0, 0.0}, out, lse).ok());
  for (float x : out) ASSERT_TRUE(std::isfinite(x));
}

TEST_P(FiniteInputTest, NonFiniteQueriesAreRefused) {
  const DType dtype = GetParam();
  constexpr int kDim = 32;
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const client::ModelShape shape{2, 4, 2, kDim, dtype};
  auto opened = c->Open({shape, {}, ""});
  ASSERT_TRUE(opened.ok());
  const int64_t n = 100;
  std::vector<std::byte> k = FiniteRows(dtype, n * 2 * kDim, 1),
                         v = FiniteRows(dtype, n * 2 * kDim, 2);
  ASSERT_TRUE(c->Append(opened->id, 1, n, k, v).ok());
  for (float value :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity()}) {
    for (size_t at : {size_t{0}, size_t{77}, size_t{4 * kDim - 1}}) {
      std::vector<float> q(4 * kDim, 0.1f), out(q.size()), lse(4);
      q[at] = value;
      absl::Status s = c->Attend(opened->id, 1, q, {}, out, lse);
      EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
      std::vector<int64_t> pos(4 * 10);
      std::vector<float> scores(pos.size());
      client::RetrieveOptions ro;
      ro.k = 10;
      s = c->Retrieve(opened->id, 1, q, ro, pos, scores);
      EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
      ro.method = client::RetrieveMethod::kFlat;
      s = c->Retrieve(opened->id, 1, q, ro, pos, scores);
      EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    }
  }
  std::vector<float> q(4 * kDim, 0.1f), out(q.size()), lse(4);
  EXPECT_TRUE(c->Attend(opened->id, 1, q, {}, out, lse).ok());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FiniteInputTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace kvwave::testing
