// Replacement policy of the wave buffer's GPU page pool, CUDA-free (what CI tests on the CPU).
//
// The pool holds num_pages page slots shared by every (layer, KV head) "unit". A cached cluster
// owns the slots of all its pages. Classify() splits a unit's retrieved clusters into hits (with
// their slots) and misses; Commit() then marks the hits most recently used and admits the misses,
// evicting least-recently-used clusters as needed. A miss that cannot be admitted (it needs more
// pages than the pool has, or every slot is held by clusters of the same commit) is counted as an
// overflow: it is still attended that step from the execution buffer, never dropped.
//
// Thread-safety: all methods are thread-safe (one mutex); Classify takes it shared.
#ifndef KVWAVE_BUFFER_WAVE_POLICY_H_
#define KVWAVE_BUFFER_WAVE_POLICY_H_

#include <cstdint>
#include <list>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/synchronization/mutex.h"

namespace kvwave::buffer {

struct CachedCluster {
  int32_t cluster = 0;
  absl::InlinedVector<int32_t, 4> slots;  // one pool slot per page, in page order
};

struct MissCluster {
  int32_t cluster = 0;
  int32_t pages = 0;
};

struct PolicyStats {
  int64_t hits = 0, misses = 0;                     // clusters
  int64_t hit_pages = 0, miss_pages = 0;            // pages
  int64_t admitted = 0, evicted = 0, overflow = 0;  // clusters
};

class WavePolicy {
 public:
  explicit WavePolicy(int64_t num_pages);

  // Splits `clusters` of `unit` into hits (appended to `hits`) and misses (appended to `misses`,
  // with the page count pages_of(cluster)). Does not change the LRU order.
  template <typename PagesOf>
  void Classify(int32_t unit, std::span<const int32_t> clusters, PagesOf&& pages_of,
                std::vector<CachedCluster>& hits, std::vector<MissCluster>& misses) const {
    absl::ReaderMutexLock lock(&mu_);
    for (int32_t c : clusters) {
      auto it = map_.find(Key(unit, c));
      if (it != map_.end()) {
        hits.push_back({c, it->second.slots});
      } else {
        misses.push_back({c, static_cast<int32_t>(pages_of(c))});
      }
    }
  }

  // Makes `hits` most recently used and admits `misses` (in order); returns the admitted ones with
  // their new slots. Clusters already cached (admitted by an earlier commit) count as hits.
  std::vector<CachedCluster> Commit(int32_t unit, std::span<const int32_t> hits,
                                    std::span<const MissCluster> misses);

  // One commit for several units (all KV heads of a layer): every unit's hits are touched before
  // any miss is admitted, so admitting one head's misses never evicts another head's fresh hits.
  // Returns the admitted clusters of each item.
  struct CommitItem {
    int32_t unit = 0;
    std::span<const int32_t> hits;
    std::span<const MissCluster> misses;
  };
  std::vector<std::vector<CachedCluster>> CommitMany(std::span<const CommitItem> items);

  PolicyStats stats() const;
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const;
  // Every slot held by a cached cluster, checked for double use (tests).
  bool CheckInvariants() const;

 private:
  struct Entry {
    absl::InlinedVector<int32_t, 4> slots;
    std::list<uint64_t>::iterator lru;
    uint64_t epoch = 0;  // commit that last touched it
  };
  static uint64_t Key(int32_t unit, int32_t cluster) {
    return (uint64_t(uint32_t(unit)) << 32) | uint32_t(cluster);
  }
  bool EvictOne(uint64_t epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t num_pages_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Entry> map_ ABSL_GUARDED_BY(mu_);
  std::list<uint64_t> lru_ ABSL_GUARDED_BY(mu_);  // front: most recent
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  PolicyStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_POLICY_H_
