// Tests of the trace reader: round trips through WriteNpy, and clear errors for malformed,
// truncated and mis-shaped files (written into a fresh temporary directory).
#include "client/trace_file.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvwave::trace {
namespace {

class TraceFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kvwave_trace_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  void WriteRaw(const std::string& name, const std::string& bytes) const {
    std::ofstream(Path(name), std::ios::binary) << bytes;
  }
  // A v1 .npy file with the given header dict and `data_bytes` bytes of payload.
  std::string Npy(const std::string& dict, size_t data_bytes) const {
    std::string header = dict;
    while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
    header.push_back('\n');
    std::string out = "\x93NUMPY";
    out += '\x01';
    out += '\x00';
    out += static_cast<char>(header.size() & 0xff);
    out += static_cast<char>(header.size() >> 8);
    return out + header + std::string(data_bytes, '\x01');
  }
  // Writes PREFIX_{q,k,v}.npy of float32 random data with the given shapes.
  void WriteTrace(const std::string& prefix, std::vector<int64_t> qs, std::vector<int64_t> ks) {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    for (auto [suffix, shape] : {std::pair{"_q.npy", qs}, {"_k.npy", ks}, {"_v.npy", ks}}) {
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      std::vector<float> data(static_cast<size_t>(n));
      for (float& x : data) x = normal(rng) + 0.25f;
      ASSERT_TRUE(WriteNpy(Path(prefix + suffix), DType::kF32, shape, data.data()).ok());
    }
  }

  std::filesystem::path dir_;
};

TEST_F(TraceFileTest, RoundTripsFloat32AndFloat16) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> data(2 * 3 * 5);
  for (float& x : data) x = normal(rng) + 0.5f;
  ASSERT_TRUE(WriteNpy(Path("a.npy"), DType::kF32, {2, 3, 5}, data.data()).ok());
  auto a = NpyArray::Open(Path("a.npy"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape(), (std::vector<int64_t>{2, 3, 5}));
  for (size_t i = 0; i < data.size(); ++i) EXPECT_EQ(a->At(static_cast<int64_t>(i)), data[i]);

  std::vector<uint16_t> half(data.size());
  FromFloat(data.data(), DType::kF16, half.data(), data.size());
  ASSERT_TRUE(WriteNpy(Path("h.npy"), DType::kF16, {30}, half.data()).ok());
  auto h = NpyArray::Open(Path("h.npy"));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->dtype(), DType::kF16);
  std::vector<float> back(data.size());
  h->CopyFloats(0, static_cast<int64_t>(data.size()), back.data());
  for (size_t i = 0; i < data.size(); ++i) {
    EXPECT_NEAR(back[i], data[i], 1e-3 * std::abs(data[i]) + 1e-6);  // f16 relative precision
  }
}

TEST_F(TraceFileTest, OpensAConsistentTraceAndIndexesIt) {
  WriteTrace("t", {2, 7, 4, 8}, {2, 7, 2, 8});
  auto t = Trace::Open(Path("t"));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->layers, 2);
  EXPECT_EQ(t->tokens, 7);
  EXPECT_EQ(t->q_heads, 4);
  EXPECT_EQ(t->kv_heads, 2);
  EXPECT_EQ(t->head_dim, 8);
  EXPECT_EQ(t->QIndex(1, 2, 3), ((1 * 7 + 2) * 4 + 3) * 8);
  EXPECT_EQ(t->KvIndex(1, 6, 1), t->k.size() - 8);
}

TEST_F(TraceFileTest, MissingFileIsNotFound) {
  auto a = NpyArray::Open(Path("nope.npy"));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(a.status().message().find("nope.npy"), std::string::npos);
}

TEST_F(TraceFileTest, MalformedFilesGiveClearErrors) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }";
  struct Case {
    std::string bytes, expect;
  } cases[] = {
      {"\x93NUMP", "too short"},
      {"NOTNUMPYATALL" + std::string(100, ' '), "bad magic"},
      {Npy("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", 16), "unsupported dtype"},
      {Npy("{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }", 16), "Fortran"},
      {Npy("{'descr': '<f4', 'fortran_order': False, 'shape': 4, }", 16), "not a tuple"},
      {Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, x), }", 16), "bad dimension"},
      {Npy("{'descr': '<f4', 'fortran_order': False, }", 16), "does not parse"},
      {Npy(dict, 16).substr(0, 40), "truncated header"},
  };
  int i = 0;
  for (const Case& c : cases) {
    const std::string name = "bad" + std::to_string(i++) + ".npy";
    WriteRaw(name, c.bytes);
    auto a = NpyArray::Open(Path(name));
    ASSERT_FALSE(a.ok()) << name;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
    EXPECT_NE(a.status().message().find(c.expect), std::string::npos) << a.status();
    EXPECT_NE(a.status().message().find(name), std::string::npos) << a.status();
  }
  WriteRaw("ok.npy", Npy(dict, 16));
  EXPECT_TRUE(NpyArray::Open(Path("ok.npy")).ok());
}

TEST_F(TraceFileTest, TruncatedDataIsDataLoss) {
  WriteRaw("short.npy", Npy("{'descr': '<f2', 'fortran_order': False, 'shape': (3, 8), }", 47));
  auto a = NpyArray::Open(Path("short.npy"));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDataLoss) << a.status();
  EXPECT_NE(a.status().message().find("truncated"), std::string::npos);
}

TEST_F(TraceFileTest, MisShapedTracesAreRejected) {
  WriteTrace("three_d", {2, 7, 8}, {2, 7, 1, 8});
  auto a = Trace::Open(Path("three_d"));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(a.status().message().find("4-D"), std::string::npos) << a.status();

  WriteTrace("tokens", {2, 7, 4, 8}, {2, 6, 1, 8});
  auto b = Trace::Open(Path("tokens"));
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("disagree"), std::string::npos) << b.status();

  WriteTrace("group", {2, 7, 3, 8}, {2, 7, 2, 8});
  auto c = Trace::Open(Path("group"));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("multiple"), std::string::npos) << c.status();

  WriteTrace("missing_v", {1, 4, 1, 8}, {1, 4, 1, 8});
  std::filesystem::remove(Path("missing_v_v.npy"));
  EXPECT_EQ(Trace::Open(Path("missing_v")).status().code(), absl::StatusCode::kNotFound);
}

// A shape whose element count overflows int64 wraps the size check in NpyArray::Open (2^61 * 4
// elements of 4 bytes needs 2^65 bytes, computed as 0), so the file opens and At() would read out
// of bounds. Reported to the lead (client/trace_file.cc is not ours); enable once fixed.
TEST_F(TraceFileTest, OverflowingShapeIsRejected) {
  WriteRaw(
      "huge.npy",
      Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2305843009213693952, 4), }", 16));
  EXPECT_FALSE(NpyArray::Open(Path("huge.npy")).ok());
}

}  // namespace
}  // namespace kvwave::trace
