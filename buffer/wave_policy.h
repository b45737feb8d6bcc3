// Replacement policy of the wave buffer's GPU page pool, CUDA-free (what CI tests on the CPU).
//
// The pool holds num_pages page slots shared by every cluster it may cache. Clusters are named by
// keys: either (unit, cluster) pairs of a fixed layout (the first constructor: key = unit *
// clusters + cluster), or keys registered and dropped at run time (the second: the wave buffer's
// segments joining and leaving; unit 0, cluster = key). A cached cluster owns the slots of all its
// pages; key k's slots are kept at slot entries [entry(k), entry(k) + pages), the same numbering
// as the GPU's table, so a cluster may have any number of pages. Classify() splits a unit's
// retrieved clusters into hits (with their slots) and misses; Commit() then marks the hits most
// recently used and admits the misses, evicting least-recently-used clusters as needed. A miss that
// cannot be admitted (it needs more pages than the pool has, or every slot is held by clusters of
// the same commit) is counted as an overflow: it is still attended that step from the execution
// buffer, never dropped.
//
// Thread-safety: all methods are thread-safe (one mutex); Classify takes it shared.
#ifndef KVWAVE_BUFFER_WAVE_POLICY_H_
#define KVWAVE_BUFFER_WAVE_POLICY_H_

#include <cstdint>
#include <span>
#include <vector>

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
  // A pool of num_pages slots for the clusters of `units` units of `clusters` clusters each, a
  // cluster holding at most max_pages pages. All state is in dense arrays indexed by
  // unit * clusters + cluster (the committer touches ~1,000 clusters per layer call, so this runs
  // on every decode step: no hashing, no node allocation, neighbours of a layer's entries mostly
  // in the same cache lines).
  WavePolicy(int64_t num_pages, int64_t units, int64_t clusters, int max_pages);
  // A pool of num_pages slots with no keys yet (RegisterKeys); no bound on a cluster's pages.
  explicit WavePolicy(int64_t num_pages);

  // Keys [key0, key0 + n) become usable; key key0 + i keeps its slots from slot entry entries[i]
  // (entries of different live keys must not overlap). REQUIRES: the keys are not registered.
  void RegisterKeys(int32_t key0, int32_t n, const int64_t* entries);
  // Evicts the cached ones of keys [key0, key0 + n) (appending them to `evicted` when set) and
  // unregisters them: their slots are free. Returns the pages freed.
  int64_t DropKeys(int32_t key0, int32_t n, std::vector<int32_t>* evicted = nullptr);

  // Splits `clusters` of `unit` into hits (appended to `hits`) and misses (appended to `misses`,
  // with the page count pages_of(cluster)). Does not change the LRU order.
  template <typename PagesOf>
  void Classify(int32_t unit, std::span<const int32_t> clusters, PagesOf&& pages_of,
                std::vector<CachedCluster>& hits, std::vector<MissCluster>& misses) const {
    absl::ReaderMutexLock lock(&mu_);
    for (int32_t c : clusters) {
      const int64_t key = Key(unit, c);
      if (node_[key].pages > 0) {
        const int64_t e = entry_[key];
        hits.push_back({c, {slots_.begin() + e, slots_.begin() + e + node_[key].pages}});
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
  // When `evicted` is set, the (unit, cluster) of every cluster evicted by this commit is appended.
  struct CommitItem {
    int32_t unit = 0;
    std::span<const int32_t> hits;
    std::span<const MissCluster> misses;
  };
  struct Evicted {
    int32_t unit = 0;
    int32_t cluster = 0;
  };
  std::vector<std::vector<CachedCluster>> CommitMany(std::span<const CommitItem> items,
                                                     std::vector<Evicted>* evicted = nullptr);

  PolicyStats stats() const;
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const;
  int64_t cached_clusters() const;
  // Every slot held by a cached cluster, checked for double use (tests).
  bool CheckInvariants() const;

 private:
  int32_t Key(int32_t unit, int32_t cluster) const {
    return static_cast<int32_t>(int64_t{unit} * clusters_ + cluster);
  }
  void Unlink(int32_t key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PushFront(int32_t key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool EvictOne(uint32_t epoch, std::vector<Evicted>* evicted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t num_pages_, clusters_;
  const int64_t max_pages_;
  mutable absl::Mutex mu_;
  // Per key, in one 16-byte record (one cache miss per touched cluster): LRU links (-1: none),
  // the commit that last touched it, pages held (0: not cached). Slots: [max_pages_] per key.
  struct Node {
    int32_t prev = -1, next = -1;
    uint32_t epoch = 0;
    int32_t pages = 0;
  };
  void Prefetch(std::span<const CommitItem> items) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<Node> node_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> entry_ ABSL_GUARDED_BY(mu_);  // [keys]: first slot entry
  std::vector<int32_t> slots_ ABSL_GUARDED_BY(mu_);  // [entries]
  int32_t head_ ABSL_GUARDED_BY(mu_) = -1;           // most recent
  int32_t tail_ ABSL_GUARDED_BY(mu_) = -1;           // least recent
  int64_t cached_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  uint32_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  PolicyStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_POLICY_H_
