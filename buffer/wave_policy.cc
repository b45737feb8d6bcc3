#include "buffer/wave_policy.h"

#include <algorithm>
#include <limits>

#include "config/status_macros.h"

namespace kvwave::buffer {

WavePolicy::WavePolicy(int64_t num_pages, int64_t units, int64_t clusters, int max_pages)
    : num_pages_(num_pages), clusters_(clusters), max_pages_(max_pages) {
  KVWAVE_CHECK(num_pages >= 0 && num_pages < (int64_t{1} << 31) && units >= 0 && clusters >= 0 &&
               units * clusters < (int64_t{1} << 31) && max_pages >= 1);
  const int64_t keys = units * clusters;
  node_.assign(keys, Node{});
  entry_.resize(keys);
  for (int64_t k = 0; k < keys; ++k) entry_[k] = k * max_pages;
  slots_.assign(keys * max_pages, -1);
  free_.reserve(num_pages);
  for (int64_t i = num_pages - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));
}

WavePolicy::WavePolicy(int64_t num_pages)
    : num_pages_(num_pages),
      clusters_((int64_t{1} << 31) - 1),
      max_pages_(std::numeric_limits<int64_t>::max()) {
  KVWAVE_CHECK(num_pages >= 0 && num_pages < (int64_t{1} << 31));
  free_.reserve(num_pages);
  for (int64_t i = num_pages - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));
}

void WavePolicy::RegisterKeys(int32_t key0, int32_t n, const int64_t* entries) {
  absl::MutexLock lock(&mu_);
  KVWAVE_CHECK(key0 >= 0 && n >= 0);
  const size_t end = static_cast<size_t>(key0) + n;
  if (node_.size() < end) {
    node_.resize(end, Node{});
    entry_.resize(end, 0);
  }
  for (int32_t i = 0; i < n; ++i) {
    KVWAVE_CHECK(node_[key0 + i].pages == 0);
    node_[key0 + i] = Node{};
    entry_[key0 + i] = entries[i];
  }
}

int64_t WavePolicy::DropKeys(int32_t key0, int32_t n, std::vector<int32_t>* evicted) {
  absl::MutexLock lock(&mu_);
  int64_t freed = 0;
  for (int32_t key = key0; key < key0 + n && key < static_cast<int64_t>(node_.size()); ++key) {
    Node& x = node_[key];
    if (x.pages == 0) continue;
    for (int p = 0; p < x.pages; ++p) {
      free_.push_back(slots_[entry_[key] + p]);
      slots_[entry_[key] + p] = -1;
    }
    freed += x.pages;
    Unlink(key);
    x.pages = 0;
    --cached_;
    ++stats_.evicted;
    if (evicted != nullptr) evicted->push_back(key);
  }
  return freed;
}

void WavePolicy::Unlink(int32_t key) {
  Node& x = node_[key];
  (x.prev >= 0 ? node_[x.prev].next : head_) = x.next;
  (x.next >= 0 ? node_[x.next].prev : tail_) = x.prev;
  x.prev = x.next = -1;
}

void WavePolicy::PushFront(int32_t key) {
  Node& x = node_[key];
  x.prev = -1;
  x.next = head_;
  (head_ >= 0 ? node_[head_].prev : tail_) = key;
  head_ = key;
}

// The records of one commit's clusters are far apart in memory and cold (a layer's were last
// touched one decode step ago): fetch them all at once before the dependent list updates.
void WavePolicy::Prefetch(std::span<const CommitItem> items) const {
  for (const CommitItem& item : items) {
    for (int32_t c : item.hits) __builtin_prefetch(&node_[Key(item.unit, c)], 1);
    for (const MissCluster& m : item.misses)
      __builtin_prefetch(&node_[Key(item.unit, m.cluster)], 1);
  }
}

