// Differential tests of the CUDA kernels against the CPU reference backend (gpu/attention_cpu.h)
// on fresh random inputs, and recovery from device out-of-memory. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "buffer/pinned_allocator.h"
#include "gpu/attention_cpu.h"
#include "gpu/cuda_backend.h"
#include "index/wave_index.h"

namespace kvwave::gpu {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device"

class CudaKernelsTest : public ::testing::Test {
 public:
  void SetUp() override {
    if (!CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
    auto b = CudaBackend::Create({});
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }
  template <typename T>
  T* Upload(const std::vector<T>& v) {
    auto b = backend_->Allocate(std::max<size_t>(v.size() * sizeof(T), 16));
    EXPECT_TRUE(b.ok()) << b.status();
    EXPECT_TRUE(backend_->Copy(b->data(), v.data(), v.size() * sizeof(T)).ok());
    T* p = b->template as<T>();
    keep_.push_back(std::move(*b));
    return p;
  }
  template <typename T>
  T* Poisoned(size_t n) {  // 0xFF bytes: NaN floats, -1 ints
    auto b = backend_->Allocate(std::max<size_t>(n * sizeof(T), 16));
    EXPECT_TRUE(b.ok()) << b.status();
    EXPECT_TRUE(backend_->Memset(b->data(), 0xFF, n * sizeof(T)).ok());
    T* p = b->template as<T>();
    keep_.push_back(std::move(*b));
    return p;
  }
  template <typename T>
  std::vector<T> Download(const T* p, size_t n) {
    std::vector<T> v(n);
    EXPECT_TRUE(backend_->Copy(v.data(), p, n * sizeof(T)).ok());
    EXPECT_TRUE(backend_->Synchronize().ok());
    return v;
  }
  std::vector<float> Random(size_t n, float sd = 1.f) {
    std::normal_distribution<float> dist(0.f, sd);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng_);
    return v;
  }
  // Random bf16 K/V pages of 1..kMaxPageRows rows of d, num_pages[h] for head h, on the device;
  // offsets (heads + 1) into the returned list.
  std::vector<PageRef> RandomPages(const std::vector<int>& num_pages, int d,
                                   std::vector<int32_t>* offsets) {
    std::vector<PageRef> pages;
    *offsets = {0};
    for (int n : num_pages) {
      for (int p = 0; p < n; ++p) {
        const int rows = 1 + int(rng_() % kMaxPageRows);
        std::vector<float> kv = Random(2 * rows * d);
        std::vector<uint16_t> bits(2 * rows * d);
        FromFloat(kv.data(), DType::kBF16, bits.data(), bits.size());
        const uint16_t* dev = Upload(bits);
        pages.push_back({dev, dev + rows * d, rows, 0});
      }
      offsets->push_back(static_cast<int32_t>(pages.size()));
    }
    return pages;
  }
  // ExactAttention of random queries over those pages; out and lse poisoned.
  ExactArgs ExactOver(const std::vector<PageRef>& pages, const std::vector<int32_t>& offsets, int g,
                      int d, int64_t max_pages_per_head, int pages_per_split) {
    const int heads = static_cast<int>(offsets.size()) - 1;
    ExactArgs a;
    a.q = Upload(Random(heads * g * d));
    a.heads = heads;
    a.g = g;
    a.d = d;
    a.scale = 1.0f / std::sqrt(float(d));
    a.pages = Upload(pages);
    a.page_offsets = Upload(offsets);
    a.max_pages_per_head = max_pages_per_head;
    a.pages_per_split = pages_per_split;
    a.out = Poisoned<float>(heads * g * d);
    a.lse = Poisoned<float>(heads * g);
    return a;
  }
  std::unique_ptr<CudaBackend> backend_;
  std::vector<DeviceBuffer> keep_;
  std::mt19937 rng_{std::random_device{}()};
};

double RelErr(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Runs exact attention over `heads` heads of random pages (rows 1..8) vs the CPU backend.
void CheckExact(CudaKernelsTest* t, std::mt19937& rng, int d, int g, DType type, bool pinned,
                std::vector<DeviceBuffer>& keep, CudaBackend* backend,
                const std::function<std::vector<float>(size_t)>& random, int pages_per_split = 16) {
  const int heads = 3;
  const size_t row = d * ElementSize(type);
  std::vector<int> num_pages = {0, 1 + int(rng() % 5), 40 + int(rng() % 300)};
  std::vector<PageRef> pages;
  std::vector<int32_t> offsets = {0};
  std::vector<std::vector<cpu::KvSpan>> spans(heads);
  std::vector<store::HostBuffer> host;  // pinned pages (kept alive)
  std::vector<std::vector<uint16_t>> cpu_rows;
  for (int h = 0; h < heads; ++h) {
    for (int p = 0; p < num_pages[h]; ++p) {
      const int rows = 1 + int(rng() % kMaxPageRows);
      std::vector<float> kv = random(2 * rows * d);
      std::vector<uint16_t> bits(2 * rows * d);
      FromFloat(kv.data(), type, bits.data(), bits.size());
      cpu_rows.push_back(std::move(bits));
      const auto& b = cpu_rows.back();
      spans[h].push_back({b.data(), b.data() + rows * d, rows});
      const void *k, *v;
      if (pinned) {
        auto hb = store::HostBuffer::Allocate(buffer::PinnedAllocator(), 2 * rows * row);
        ASSERT_TRUE(hb.ok()) << hb.status();
        std::memcpy(hb->data(), b.data(), 2 * rows * row);
        k = hb->data();
        v = hb->data() + rows * row;
        host.push_back(std::move(*hb));
      } else {
        auto db = backend->Allocate(2 * rows * row);
        ASSERT_TRUE(db.ok());
        ASSERT_TRUE(backend->Copy(db->data(), b.data(), 2 * rows * row).ok());
        k = db->data();
        v = db->as<std::byte>() + rows * row;
        keep.push_back(std::move(*db));
      }
      pages.push_back({k, v, rows, 0});
    }
    offsets.push_back(static_cast<int32_t>(pages.size()));
  }
  std::vector<float> q = random(heads * g * d);
  ExactArgs a;
  a.q = t->Upload(q);
  a.heads = heads;
  a.g = g;
  a.d = d;
  a.scale = 1.0f / std::sqrt(float(d));
  a.kv_type = type;
  a.pages = t->Upload(pages);
  a.page_offsets = t->Upload(offsets);
  a.max_pages_per_head = *std::max_element(num_pages.begin(), num_pages.end());
  a.pages_per_split = pages_per_split;  // several splits (2: more than one fold chunk of 64)
  a.out = t->Poisoned<float>(heads * g * d);
  a.lse = t->Poisoned<float>(heads * g);
  uint16_t* stash_k = nullptr;
  uint16_t* stash_v = nullptr;
  if (pinned) {  // the wave buffer's miss path: (begin, count) lists, rows stashed as read
    std::vector<int32_t> counts;
    for (int h = 0; h < heads; ++h) counts.push_back(offsets[h + 1] - offsets[h]);
    a.page_counts = t->Upload(counts);
    for (size_t i = 0; i < pages.size(); ++i) pages[i].stash = static_cast<int32_t>(i) + 1;
    a.pages = t->Upload(pages);
    stash_k = t->Poisoned<uint16_t>(pages.size() * kMaxPageRows * d);
    stash_v = t->Poisoned<uint16_t>(pages.size() * kMaxPageRows * d);
    a.stash_k = stash_k;
    a.stash_v = stash_v;
  }
  ASSERT_TRUE(backend->ExactAttention(a).ok());
  auto out = t->Download(a.out, heads * g * d);
  auto lse = t->Download(a.lse, heads * g);
  if (pinned) {
    auto sk = t->Download(stash_k, pages.size() * kMaxPageRows * d);
    auto sv = t->Download(stash_v, pages.size() * kMaxPageRows * d);
    for (size_t i = 0; i < pages.size(); ++i) {
      const int rows = pages[i].rows;
      const uint16_t* src = cpu_rows[i].data();
      EXPECT_EQ(std::memcmp(sk.data() + i * kMaxPageRows * d, src, rows * row), 0) << "page " << i;
      EXPECT_EQ(std::memcmp(sv.data() + i * kMaxPageRows * d, src + rows * d, rows * row), 0)
          << "page " << i;
    }
  }
  for (int h = 0; h < heads; ++h) {
    std::vector<float> ref(g * d), ref_lse(g);
    ASSERT_TRUE(cpu::ExactAttention(q.data() + h * g * d, g, d, a.scale, type, spans[h], ref.data(),
                                    ref_lse.data())
                    .ok());
    if (num_pages[h] == 0) {
      for (int j = 0; j < g; ++j) EXPECT_EQ(lse[h * g + j], -INFINITY);
      for (int i = 0; i < g * d; ++i) EXPECT_EQ(out[h * g * d + i], 0.f);
      continue;
    }
    EXPECT_LT(RelErr(out.data() + h * g * d, ref.data(), g * d), 1e-5)
        << "d=" << d << " g=" << g << " head " << h << " pinned " << pinned;
    for (int j = 0; j < g; ++j)
      EXPECT_NEAR(lse[h * g + j], ref_lse[j], 1e-4 * (1 + std::abs(ref_lse[j])));
  }
}

TEST_F(CudaKernelsTest, ExactAttentionMatchesCpu) {
  auto random = [this](size_t n) { return Random(n); };
  for (int d : {64, 128})
    for (int g : {1, 2, 4, 8})
      for (DType type : {DType::kBF16, DType::kF16})
        for (int pps : {16, 2})
          CheckExact(this, rng_, d, g, type, false, keep_, backend_.get(), random, pps);
}

TEST_F(CudaKernelsTest, ExactAttentionReadsPinnedHostZeroCopy) {
  auto random = [this](size_t n) { return Random(n); };
  CheckExact(this, rng_, 128, 4, DType::kBF16, true, keep_, backend_.get(), random);
  CheckExact(this, rng_, 64, 8, DType::kF16, true, keep_, backend_.get(), random);
}

TEST_F(CudaKernelsTest, ExactAttentionRejectsUnsupportedShape) {
  ExactArgs a;
  a.d = 96;
  a.g = 4;
  EXPECT_EQ(backend_->ExactAttention(a).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaKernelsTest, ScoreClustersMatchesCpu) {
  // Small n: a block per 64 centroids; large n: many blocks a head. bf16: the logits read a bf16
  // copy of the centroids, which the reference gets rounded the same way.
  for (auto [g, d, big, bf16] : {std::tuple{1, 128, false, false},
                                 {4, 128, false, false},
                                 {8, 128, false, false},
                                 {4, 64, false, false},
                                 {8, 64, false, false},
                                 {4, 128, true, false},
                                 {8, 64, true, false},
                                 {1, 128, true, false},
                                 {4, 128, false, true},
                                 {8, 64, false, true},
                                 {4, 128, true, true}}) {
    const int heads = 3;
    const int64_t n = big ? 40000 + rng_() % 3000 : 1000 + rng_() % 3000;
    std::vector<float> q = Random(heads * g * d), cen = Random(heads * n * d, 0.3f);
    std::vector<uint16_t> cen16(bf16 ? cen.size() : 0);
    if (bf16) {
      FromFloat(cen.data(), DType::kBF16, cen16.data(), cen.size());
      for (size_t i = 0; i < cen.size(); ++i) cen[i] = Bf16ToFloat(cen16[i]);
    }
    std::vector<int32_t> sizes(heads * n);
    for (auto& s : sizes) s = (rng_() % 7 == 0) ? 0 : 1 + int(rng_() % 30);
    ScoreArgs a;
    a.q = Upload(q);
    a.heads = heads;
    a.g = g;
    a.d = d;
    a.scale = 1.0f / std::sqrt(float(d));
    a.centroids = bf16 ? Poisoned<float>(1) : Upload(cen);
    if (bf16) a.centroids_bf16 = Upload(cen16);
    a.centroid_stride = n * d;
    a.sizes = Upload(sizes);
    a.size_stride = n;
    a.n = n;
    a.scores = Poisoned<float>(heads * n);
    a.score_stride = n;
    ASSERT_TRUE(backend_->ScoreClusters(a).ok());
    auto got = Download(a.scores, heads * n);
    for (int h = 0; h < heads; ++h) {
      std::vector<float> logits(g * n), ref(n);
      cpu::CentroidLogits(q.data() + h * g * d, g, d, a.scale, cen.data() + h * n * d, n,
                          logits.data());
      cpu::GroupSoftmaxSum(logits.data(), g, n, sizes.data() + h * n, ref.data());
      for (int64_t j = 0; j < n; ++j) {
        const float x = got[h * n + j];
        if (std::isinf(ref[j])) {
          EXPECT_EQ(x, ref[j]);
        } else {
          ASSERT_NEAR(x, ref[j], 1e-5 * std::abs(ref[j]) + 1e-9)
              << "g " << g << " d " << d << " j " << j << " bf16 " << bf16;
        }
      }
    }
  }
}

TEST_F(CudaKernelsTest, SelectTopKMatchesCpu) {
  // Ties and empties, then distinct values (the radix select stops early on those), with and
  // without the second list.
  for (auto [n, ties, two] : {std::tuple{int64_t{1}, true, true},
                              {37, true, true},
                              {5000, true, true},
                              {70000, true, true},
                              {8192, false, true},
                              {8192, false, false},
                              {5000, true, false},
                              {300, false, false}}) {
    const int heads = 4;
    std::vector<float> scores(heads * n);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    for (auto& s : scores) {
      const uint32_t r = rng_() % 20;
      s = ties && r == 0 ? -INFINITY : (ties && r == 1 ? 0.5f : u(rng_));
    }
    const int64_t k = std::max<int64_t>(1, n / 50), k2 = k + n / 5;
    TopKArgs a;
    a.scores = Upload(scores);
    a.heads = heads;
    a.n = n;
    a.score_stride = n;
    a.k = k;
    a.k2 = k2;
    a.out = Poisoned<int32_t>(heads * std::max(k, k2));
    int32_t* out2_dev = Poisoned<int32_t>(heads * std::max(k, k2));
    a.out2 = two ? out2_dev : nullptr;
    a.out_stride = std::max(k, k2);
    a.counts = Poisoned<int32_t>(heads);
    a.counts2 = Poisoned<int32_t>(heads);
    ASSERT_TRUE(backend_->SelectTopK(a).ok());
    auto out = Download(a.out, heads * a.out_stride),
         out2 = Download(out2_dev, heads * a.out_stride);
    auto counts = Download(a.counts, heads), counts2 = Download(a.counts2, heads);
    for (int h = 0; h < heads; ++h) {
      std::vector<int32_t> ref(k2);
      const int64_t got = cpu::TopK(scores.data() + h * n, n, k2, ref.data());
      const int64_t c1 = std::min(k, got);
      ASSERT_EQ(counts[h], c1) << "n " << n;
      if (!two) {  // no second list: count 0, out2 untouched
        EXPECT_EQ(counts2[h], 0);
        for (int64_t i = 0; i < a.out_stride; ++i) ASSERT_EQ(out2[h * a.out_stride + i], -1);
      } else {
        ASSERT_EQ(counts2[h], got - c1);
      }
      std::set<int32_t> want1(ref.begin(), ref.begin() + c1),
          want2(ref.begin() + c1, ref.begin() + got);
      std::vector<int32_t> g1(out.begin() + h * a.out_stride, out.begin() + h * a.out_stride + c1);
      std::vector<int32_t> g2(out2.begin() + h * a.out_stride,
                              out2.begin() + h * a.out_stride + (got - c1));
      EXPECT_TRUE(std::is_sorted(g1.begin(), g1.end()));
      EXPECT_EQ(std::set<int32_t>(g1.begin(), g1.end()), want1) << "n " << n << " head " << h;
      if (two)
        EXPECT_EQ(std::set<int32_t>(g2.begin(), g2.end()), want2) << "n " << n << " head " << h;
    }
  }
}

// The wave buffer's fused op against the three ops it replaces, on random centroids and a random
// cache table: the same scores, lists, counts, page list and record, bit for bit.
TEST_F(CudaKernelsTest, ScoreSelectPlanMatchesSeparateOps) {
  // bf16: scored from a bf16 copy of the centroids, as the wave buffer does (the fused form is
  // then one launch, a cluster of blocks per head); else from float32 (logits kernel + select).
  for (auto [g, d, n, two, bf16] : {std::tuple{4, 128, int64_t{8192}, true, true},
                                    {4, 128, int64_t{8192}, true, false},
                                    {8, 64, 3000, true, true},
                                    {8, 64, 3000, true, false},
                                    {1, 128, 50000, true, false},
                                    {1, 128, 20000, false, true},
                                    {2, 64, 700, true, true},
                                    {4, 128, 40000, false, false},
                                    {4, 128, 40000, true, true},
                                    {4, 128, 5, true, true},
                                    {4, 128, 5, true, false}}) {
    const int heads = 3, P = 2;
    const int64_t k = std::max<int64_t>(1, n / 40), k2 = k + n / 4;
    std::vector<float> q = Random(heads * g * d), cen = Random(heads * n * d, 0.3f);
    std::vector<int32_t> sizes(heads * n), table(heads * n * P, -1), steady(heads);
    std::vector<int64_t> row(heads * n);
    int32_t slot = 0;
    for (int h = 0; h < heads; ++h) {
      int64_t r = 0;
      steady[h] = int32_t(rng_() % 70);
      for (int64_t c = 0; c < n; ++c) {
        const int64_t uc = h * n + c;
        sizes[uc] = (rng_() % 9 == 0) ? 0 : 1 + int(rng_() % (P * kMaxPageRows));
        row[uc] = r;
        r += (sizes[uc] + kMaxPageRows - 1) / kMaxPageRows * kMaxPageRows;
        if (sizes[uc] > 0 && rng_() % 2 == 0)
          for (int p = 0; p < (sizes[uc] + kMaxPageRows - 1) / kMaxPageRows; ++p)
            table[uc * P + p] = slot++;
      }
    }
    // The plan only computes addresses: distinct fake bases are enough to compare them. Key of
    // head h's cluster c: h*n + c, its pages' table entries from key*P.
    std::vector<const void*> host(2 * heads);
    for (int i = 0; i < 2 * heads; ++i)
      host[i] = reinterpret_cast<const void*>(uintptr_t{1} << 40 | uintptr_t(i) << 32);
    std::vector<int32_t> keys(heads * n);
    std::vector<int64_t> page_base(heads * n);
    std::vector<const void*> key_k(heads * n), key_v(heads * n);
    for (int h = 0; h < heads; ++h) {
      for (int64_t c = 0; c < n; ++c) {
        const int64_t uc = h * n + c;
        keys[uc] = static_cast<int32_t>(uc);
        page_base[uc] = uc * P;
        key_k[uc] = static_cast<const char*>(host[h]) + row[uc] * 2 * d;
        key_v[uc] = static_cast<const char*>(host[heads + h]) + row[uc] * 2 * d;
      }
    }
    std::vector<SteadyZone> zones(heads);
    for (int h = 0; h < heads; ++h) {
      zones[h].sink_k = reinterpret_cast<const void*>(uintptr_t{11} << 40 | uintptr_t(h) << 32);
      zones[h].sink_v = reinterpret_cast<const void*>(uintptr_t{13} << 40 | uintptr_t(h) << 32);
      zones[h].ring_k = reinterpret_cast<const void*>(uintptr_t{3} << 40 | uintptr_t(h) << 32);
      zones[h].ring_v = reinterpret_cast<const void*>(uintptr_t{5} << 40 | uintptr_t(h) << 32);
      zones[h].sink_rows = int32_t(rng_() % 6);
      zones[h].ring_rows = 80;
      zones[h].rows = steady[h];
      zones[h].first = int64_t(rng_() % 1000);
    }
    ScoreArgs sc;
    sc.q = Upload(q);
    sc.heads = heads;
    sc.g = g;
    sc.d = d;
    sc.scale = 1.0f / std::sqrt(float(d));
    sc.centroids = Upload(cen);
    if (bf16) {
      std::vector<uint16_t> cen16(cen.size());
      FromFloat(cen.data(), DType::kBF16, cen16.data(), cen.size());
      sc.centroids_bf16 = Upload(cen16);
    }
    sc.centroid_stride = n * d;
    sc.sizes = Upload(sizes);
    sc.size_stride = n;
    sc.n = n;
    sc.score_stride = n;
    const int64_t max_pages = k * P + 12;
    struct Out {
      float* scores;
      int32_t *ret, *est, *counts, *counts2, *page_counts;
      PageRef* pages;
    };
    // publish: the plan also writes the record (counts, info) to pinned host memory and sets
    // the pages_ready words (PlanArgs::record_counts ..., the wave buffer's chained mode).
    std::vector<store::HostBuffer> host_bufs;
    uint32_t* pages_ready = Upload(std::vector<uint32_t>(heads, 0));
    const uint32_t seq = 41;
    auto run = [&](bool fused, bool publish = false) {
      Out o{Poisoned<float>(heads * n),
            Poisoned<int32_t>(heads * k2),
            Poisoned<int32_t>(heads * k2),
            Poisoned<int32_t>(heads + 2 * heads * k),
            Poisoned<int32_t>(heads),
            Poisoned<int32_t>(heads),
            Poisoned<PageRef>(heads * max_pages)};
      ScoreArgs a = sc;
      a.scores = o.scores;
      TopKArgs t;
      t.scores = o.scores;
      t.heads = heads;
      t.n = n;
      t.score_stride = n;
      t.k = k;
      t.k2 = k2;
      t.out = o.ret;
      t.out2 = two ? o.est : nullptr;
      t.out_stride = k2;
      t.counts = o.counts;
      t.counts2 = two ? o.counts2 : nullptr;
      PlanArgs pl;
      pl.heads = heads;
      pl.retrieved = o.ret;
      pl.counts = o.counts;
      pl.list_stride = k2;
      pl.table = Upload(table);
      pl.sizes = sc.sizes;
      pl.size_stride = n;
      pl.keys = Upload(keys);
      pl.key_stride = n;
      pl.page_base = Upload(page_base);
      pl.key_k = Upload(key_k);
      pl.key_v = Upload(key_v);
      pl.steady = Upload(zones);
      pl.exec_stride = k * P;
      pl.pool_k = reinterpret_cast<const void*>(uintptr_t{7} << 40);
      pl.pool_v = reinterpret_cast<const void*>(uintptr_t{9} << 40);
      pl.row_bytes = 2 * d;
      pl.max_pages_per_head = max_pages;
      pl.pages = o.pages;
      pl.page_counts = o.page_counts;
      pl.info = o.counts + heads;
      pl.info_stride = k;
      if (publish) {
        const size_t bytes = sizeof(int32_t) * (heads + 2 * heads * k);
        auto hb = store::HostBuffer::Allocate(buffer::PinnedAllocator(), bytes);
        EXPECT_TRUE(hb.ok()) << hb.status();
        std::memset(hb->data(), 0xFF, bytes);
        host_bufs.push_back(std::move(*hb));
        pl.record_counts = reinterpret_cast<int32_t*>(host_bufs[0].data());
        pl.info = pl.record_counts + heads;
        pl.pages_ready = pages_ready;
        pl.seq = seq;
      }
      if (fused) {
        EXPECT_TRUE(backend_->ScoreSelectPlan(a, t, pl).ok());
      } else {
        EXPECT_TRUE(backend_->ScoreClusters(a).ok());
        EXPECT_TRUE(backend_->SelectTopK(t).ok());
        EXPECT_TRUE(backend_->PlanPages(pl).ok());
      }
      return o;
    };
    const Out x = run(false), y = run(true), z = run(true, true);
    auto bytes_equal = [&](const void* a, const void* b, size_t n_bytes) {
      auto va = Download(static_cast<const uint8_t*>(a), n_bytes);
      auto vb = Download(static_cast<const uint8_t*>(b), n_bytes);
      return va == vb;
    };
    const std::string where = "g " + std::to_string(g) + " d " + std::to_string(d) + " n " +
                              std::to_string(n) + (two ? " two lists" : " one list") +
                              (bf16 ? " bf16" : "");
    // With bf16 centroids the fused form may be one launch that folds the softmax statistics in
    // another order: scores agree to rounding, the lists and pages exactly.
    {
      auto sx = Download(x.scores, heads * n), sy = Download(y.scores, heads * n);
      for (int64_t i = 0; i < heads * n; ++i) {
        if (std::isinf(sx[i])) {
          ASSERT_EQ(sx[i], sy[i]) << where << " score " << i;
        } else {
          ASSERT_NEAR(sx[i], sy[i], 2e-6f * std::abs(sx[i]) + 1e-12f) << where << " score " << i;
        }
      }
    }
    auto counts = Download(x.counts, heads);
    EXPECT_TRUE(bytes_equal(x.counts, y.counts, sizeof(int32_t) * (heads + 2 * heads * k)))
        << where;  // counts, then the (cluster, exec page) record
    EXPECT_TRUE(bytes_equal(x.ret, y.ret, sizeof(int32_t) * heads * k2)) << where;
    {  // the published record and words
      auto rec = Download(x.counts, heads + 2 * heads * k);
      EXPECT_EQ(std::memcmp(host_bufs[0].data(), rec.data(), sizeof(int32_t) * rec.size()), 0)
          << where;
      for (uint32_t w : Download(pages_ready, heads)) EXPECT_EQ(w, seq) << where;
      EXPECT_TRUE(bytes_equal(x.pages, z.pages, sizeof(PageRef) * heads * max_pages)) << where;
    }
    EXPECT_TRUE(bytes_equal(x.est, y.est, sizeof(int32_t) * heads * k2)) << where;
    EXPECT_TRUE(bytes_equal(x.counts2, y.counts2, sizeof(int32_t) * heads)) << where;
    auto counts2 = Download(x.counts2, heads);
    auto pc = Download(x.page_counts, heads);
    EXPECT_TRUE(bytes_equal(x.page_counts, y.page_counts, sizeof(int32_t) * heads)) << where;
    for (int h = 0; h < heads; ++h) {
      const int64_t valid = std::count_if(sizes.begin() + h * n, sizes.begin() + (h + 1) * n,
                                          [](int32_t x) { return x > 0; });
      EXPECT_EQ(counts[h], std::min(k, valid)) << where;
      if (two) EXPECT_EQ(counts2[h], std::min(k2, valid) - std::min(k, valid)) << where;
      EXPECT_GT(pc[h], 0) << where;
      EXPECT_TRUE(
          bytes_equal(x.pages + h * max_pages, y.pages + h * max_pages, sizeof(PageRef) * pc[h]))
          << where << " head " << h;
    }
  }
}

TEST_F(CudaKernelsTest, ScoreSelectPlanRejectsMismatchedLists) {
  ScoreArgs sc;
  sc.heads = 1, sc.g = 4, sc.d = 128, sc.n = 10;
  sc.scores = Poisoned<float>(10);
  TopKArgs t;
  t.heads = 1, t.k = 2, t.n = 10;
  t.out = Poisoned<int32_t>(2);
  t.counts = Poisoned<int32_t>(1);
  PlanArgs pl;
  pl.heads = 1, pl.row_bytes = 256;
  pl.retrieved = t.out;
  pl.counts = Poisoned<int32_t>(1);  // not t.counts
  EXPECT_EQ(backend_->ScoreSelectPlan(sc, t, pl).code(), absl::StatusCode::kInvalidArgument);
  pl.counts = t.counts;
  t.out2 = Poisoned<int32_t>(2);  // a second list needs its counts
  EXPECT_EQ(backend_->ScoreSelectPlan(sc, t, pl).code(), absl::StatusCode::kInvalidArgument);
}

// ExactAttention with an extra partial (the wave buffer's estimation zone, from another stream)
// equals ExactAttention followed by MergeLse; a head with no pages gets the extra partial alone.
// The partial's ready words are set by a copy on stream 1 queued behind a 2 ms delay, after the
// attention was queued on stream 0: the kernel must wait for them, not read the stale partial.
TEST_F(CudaKernelsTest, ExactAttentionMergesExtraPartial) {
  const int heads = 3, g = 4, d = 128;
  std::vector<int32_t> offsets;
  const std::vector<PageRef> pages = RandomPages({0, 3, 150}, d, &offsets);
  std::vector<float> xo = Random(heads * g * d), xl = Random(heads * g, 2.f);
  xl[5] = -INFINITY;  // one row without an extra partial
  const ExactArgs a = ExactOver(pages, offsets, g, d, 150, 16);
  ASSERT_TRUE(backend_->ExactAttention(a).ok());
  auto ref = Download(a.out, heads * g * d);
  auto ref_lse = Download(a.lse, heads * g);
  cpu::MergeLse(ref.data(), ref_lse.data(), xo.data(), xl.data(), heads * g, d);
  for (uint32_t seq : {1u, 2u}) {
    ExactArgs b = a;
    // Until the producer signals, the device holds a wrong partial and stale ready words.
    float* extra_out = Upload(Random(heads * g * d));
    float* extra_lse = Upload(Random(heads * g));
    uint32_t* ready = Upload(std::vector<uint32_t>(heads * g, seq - 1));
    b.extra_out = extra_out;
    b.extra_lse = extra_lse;
    b.extra_ready = ready;
    b.extra_seq = seq;
    b.out = Poisoned<float>(heads * g * d);
    b.lse = Poisoned<float>(heads * g);
    const float* xo_dev = Upload(xo);
    const float* xl_dev = Upload(xl);
    const uint32_t* words = Upload(std::vector<uint32_t>(heads * g, seq));
    ASSERT_TRUE(backend_->Synchronize(0).ok());
    // Stream 1, the producer: a delay, then the partial, then its ready words (device-to-device
    // copies, which do not block the host).
    ASSERT_TRUE(backend_->Delay(int64_t{2} * 1000 * 1000, 1).ok());
    ASSERT_TRUE(backend_->Copy(extra_out, xo_dev, sizeof(float) * xo.size(), 1).ok());
    ASSERT_TRUE(backend_->Copy(extra_lse, xl_dev, sizeof(float) * xl.size(), 1).ok());
    ASSERT_TRUE(backend_->Copy(ready, words, sizeof(uint32_t) * heads * g, 1).ok());
    ASSERT_TRUE(backend_->ExactAttention(b).ok());  // stream 0, queued while stream 1 waits
    auto out = Download(b.out, heads * g * d);
    auto lse = Download(b.lse, heads * g);
    ASSERT_TRUE(backend_->Synchronize(1).ok());
    EXPECT_LT(RelErr(out.data(), ref.data(), heads * g * d), 1e-6) << "seq " << seq;
    for (int r = 0; r < heads * g; ++r)
      EXPECT_NEAR(lse[r], ref_lse[r], 1e-5 * (1 + std::abs(ref_lse[r]))) << "row " << r;
    for (int i = 0; i < g * d; ++i) ASSERT_EQ(out[i], xo[i]);  // head 0: no pages
  }
  ExactArgs c = a;
  c.extra_out = Upload(xo);
  c.extra_lse = Upload(xl);  // no ready words
  EXPECT_EQ(backend_->ExactAttention(c).code(), absl::StatusCode::kInvalidArgument);
}

// A chained ExactAttention (dependent launch, own scratch and arrival words) reads head h's page
// list only once pages_ready[h] == seq: here the list is written, then the words set, by copies on
// stream 1 behind a 2 ms delay, after the attention was queued on stream 0. Until then the list
// holds other (valid) pages, so reading it early gives a wrong result. Twice: the arrival words
// must be left zero for the next launch.
TEST_F(CudaKernelsTest, ExactAttentionChainedWaitsForPageWords) {
  const int heads = 3, g = 2, d = 128;
  std::vector<int32_t> offsets;
  const std::vector<PageRef> pages = RandomPages({7, 1, 60}, d, &offsets);
  const std::vector<PageRef> decoys = RandomPages({7, 1, 60}, d, &offsets);
  const ExactArgs a = ExactOver(pages, offsets, g, d, 60, 4);
  ASSERT_TRUE(backend_->ExactAttention(a).ok());
  const auto ref = Download(a.out, heads * g * d);
  const auto ref_lse = Download(a.lse, heads * g);
  ChainArgs chain;
  auto scratch = backend_->Allocate(backend_->ExactScratchBytes(a));
  ASSERT_TRUE(scratch.ok());
  chain.scratch = scratch->as<float>();
  chain.arrivals = Upload(std::vector<uint32_t>(heads, 0));
  uint32_t* words = Upload(std::vector<uint32_t>(heads, 0));
  chain.pages_ready = words;
  const PageRef* real = Upload(pages);
  for (uint32_t seq : {1u, 2u}) {
    ExactArgs b = a;
    auto* list = const_cast<PageRef*>(Upload(decoys));
    b.pages = list;
    b.chain = &chain;
    chain.seq = seq;
    b.out = Poisoned<float>(heads * g * d);
    b.lse = Poisoned<float>(heads * g);
    const uint32_t* set = Upload(std::vector<uint32_t>(heads, seq));
    ASSERT_TRUE(backend_->Synchronize(0).ok());
    ASSERT_TRUE(backend_->Delay(int64_t{2} * 1000 * 1000, 1).ok());
    ASSERT_TRUE(backend_->Copy(list, real, sizeof(PageRef) * pages.size(), 1).ok());
    ASSERT_TRUE(backend_->Copy(words, set, sizeof(uint32_t) * heads, 1).ok());
    ASSERT_TRUE(backend_->ExactAttention(b).ok());
    const auto out = Download(b.out, heads * g * d);
    const auto lse = Download(b.lse, heads * g);
    ASSERT_TRUE(backend_->Synchronize(1).ok());
    EXPECT_LT(RelErr(out.data(), ref.data(), heads * g * d), 1e-6) << "seq " << seq;
    for (int r = 0; r < heads * g; ++r) EXPECT_NEAR(lse[r], ref_lse[r], 1e-5f) << "row " << r;
    for (uint32_t w : Download(chain.arrivals, heads)) EXPECT_EQ(w, 0u);
  }
  ExactArgs c = a;
  ChainArgs bare;  // a chained launch without its own scratch
  c.chain = &bare;
  EXPECT_EQ(backend_->ExactAttention(c).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaKernelsTest, EstimateAttentionMatchesCpu) {
  for (int g : {1, 4}) {
    for (int d : {64, 128}) {
      const int heads = 2;
      const int64_t C = 500;
      std::vector<float> q = Random(heads * g * d), cen = Random(heads * C * d, 0.5f),
                         vs = Random(heads * C * d, 3.f);
      std::vector<int32_t> sizes(heads * C);
      for (auto& s : sizes) s = 1 + int(rng_() % 20);
      const int64_t stride = 300;
      std::vector<int32_t> list(heads * stride), counts = {300, int32_t(rng_() % 200)};
      for (auto& c : list) c = int32_t(rng_() % C);
      EstimateArgs a;
      a.q = Upload(q);
      a.heads = heads;
      a.g = g;
      a.d = d;
      a.scale = 1.0f / std::sqrt(float(d));
      a.centroids = Upload(cen);
      a.value_sums = Upload(vs);
      a.sizes = Upload(sizes);
      a.cluster_stride = C;
      a.clusters = Upload(list);
      a.counts = Upload(counts);
      a.list_stride = stride;
      a.out = Poisoned<float>(heads * g * d);
      a.lse = Poisoned<float>(heads * g);
      a.ready = Upload(std::vector<uint32_t>(heads * g, 0));
      a.ready_seq = 7u + g + d;
      ASSERT_TRUE(backend_->EstimateAttention(a).ok());
      auto out = Download(a.out, heads * g * d);
      auto lse = Download(a.lse, heads * g);
      for (uint32_t w : Download(a.ready, heads * g)) EXPECT_EQ(w, a.ready_seq);
      for (int h = 0; h < heads; ++h) {
        std::vector<float> ref(g * d), ref_lse(g);
        ASSERT_TRUE(
            cpu::EstimateAttention(q.data() + h * g * d, g, d, a.scale, cen.data() + h * C * d,
                                   vs.data() + h * C * d, sizes.data() + h * C, C,
                                   std::span<const int32_t>(list.data() + h * stride, counts[h]),
                                   ref.data(), ref_lse.data())
                .ok());
        EXPECT_LT(RelErr(out.data() + h * g * d, ref.data(), g * d), 1e-5);
        for (int j = 0; j < g; ++j) {
          if (counts[h] == 0) {  // an empty estimation zone: lse -inf on both sides
            EXPECT_EQ(lse[h * g + j], -INFINITY);
            EXPECT_EQ(ref_lse[j], -INFINITY);
          } else {
            EXPECT_NEAR(lse[h * g + j], ref_lse[j], 1e-4 * (1 + std::abs(ref_lse[j])));
          }
        }
      }
    }
  }
}

TEST_F(CudaKernelsTest, MergeLseMatchesCpu) {
  const int rows = 37, d = 128;
  std::vector<float> oa = Random(rows * d), ob = Random(rows * d), la = Random(rows, 3.f),
                     lb = Random(rows, 3.f);
  la[3] = -INFINITY;
  lb[5] = -INFINITY;
  float* doa = Upload(oa);
  float* dla = Upload(la);
  ASSERT_TRUE(backend_->MergeLse(doa, dla, Upload(ob), Upload(lb), rows, d).ok());
  auto out = Download(doa, rows * d);
  auto lse = Download(dla, rows);
  cpu::MergeLse(oa.data(), la.data(), ob.data(), lb.data(), rows, d);
  EXPECT_LT(RelErr(out.data(), oa.data(), rows * d), 1e-6);
  for (int r = 0; r < rows; ++r) EXPECT_NEAR(lse[r], la[r], 1e-5 * (1 + std::abs(la[r])));
}

TEST_F(CudaKernelsTest, KMeansAssignMatchesCpu) {
  const int64_t n = 3000, k = 57;
  const int d = 128;
  std::vector<float> x = Random(n * d), c = Random(k * d);
  AssignArgs a;
  a.x = Upload(x);
  a.n = n;
  a.centroids = Upload(c);
  a.k = k;
  a.d = d;
  a.assignment = Poisoned<int32_t>(n);
  a.best = Poisoned<float>(n);
  ASSERT_TRUE(backend_->KMeansAssign(a).ok());
  auto got = Download(a.assignment, n);
  auto best = Download(a.best, n);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    double bd = -INFINITY;
    int bj = -1;
    for (int64_t j = 0; j < k; ++j) {
      double dot = 0;
      for (int e = 0; e < d; ++e) dot += double(x[i * d + e]) * c[j * d + e];
      if (dot > bd) bd = dot, bj = int(j);
    }
    EXPECT_NEAR(best[i], bd, 1e-4 * (1 + std::abs(bd)));
    if (got[i] != bj) ++mismatches;  // only a near tie may flip
  }
  EXPECT_LE(mismatches, 2);
}

// Mean cosine of each unit key to its cluster's direction (the normalised mean of the member
// unit keys): the spherical k-means objective of an assignment, in float64.
double SphericalObjective(const std::vector<float>& keys, int64_t n, int d,
                          const std::vector<int32_t>& assignment, int64_t k) {
  std::vector<double> mean(d, 0.0), unit(n * d), dir(k * d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int e = 0; e < d; ++e) mean[e] += keys[i * d + e] / double(n);
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int e = 0; e < d; ++e) ss += std::pow(keys[i * d + e] - mean[e], 2);
    for (int e = 0; e < d; ++e) unit[i * d + e] = (keys[i * d + e] - mean[e]) / std::sqrt(ss);
    for (int e = 0; e < d; ++e) dir[assignment[i] * d + e] += unit[i * d + e];
  }
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double* c = dir.data() + assignment[i] * d;
    double dot = 0, cc = 0;
    for (int e = 0; e < d; ++e) dot += unit[i * d + e] * c[e], cc += c[e] * c[e];
    total += dot / std::sqrt(cc);
  }
  return total / double(n);
}

