#include "buffer/wave_policy.h"

#include <algorithm>

namespace kvwave::buffer {

WavePolicy::WavePolicy(int64_t num_pages) : num_pages_(num_pages) {
  free_.reserve(num_pages);
  for (int64_t i = num_pages - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));
}

bool WavePolicy::EvictOne(uint64_t epoch) {
  if (lru_.empty()) return false;
  const uint64_t key = lru_.back();
  auto it = map_.find(key);
  if (it->second.epoch == epoch) return false;  // everything left was touched by this commit
  for (int32_t s : it->second.slots) free_.push_back(s);
  lru_.pop_back();
  map_.erase(it);
  ++stats_.evicted;
  return true;
}

std::vector<CachedCluster> WavePolicy::Commit(int32_t unit, std::span<const int32_t> hits,
                                              std::span<const MissCluster> misses) {
  const CommitItem item{unit, hits, misses};
  return std::move(CommitMany(std::span<const CommitItem>(&item, 1))[0]);
}

std::vector<std::vector<CachedCluster>> WavePolicy::CommitMany(std::span<const CommitItem> items) {
  absl::MutexLock lock(&mu_);
  const uint64_t epoch = ++epoch_;
  auto touch = [&](Entry& e) {
    lru_.splice(lru_.begin(), lru_, e.lru);
    e.epoch = epoch;
  };
  for (const CommitItem& item : items) {
    for (int32_t c : item.hits) {
      auto it = map_.find(Key(item.unit, c));
      if (it == map_.end()) continue;  // evicted since Classify: it was attended, nothing to do
      touch(it->second);
      ++stats_.hits;
      stats_.hit_pages += static_cast<int64_t>(it->second.slots.size());
    }
  }
  std::vector<std::vector<CachedCluster>> admitted(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    for (const MissCluster& m : items[i].misses) {
      const uint64_t key = Key(items[i].unit, m.cluster);
      auto it = map_.find(key);
      if (it != map_.end()) {  // admitted meanwhile
        touch(it->second);
        continue;
      }
      ++stats_.misses;
      stats_.miss_pages += m.pages;
      if (m.pages > num_pages_) {
        ++stats_.overflow;
        continue;
      }
      while (static_cast<int64_t>(free_.size()) < m.pages && EvictOne(epoch)) {
      }
      if (static_cast<int64_t>(free_.size()) < m.pages) {
        ++stats_.overflow;
        continue;
      }
      Entry e;
      e.slots.assign(free_.end() - m.pages, free_.end());
      std::reverse(e.slots.begin(), e.slots.end());
      free_.resize(free_.size() - m.pages);
      lru_.push_front(key);
      e.lru = lru_.begin();
      e.epoch = epoch;
      admitted[i].push_back({m.cluster, e.slots});
      map_.emplace(key, std::move(e));
      ++stats_.admitted;
    }
  }
  return admitted;
}

PolicyStats WavePolicy::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

int64_t WavePolicy::free_pages() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(free_.size());
}

bool WavePolicy::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  std::vector<char> used(num_pages_, 0);
  int64_t held = 0;
  for (const auto& [key, e] : map_) {
    for (int32_t s : e.slots) {
      if (s < 0 || s >= num_pages_ || used[s]) return false;
      used[s] = 1;
      ++held;
    }
  }
  for (int32_t s : free_) {
    if (s < 0 || s >= num_pages_ || used[s]) return false;
    used[s] = 1;
  }
  return held + static_cast<int64_t>(free_.size()) == num_pages_ && lru_.size() == map_.size();
}

}  // namespace kvwave::buffer
