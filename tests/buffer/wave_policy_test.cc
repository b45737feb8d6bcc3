// WavePolicy (LRU page pool) against a naive CPU model of the same policy, and AsyncCommitter.
#include "buffer/wave_policy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <vector>

#include "buffer/async_committer.h"

namespace kvwave::buffer {
namespace {

// The policy written the slow, obvious way: a vector ordered most-recent first.
class ModelPolicy {
 public:
  explicit ModelPolicy(int64_t pages) : free_(pages) {}
  bool Cached(int32_t unit, int32_t c) const { return Find(unit, c) >= 0; }
  // Returns the clusters admitted, in order; counts evictions and overflows.
  std::vector<int32_t> Commit(int32_t unit, const std::vector<int32_t>& hits,
                              const std::vector<MissCluster>& misses, int64_t capacity) {
    ++epoch_;
    for (int32_t c : hits) Touch(unit, c);
    std::vector<int32_t> admitted;
    for (const MissCluster& m : misses) {
      if (Cached(unit, m.cluster)) {
        Touch(unit, m.cluster);
        continue;
      }
      if (m.pages > capacity) {
        ++overflow;
        continue;
      }
      while (free_ < m.pages && !order_.empty() && order_.back().epoch != epoch_) {
        free_ += order_.back().pages;
        order_.pop_back();
        ++evicted;
      }
      if (free_ < m.pages) {
        ++overflow;
        continue;
      }
      free_ -= m.pages;
      order_.insert(order_.begin(), {unit, m.cluster, m.pages, epoch_});
      admitted.push_back(m.cluster);
    }
    return admitted;
  }
  int64_t evicted = 0, overflow = 0;
  int64_t free_pages() const { return free_; }

 private:
  struct E {
    int32_t unit, cluster, pages;
    uint64_t epoch;
  };
  int Find(int32_t unit, int32_t c) const {
    for (size_t i = 0; i < order_.size(); ++i)
      if (order_[i].unit == unit && order_[i].cluster == c) return static_cast<int>(i);
    return -1;
  }
  void Touch(int32_t unit, int32_t c) {
    const int i = Find(unit, c);
    if (i < 0) return;
    E e = order_[i];
    e.epoch = epoch_;
    order_.erase(order_.begin() + i);
    order_.insert(order_.begin(), e);
  }
  std::vector<E> order_;
  int64_t free_;
  uint64_t epoch_ = 0;
};

TEST(WavePolicyTest, MatchesModelOnRandomTraffic) {
  for (int64_t capacity : {3, 17, 64, 400}) {
    std::mt19937 rng(static_cast<uint32_t>(capacity) * 7919u + 1);
    WavePolicy policy(capacity, 3, 200, 4);
    ModelPolicy model(capacity);
    std::vector<int32_t> pages_of(200);
    for (auto& p : pages_of) p = 1 + static_cast<int32_t>(rng() % 4);
    int64_t total_hits = 0;
    for (int step = 0; step < 400; ++step) {
      const int32_t unit = static_cast<int32_t>(rng() % 3);
      // Skewed choice of clusters so that some repeat.
      std::vector<int32_t> list;
      const int n = 1 + static_cast<int>(rng() % 12);
      for (int i = 0; i < n; ++i) {
        const int32_t c = static_cast<int32_t>(std::min<uint32_t>(rng() % 200, rng() % 200));
        if (std::find(list.begin(), list.end(), c) == list.end()) list.push_back(c);
      }
      std::vector<CachedCluster> hits;
      std::vector<MissCluster> misses;
      policy.Classify(
          unit, list, [&](int32_t c) { return pages_of[c]; }, hits, misses);
      ASSERT_EQ(hits.size() + misses.size(), list.size());
      std::vector<int32_t> hit_ids;
      for (const auto& h : hits) {
        ASSERT_TRUE(model.Cached(unit, h.cluster)) << "step " << step;
        ASSERT_EQ(static_cast<int32_t>(h.slots.size()), pages_of[h.cluster]);
        hit_ids.push_back(h.cluster);
      }
      for (const auto& m : misses) ASSERT_FALSE(model.Cached(unit, m.cluster));
      total_hits += static_cast<int64_t>(hits.size());
      std::vector<std::pair<int32_t, int32_t>> cached_before;
      for (int32_t u = 0; u < 3; ++u)
        for (int32_t c = 0; c < 200; ++c)
          if (model.Cached(u, c)) cached_before.emplace_back(u, c);
      std::vector<WavePolicy::Evicted> evicted;
      const WavePolicy::CommitItem item{unit, hit_ids, misses};
      const auto admitted =
          policy.CommitMany(std::span<const WavePolicy::CommitItem>(&item, 1), &evicted)[0];
      const int64_t model_evicted = model.evicted;
      const auto want = model.Commit(unit, hit_ids, misses, capacity);
      ASSERT_EQ(static_cast<int64_t>(evicted.size()), model.evicted - model_evicted);
      for (const auto& e : evicted) {  // reported evictions: cached before, gone now
        EXPECT_NE(std::find(cached_before.begin(), cached_before.end(),
                            std::make_pair(e.unit, e.cluster)),
                  cached_before.end());
        EXPECT_FALSE(model.Cached(e.unit, e.cluster)) << "step " << step;
      }
      ASSERT_EQ(admitted.size(), want.size()) << "step " << step;
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(admitted[i].cluster, want[i]);
        EXPECT_EQ(static_cast<int32_t>(admitted[i].slots.size()), pages_of[want[i]]);
      }
      ASSERT_TRUE(policy.CheckInvariants()) << "step " << step;
      ASSERT_EQ(policy.free_pages(), model.free_pages());
    }
    const PolicyStats st = policy.stats();
    EXPECT_EQ(st.evicted, model.evicted) << "capacity " << capacity;
    EXPECT_EQ(st.overflow, model.overflow) << "capacity " << capacity;
    if (capacity >= 64) {
      EXPECT_GT(total_hits, 0);
    }
  }
}

TEST(WavePolicyTest, OversizedClusterIsCountedNotAdmitted) {
  WavePolicy policy(2, 1, 10, 4);
  std::vector<MissCluster> misses = {{5, 3}, {6, 1}};
  const auto admitted = policy.Commit(0, {}, misses);
  ASSERT_EQ(admitted.size(), 1u);
  EXPECT_EQ(admitted[0].cluster, 6);
  EXPECT_EQ(policy.stats().overflow, 1);
  EXPECT_TRUE(policy.CheckInvariants());
}

TEST(AsyncCommitterTest, RunsJobsInOrder) {
  AsyncCommitter committer;
  std::vector<int> seen;
  std::atomic<int> last{0};
  uint64_t ticket = 0;
  for (int i = 1; i <= 100; ++i)
    ticket = committer.Submit([&, i] {
      seen.push_back(i);
      last = i;
    });
  committer.WaitFor(ticket);
  EXPECT_EQ(last.load(), 100);
  ASSERT_EQ(seen.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(seen[i], i + 1);
  EXPECT_EQ(committer.done(), 100u);
}

}  // namespace
}  // namespace kvwave::buffer