TEST_F(CudaKernelsTest, SphericalKMeansMatchesCpuClusterKeys) {
  const int64_t n = 3000;
  const int d = 128, blobs = 40;
  std::vector<float> centres = Random(blobs * d, 1.f), keys(n * d);
  std::normal_distribution<float> noise(0.f, 0.6f);
  for (int64_t i = 0; i < n; ++i)
    for (int e = 0; e < d; ++e)
      keys[i * d + e] = centres[(rng_() % blobs) * d + e] + noise(rng_) + 0.5f;  // off-centre
  const float* keys_dev = Upload(keys);
  for (int iterations : {0, 10}) {
    index::WaveIndexOptions o;
    o.iterations = iterations;
    auto cpu = index::ClusterKeys(keys.data(), n, d, o);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    const int64_t k = cpu->num_clusters;
    KMeansArgs a;
    a.keys = keys_dev;
    a.n = n;
    a.d = d;
    a.clusters = k;
    a.iterations = iterations;
    a.assignment = Poisoned<int32_t>(n);
    a.sizes = Poisoned<int32_t>(k);
    a.centroids = Poisoned<float>(k * d);
    ASSERT_TRUE(backend_->SphericalKMeans(a).ok());
    auto assignment = Download(a.assignment, n);
    auto sizes = Download(a.sizes, k);
    auto centroids = Download(a.centroids, k * d);
    // Sizes and centroids are those of the GPU's own assignment (plain means of the keys).
    std::vector<int32_t> count(k, 0);
    std::vector<double> sum(k * d, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_GE(assignment[i], 0);
      ASSERT_LT(assignment[i], k);
      ++count[assignment[i]];
      for (int e = 0; e < d; ++e) sum[assignment[i] * d + e] += keys[i * d + e];
    }
    double num = 0, den = 0;
    for (int64_t c = 0; c < k; ++c) {
      EXPECT_EQ(sizes[c], count[c]) << "cluster " << c;
      for (int e = 0; e < d; ++e) {
        const double want = count[c] > 0 ? sum[c * d + e] / count[c] : 0.0;
        num += std::pow(centroids[c * d + e] - want, 2);
        den += want * want;
      }
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5);
    if (iterations == 0) {  // same seeds, one assignment: equal up to float near-ties
      int64_t same = 0;
      for (int64_t i = 0; i < n; ++i) same += assignment[i] == cpu->assignment[i];
      EXPECT_GE(same, n * 995 / 1000);
    }
    // Same quality as the CPU's clustering (sums in another order may end in another optimum).
    const double gpu_obj = SphericalObjective(keys, n, d, assignment, k);
    const double cpu_obj = SphericalObjective(keys, n, d, cpu->assignment, k);
    EXPECT_GT(gpu_obj, cpu_obj - 0.01) << "iterations " << iterations;
    if (iterations == 10) {
      EXPECT_GT(gpu_obj, SphericalObjective(keys, n, d, std::vector<int32_t>(n, 0), k) + 0.05);
    }
  }
}

