// Tests of the synthetic trace generator's OOD knobs (bench/lib/synth_model.h): the traces are
// deterministic for a seed, and --ood-lowvar moves only the queries, into the keys' directions
// of least variance. Small random models, files under the test's temporary directory.
#include "bench/lib/synth_model.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "bench/lib/linalg.h"
#include "client/trace_file.h"
#include "gtest/gtest.h"

namespace kvwave::bench {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::string TempPrefix(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kvwave_synth_test";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

// Share of sum_j lambda_j (q . e_j)^2 (the variance of q.k over the keys) from the key principal
// directions j >= skip, averaged over the queries of query head 0.
double LowVarianceShare(const trace::Trace& t, int skip) {
  const int d = static_cast<int>(t.head_dim);
  std::vector<float> keys(static_cast<size_t>(t.tokens * d)), q(static_cast<size_t>(d));
  for (int64_t i = 0; i < t.tokens; ++i) t.k.CopyFloats(t.KvIndex(0, i, 0), d, &keys[i * d]);
  const Eigen e = SymmetricEigen(ComputeMoments(keys.data(), t.tokens, d).cov, d);
  double share = 0;
  for (int64_t i = 0; i < t.tokens; ++i) {
    t.q.CopyFloats(t.QIndex(0, i, 0), d, q.data());
    double low = 0, all = 0;
    for (int j = 0; j < d; ++j) {
      double proj = 0;
      for (int c = 0; c < d; ++c) proj += q[c] * e.vectors[c * d + j];
      const double part = std::max(e.values[j], 0.0) * proj * proj;
      all += part;
      if (j >= skip) low += part;
    }
    share += low / all;
  }
  return share / static_cast<double>(t.tokens);
}

TEST(SynthModelTest, DeterministicAndLowVarianceKnobMovesOnlyQueries) {
  SynthShape shape;
  shape.head_dim = 32;
  shape.rank = 4;
  const SynthModel model = DefaultModel(shape, 3);
  const int64_t tokens = 2048;
  const std::string a = TempPrefix("a"), b = TempPrefix("b"), c = TempPrefix("c");
  ASSERT_TRUE(WriteSynthTrace(model, tokens, 1.0, 5, a).ok());
  ASSERT_TRUE(WriteSynthTrace(model, tokens, 1.0, 5, b).ok());
  ASSERT_TRUE(WriteSynthTrace(model, tokens, 1.0, 5, c, /*ood_lowvar=*/3.0, /*spread=*/0.5).ok());
  EXPECT_EQ(Slurp(a + "_q.npy"), Slurp(b + "_q.npy"));  // deterministic for a seed
  EXPECT_EQ(Slurp(a + "_k.npy"), Slurp(b + "_k.npy"));
  EXPECT_EQ(Slurp(a + "_k.npy"), Slurp(c + "_k.npy"));  // the knob leaves keys and values alone
  EXPECT_EQ(Slurp(a + "_v.npy"), Slurp(c + "_v.npy"));
  EXPECT_NE(Slurp(a + "_q.npy"), Slurp(c + "_q.npy"));
  auto plain = trace::Trace::Open(a);
  auto pushed = trace::Trace::Open(c);
  ASSERT_TRUE(plain.ok() && pushed.ok()) << plain.status() << pushed.status();
  const double before = LowVarianceShare(*plain, 16), after = LowVarianceShare(*pushed, 16);
  std::printf("q.k variance share from key PCA dims >= 16: %.3f -> %.3f\n", before, after);
  EXPECT_GT(after, before + 0.2);
}

}  // namespace
}  // namespace kvwave::bench