bool WavePolicy::EvictOne(uint32_t epoch, std::vector<Evicted>* evicted) {
  if (tail_ < 0) return false;
  const int32_t key = tail_;
  Node& x = node_[key];
  if (x.epoch == epoch) return false;  // everything left was touched by this commit
  for (int p = 0; p < x.pages; ++p) free_.push_back(slots_[entry_[key] + p]);
  if (evicted != nullptr)
    evicted->push_back(
        {static_cast<int32_t>(key / clusters_), static_cast<int32_t>(key % clusters_)});
  Unlink(key);
  x.pages = 0;
  --cached_;
  ++stats_.evicted;
  return true;
}

std::vector<CachedCluster> WavePolicy::Commit(int32_t unit, std::span<const int32_t> hits,
                                              std::span<const MissCluster> misses) {
  const CommitItem item{unit, hits, misses};
  return std::move(CommitMany(std::span<const CommitItem>(&item, 1))[0]);
}

std::vector<std::vector<CachedCluster>> WavePolicy::CommitMany(std::span<const CommitItem> items,
                                                               std::vector<Evicted>* evicted) {
  absl::MutexLock lock(&mu_);
  const uint32_t epoch = ++epoch_;
  Prefetch(items);
  auto touch = [&](int32_t key) {
    if (head_ != key) {
      Unlink(key);
      PushFront(key);
    }
    node_[key].epoch = epoch;
  };
  for (const CommitItem& item : items) {
    for (int32_t c : item.hits) {
      const int32_t key = Key(item.unit, c);
      if (node_[key].pages == 0) continue;  // evicted since it was classified: nothing to do
      touch(key);
      ++stats_.hits;
      stats_.hit_pages += node_[key].pages;
    }
  }
  std::vector<std::vector<CachedCluster>> admitted(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    for (const MissCluster& m : items[i].misses) {
      const int32_t key = Key(items[i].unit, m.cluster);
      if (node_[key].pages > 0) {  // admitted meanwhile
        touch(key);
        continue;
      }
      ++stats_.misses;
      stats_.miss_pages += m.pages;
      if (m.pages > num_pages_ || m.pages > max_pages_) {
        ++stats_.overflow;
        continue;
      }
      while (static_cast<int64_t>(free_.size()) < m.pages && EvictOne(epoch, evicted)) {
      }
      if (static_cast<int64_t>(free_.size()) < m.pages) {
        ++stats_.overflow;
        continue;
      }
      CachedCluster a{m.cluster, {}};
      const int64_t e = entry_[key];
      if (slots_.size() < static_cast<size_t>(e + m.pages)) slots_.resize(e + m.pages, -1);
      for (int p = 0; p < m.pages; ++p) {
        slots_[e + p] = free_.back();
        a.slots.push_back(free_.back());
        free_.pop_back();
      }
      node_[key].pages = m.pages;
      PushFront(key);
      node_[key].epoch = epoch;
      ++cached_;
      admitted[i].push_back(std::move(a));
      ++stats_.admitted;
    }
  }
  return admitted;
}

PolicyStats WavePolicy::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

int64_t WavePolicy::cached_clusters() const {
  absl::MutexLock lock(&mu_);
  return cached_;
}

int64_t WavePolicy::free_pages() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(free_.size());
}

bool WavePolicy::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  std::vector<char> used(num_pages_, 0);
  int64_t held = 0, listed = 0;
  for (int32_t key = head_, prev = -1; key >= 0; prev = key, key = node_[key].next) {
    if (node_[key].prev != prev || node_[key].pages == 0 || ++listed > cached_) return false;
    for (int p = 0; p < node_[key].pages; ++p) {
      const int32_t s = slots_[entry_[key] + p];
      if (s < 0 || s >= num_pages_ || used[s]) return false;
      used[s] = 1;
      ++held;
    }
  }
  for (int32_t s : free_) {
    if (s < 0 || s >= num_pages_ || used[s]) return false;
    used[s] = 1;
  }
  return listed == cached_ && held + static_cast<int64_t>(free_.size()) == num_pages_;
}

}  // namespace kvwave::buffer