TEST_F(CudaKernelsTest, SphericalKMeansRejectsBadShape) {
  KMeansArgs a;
  a.n = 10;
  a.d = 6;  // not a multiple of 4
  a.clusters = 2;
  EXPECT_EQ(backend_->SphericalKMeans(a).code(), absl::StatusCode::kInvalidArgument);
}

class GatherPagesTest : public CudaKernelsTest, public ::testing::WithParamInterface<bool> {};

// With the SMs' loads and with bulk copies (GetParam()).
TEST_P(GatherPagesTest, CopiesFromPinnedHost) {
  const int count = 50, bytes = 2048;
  auto host = store::HostBuffer::Allocate(buffer::PinnedAllocator(), count * bytes);
  ASSERT_TRUE(host.ok()) << host.status();
  std::vector<uint8_t> want(count * bytes);
  for (auto& b : want) b = uint8_t(rng_());
  std::memcpy(host->data(), want.data(), want.size());
  std::byte* dst = Poisoned<std::byte>(count * bytes);
  std::vector<const void*> src_ptrs;
  std::vector<void*> dst_ptrs;
  std::vector<int32_t> sizes;
  for (int i = 0; i < count; ++i) {  // reversed order, partial last pages
    src_ptrs.push_back(host->data() + i * bytes);
    dst_ptrs.push_back(dst + (count - 1 - i) * bytes);
    sizes.push_back(i % 3 == 0 ? bytes / 2 : bytes);
  }
  ASSERT_TRUE(backend_
                  ->GatherPages(Upload(src_ptrs), Upload(dst_ptrs), Upload(sizes), count, bytes, 0,
                                GetParam())
                  .ok());
  auto got = Download(dst, count * bytes);
  for (int i = 0; i < count; ++i)
    for (int b = 0; b < sizes[i]; ++b)
      ASSERT_EQ(uint8_t(got[(count - 1 - i) * bytes + b]), want[i * bytes + b]) << i << " " << b;
}

INSTANTIATE_TEST_SUITE_P(CudaKernelsTest, GatherPagesTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? "Bulk" : "Loads";
                         });

TEST(CudaBackendTest, RecoversFromDeviceOutOfMemory) {
  SKIP_WITHOUT_GPU();
  CudaBackendOptions huge;
  huge.workspace_bytes = int64_t{1} << 50;  // 1 PiB
  auto bad = CudaBackend::Create(huge);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kResourceExhausted) << bad.status();
  auto backend = CudaBackend::Create({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto too_big = (*backend)->Allocate(size_t{1} << 50);
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  // A workspace too small for an op is an error before launch, not a crash.
  CudaBackendOptions tiny;
  tiny.workspace_bytes = 1024;
  auto small = CudaBackend::Create(tiny);
  ASSERT_TRUE(small.ok());
  ExactArgs a;
  a.heads = 8;
  a.g = 4;
  a.d = 128;
  a.max_pages_per_head = 1 << 20;
  EXPECT_EQ((*small)->ExactAttention(a).code(), absl::StatusCode::kResourceExhausted);
  // And the device still works: a merge computes the right thing.
  auto buf = (*backend)->Allocate(2 * 128 * sizeof(float) + 2 * sizeof(float));
  ASSERT_TRUE(buf.ok());
  std::vector<float> host(2 * 128 + 2);
  for (int i = 0; i < 256; ++i) host[i] = float(i % 128) + 1;
  host[256] = 0.5f;
  host[257] = 0.5f;  // equal lse: merge averages, lse + log 2
  float* p = buf->as<float>();
  ASSERT_TRUE((*backend)->Copy(p, host.data(), host.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->MergeLse(p, p + 256, p + 128, p + 257, 1, 128).ok());
  ASSERT_TRUE((*backend)->Copy(host.data(), p, host.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->Synchronize().ok());
  EXPECT_NEAR(host[256], 0.5f + std::log(2.f), 1e-5);
  EXPECT_NEAR(host[5], 6.f, 1e-5);
}

}  // namespace
}  // namespace kvwave::gpu
