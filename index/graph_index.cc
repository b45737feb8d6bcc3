#include "index/graph_index.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "index/distance.h"
#include "index/exact_topn.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvwave::index {
namespace {

using AdjacencyLists = std::vector<std::vector<int32_t>>;

// Rows of the m prefill queries used for the build: all of them, or `limit` drawn without
// replacement (partial Fisher-Yates on mt19937_64, whose sequence the standard fixes), sorted.
double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) { return t.tv_sec + 1e-6 * t.tv_usec; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

std::vector<int64_t> SampleRows(int64_t m, int64_t limit, uint64_t seed) {
  std::vector<int64_t> rows(static_cast<size_t>(m));
  std::iota(rows.begin(), rows.end(), 0);
  if (limit <= 0 || limit >= m) return rows;
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < limit; ++i) {
    int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(m - i));
    std::swap(rows[i], rows[j]);
  }
  rows.resize(static_cast<size_t>(limit));
  std::sort(rows.begin(), rows.end());
  return rows;
}

// Order-preserving map of a float to uint32 (a < b <=> Ordered(a) < Ordered(b), NaN aside).
inline uint32_t OrderedBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}
inline float FromOrderedBits(uint32_t u) {
  u = (u & 0x80000000u) != 0 ? u & 0x7fffffffu : ~u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Sorts (OrderedBits(distance) << 32 | id) values by distance, stably (LSD radix, 4 passes of 8
// bits over the high half): branch-free, unlike a comparison sort of random floats. With the
// input in increasing id order the result is in (distance, id) order.
void SortByDistance(std::vector<uint64_t>* items, std::vector<uint64_t>* scratch) {
  scratch->resize(items->size());
  for (int shift = 32; shift < 64; shift += 8) {
    size_t count[257] = {};
    for (uint64_t v : *items) ++count[((v >> shift) & 0xff) + 1];
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (uint64_t v : *items) (*scratch)[count[(v >> shift) & 0xff]++] = v;
    items->swap(*scratch);
  }
}

// Relative-neighbourhood pruning of pivot p's candidates to at most m, in order of distance to p
// (ties by id); candidates occluded by a kept neighbour top the list up to m afterwards. The
// candidates are what for_each_candidate(add) passes to add(c), repeats allowed (a pivot's lists
// are read where they lie, not copied: copying them took a serial ~26 MB a layer on dd16k).
template <typename ForEachCandidate>
std::vector<int32_t> PruneCandidates(int32_t p, ForEachCandidate&& for_each_candidate,
                                     const float* keys, const std::vector<float>& norms, int d,
                                     int m, float alpha, bool by_ip, int pool_factor) {
  // Distinct candidates other than p in increasing id order, from a per-thread bitmap over the
  // keys (set, then read back word by word); their rows are then read in address order.
  thread_local std::vector<uint64_t> bits;
  thread_local std::vector<uint64_t> by_dist, scratch;
  thread_local std::vector<int32_t> cand;
  const size_t words = (norms.size() + 63) / 64;
  if (bits.size() < words) bits.assign(words, 0);
  size_t lo = words, hi = 0;  // words touched: [lo, hi)
  for_each_candidate([&](int32_t c) {
    bits[c >> 6] |= uint64_t{1} << (c & 63);
    lo = std::min(lo, static_cast<size_t>(c >> 6));
    hi = std::max(hi, static_cast<size_t>(c >> 6) + 1);
  });
  if (lo >= hi) return {};
  bits[p >> 6] &= ~(uint64_t{1} << (p & 63));
  cand.clear();
  for (size_t w = lo; w < hi; ++w) {
    for (uint64_t word = bits[w]; word != 0; word &= word - 1) {
      cand.push_back(static_cast<int32_t>(w * 64 + __builtin_ctzll(word)));
    }
    bits[w] = 0;
  }
  const float* kp = keys + int64_t{p} * d;
  by_dist.clear();
  // p . c for every candidate, four rows at a time (DotGather: bit for bit Dot's), then the
  // distance as PruneDistance computes it from that dot.
  thread_local std::vector<float> dots;
  dots.resize(cand.size());
  constexpr size_t kAhead = 8;  // candidate rows are scattered over the keys: prefetch them
  for (size_t i = 0; i < cand.size(); i += 4) {
    for (size_t a = i + kAhead; a < std::min(cand.size(), i + kAhead + 4); ++a) {
      const char* row = reinterpret_cast<const char*>(keys + int64_t{cand[a]} * d);
      for (int64_t b = 0; b < int64_t{d} * 4; b += 64) __builtin_prefetch(row + b);
    }
    const int count = static_cast<int>(std::min<size_t>(4, cand.size() - i));
    DotGather(kp, keys, cand.data() + i, count, d, dots.data() + i);
  }
  for (size_t i = 0; i < cand.size(); ++i) {
    const int32_t c = cand[i];
    const float dist = by_ip ? -dots[i] : norms[p] + norms[c] - 2.0f * dots[i];
    by_dist.push_back(uint64_t{OrderedBits(dist)} << 32 | static_cast<uint32_t>(c));
  }
  SortByDistance(&by_dist, &scratch);
  // Only the pool_factor * m nearest go through the O(candidates x m) occlusion test: a pivot
  // chosen by many queries has thousands of candidates, and the far ones are rarely kept (Vamana
  // prunes a pool of similar size).
  const size_t pool = std::min(by_dist.size(), static_cast<size_t>(pool_factor) * m);
  std::vector<int32_t> kept, occluded;
  const float alpha2 = by_ip ? 1.0f : alpha * alpha;  // alpha scales L2 distances only
  for (size_t i = 0; i < pool && static_cast<int>(kept.size()) < m; ++i) {
    if (i + 4 < pool) {
      const char* row =
          reinterpret_cast<const char*>(keys + int64_t{static_cast<int32_t>(by_dist[i + 4])} * d);
      for (int64_t b = 0; b < int64_t{d} * 4; b += 64) __builtin_prefetch(row + b);
    }
    const float dist_pc = FromOrderedBits(static_cast<uint32_t>(by_dist[i] >> 32));
    const int32_t c = static_cast<int32_t>(static_cast<uint32_t>(by_dist[i]));
    const float* kc = keys + int64_t{c} * d;
    bool is_occluded = false;
    for (int32_t s : kept) {  // in order: the first occluder decides
      const float dot = Dot(keys + int64_t{s} * d, kc, d);
      if (alpha2 * (by_ip ? -dot : norms[s] + norms[c] - 2.0f * dot) < dist_pc) {
        is_occluded = true;
        break;
      }
    }
    (is_occluded ? occluded : kept).push_back(c);
  }
  for (size_t i = 0; i < occluded.size() && static_cast<int>(kept.size()) < m; ++i) {
    kept.push_back(occluded[i]);
  }
  return kept;
}

struct QueueEntry {
  float score;
  int32_t id;
  bool expanded;
};

// The reverse edges of the first forward_size[p] entries of every list (which only grow at the
// back meanwhile): the same edges, in the same order, as AddReverseEdges over a copy of them.
void AddReverseEdgesOfPrefixes(const std::vector<int32_t>& forward_size, int max_degree,
                               AdjacencyLists* adj) {
  for (size_t p = 0; p < adj->size(); ++p) {
    for (int32_t i = 0; i < forward_size[p]; ++i) {
      auto& back = (*adj)[(*adj)[p][i]];
      if (static_cast<int>(back.size()) < max_degree &&
          std::find(back.begin(), back.end(), static_cast<int32_t>(p)) == back.end()) {
        back.push_back(static_cast<int32_t>(p));
      }
    }
  }
}

void AddReverseEdges(const AdjacencyLists& forward, int max_degree, AdjacencyLists* adj) {
  for (size_t p = 0; p < forward.size(); ++p) {
    for (int32_t c : forward[p]) {
      auto& back = (*adj)[c];
      if (static_cast<int>(back.size()) < max_degree &&
          std::find(back.begin(), back.end(), static_cast<int32_t>(p)) == back.end()) {
        back.push_back(static_cast<int32_t>(p));
      }
    }
  }
}

// Steps 2 and 3 of the recipe in the header: pivots, pruning, reverse edges.
AdjacencyLists ProjectOntoKeys(const std::vector<int32_t>& knn, int nn, const float* keys,
                               int64_t n, int d, const std::vector<float>& norms,
                               const GraphIndexOptions& options) {
  // Pivot p's candidates: the other N - 1 keys of every sampled query that has p among its best
  // `pivots`. refs[first[p], first[p + 1]) = the places j * nn + r of p in knn (query j, rank r).
  const int64_t queries = static_cast<int64_t>(knn.size()) / nn;
  const int pivots = std::min(options.pivots_per_query, nn);
  std::vector<int64_t> first(static_cast<size_t>(n) + 1, 0);
  for (int64_t j = 0; j < queries; ++j) {
    for (int r = 0; r < pivots; ++r) ++first[knn[j * nn + r] + 1];
  }
  for (int64_t p = 0; p < n; ++p) first[p + 1] += first[p];
  std::vector<int64_t> refs(static_cast<size_t>(first[n]));
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t j = 0; j < queries; ++j) {
      for (int r = 0; r < pivots; ++r) refs[next[knn[j * nn + r]]++] = j * nn + r;
    }
  }
  AdjacencyLists adj(static_cast<size_t>(n));
  tbb::parallel_for(int64_t{0}, n, [&](int64_t p) {
    if (first[p] == first[p + 1]) return;
    const auto for_each_candidate = [&](auto&& add) {
      for (int64_t i = first[p]; i < first[p + 1]; ++i) {
        const int32_t* row = knn.data() + refs[i] / nn * nn;
        const int r = static_cast<int>(refs[i] % nn);
        for (int t = 0; t < nn; ++t) {
          if (t != r) add(row[t]);
        }
      }
    };
    adj[p] = PruneCandidates(static_cast<int32_t>(p), for_each_candidate, keys, norms, d,
                             options.max_degree, options.prune_alpha, options.prune_by_ip,
                             options.prune_pool);
  });
  std::vector<int32_t> forward_size(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) forward_size[p] = static_cast<int32_t>(adj[p].size());
  AddReverseEdgesOfPrefixes(forward_size, options.max_degree, &adj);
  return adj;
}

// Marks everything reachable from `start` (iterative DFS).
void MarkReachable(const AdjacencyLists& adj, int32_t start, std::vector<char>* reached) {
  std::vector<int32_t> stack = {start};
  (*reached)[start] = 1;
  while (!stack.empty()) {
    int32_t u = stack.back();
    stack.pop_back();
    for (int32_t v : adj[u]) {
      if (!(*reached)[v]) {
        (*reached)[v] = 1;
        stack.push_back(v);
      }
    }
  }
}

// The beam search shared by Search and the connectivity pass: on return scratch->queue_ holds
// the best `queue_size` keys seen, best first. `neighbors(u)` yields u's out-neighbours.
template <typename NeighborsFn>
int64_t BeamSearch(const float* keys, int64_t n, int d, std::span<const int32_t> entries,
                   const float* q, int queue_size, NeighborsFn neighbors,
                   std::vector<uint32_t>& visited, uint32_t& epoch, auto& queue) {
  if (visited.size() != static_cast<size_t>(n)) visited.assign(static_cast<size_t>(n), 0);
  if (++epoch == 0) {  // wrapped: clear the marks once every 2^32 searches
    std::fill(visited.begin(), visited.end(), 0);
    epoch = 1;
  }
  queue.clear();
  int64_t scanned = 0;
  for (int32_t e : entries) {  // distinct keys by construction
    const float score = Dot(q, keys + int64_t{e} * d, d);
    visited[e] = epoch;
    ++scanned;
    if (static_cast<int>(queue.size()) >= queue_size && score <= queue.back().score) continue;
    auto at = std::upper_bound(queue.begin(), queue.end(), score,
                               [](float x, const auto& entry) { return x > entry.score; });
    queue.insert(at, {score, e, false});
    if (static_cast<int>(queue.size()) > queue_size) queue.pop_back();
  }
  int32_t fresh[256];
  size_t cur = 0;
  while (cur < queue.size()) {
    if (queue[cur].expanded) {
      ++cur;
      continue;
    }
    queue[cur].expanded = true;
    int num_fresh = 0;
    for (int32_t v : neighbors(queue[cur].id)) {
      if (visited[v] == epoch || num_fresh == 256) continue;
      visited[v] = epoch;
      fresh[num_fresh++] = v;
      __builtin_prefetch(keys + int64_t{v} * d);
    }
    size_t next = cur + 1;
    float fresh_scores[256];
    DotGather(q, keys, fresh, num_fresh, d, fresh_scores);
    for (int i = 0; i < num_fresh; ++i) {
      const float score = fresh_scores[i];
      ++scanned;
      if (static_cast<int>(queue.size()) >= queue_size && score <= queue.back().score) continue;
      auto at = std::upper_bound(queue.begin(), queue.end(), score,
                                 [](float x, const auto& e) { return x > e.score; });
      const size_t pos = static_cast<size_t>(at - queue.begin());
      queue.insert(at, {score, fresh[i], false});
      if (static_cast<int>(queue.size()) > queue_size) queue.pop_back();
      next = std::min(next, pos);
    }
    cur = next;
  }
  return scanned;
}

// Step 3b: key-key refinement. Each key searches the projected graph (a snapshot, so the keys
// can go in parallel and the result stays deterministic) with its own vector; the pruned results
// fill its free slots, and reverse edges are added for the new edges.
void Refine(const float* keys, int64_t n, int d, std::span<const int32_t> entries,
            const std::vector<float>& norms, const GraphIndexOptions& options,
            AdjacencyLists* adj) {
  const AdjacencyLists snapshot = *adj;
  const auto neighbors = [&snapshot](int32_t u) -> const std::vector<int32_t>& {
    return snapshot[u];
  };
  AdjacencyLists added(static_cast<size_t>(n));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 64), [&](const auto& range) {
    std::vector<uint32_t> visited;
    uint32_t epoch = 0;
    std::vector<QueueEntry> queue;
    for (int64_t u = range.begin(); u < range.end(); ++u) {
      const int free_slots = options.max_degree - static_cast<int>(snapshot[u].size());
      if (free_slots <= 0) continue;
      BeamSearch(keys, n, d, entries, keys + u * d, options.refine_queue, neighbors, visited, epoch,
                 queue);
      std::vector<int32_t> cand;
      for (const QueueEntry& e : queue) {
        if (std::find(snapshot[u].begin(), snapshot[u].end(), e.id) == snapshot[u].end()) {
          cand.push_back(e.id);
        }
      }
      const auto for_each_candidate = [&cand](auto&& add) {
        for (int32_t c : cand) add(c);
      };
      added[u] =
          PruneCandidates(static_cast<int32_t>(u), for_each_candidate, keys, norms, d, free_slots,
                          options.prune_alpha, options.prune_by_ip, options.prune_pool);
    }
  });
  for (int64_t u = 0; u < n; ++u) {
    (*adj)[u].insert((*adj)[u].end(), added[u].begin(), added[u].end());
  }
  AddReverseEdges(added, options.max_degree, adj);
}

// Step 5: the pivots of `count` sampled queries spread evenly over the sample, deduplicated; with
// count = 1 (or no neighbour lists), the best key of the mean sampled query.
std::vector<int32_t> EntryPoints(const float* keys, int64_t n, int d, const float* queries,
                                 const std::vector<int64_t>& rows, const std::vector<int32_t>& knn,
                                 int nn, int count) {
  if (count > 1 && !knn.empty()) {
    const int64_t m = static_cast<int64_t>(rows.size());
    std::vector<int32_t> entries;
    std::vector<char> taken(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < count && i < m; ++i) {
      const int32_t pivot = knn[(i * m / count) * nn];
      if (!taken[pivot]) {
        taken[pivot] = 1;
        entries.push_back(pivot);
      }
    }
    return entries;
  }
  std::vector<float> mean(static_cast<size_t>(d), 0.0f);
  for (int64_t r : rows) {
    for (int i = 0; i < d; ++i) mean[i] += queries[r * d + i];
  }
  std::vector<float> affinity(static_cast<size_t>(n));
  DotRows(mean.data(), keys, n, d, affinity.data());
  return {TopKIndices(affinity.data(), n, 1)[0]};
}
}  // namespace

std::vector<int32_t> TopKIndices(const float* scores, int64_t n, int k) {
  const int64_t kk = std::min<int64_t>(std::max(k, 0), n);
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [scores](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  if (kk < n) std::nth_element(idx.begin(), idx.begin() + kk, idx.end(), better);
  idx.resize(static_cast<size_t>(kk));
  std::sort(idx.begin(), idx.end(), better);
  return idx;
}

absl::StatusOr<GraphIndex> GraphIndex::Build(const float* keys, int64_t n, const float* queries,
                                             int64_t m, int d, const GraphIndexOptions& options) {
  if (n < 1 || m < 1 || d < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("graph index: need keys, queries and a dim (n=", n, " m=", m, " d=", d, ")"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("graph index: more than 2^31 keys");
  }
  if (options.query_neighbors < 2 || options.max_degree < 1 || options.max_degree > 256 ||
      options.connect_queue < 1 || options.refine_queue < 0 || options.max_queries < 0 ||
      options.entry_points < 1 || options.position_links < 0 || options.position_links > 64 ||
      options.recent_entries < 0 || options.recent_entries > 4096 || options.pivots_per_query < 1 ||
      options.prune_pool < 1 || !(options.prune_alpha > 0.0f)) {
    return absl::InvalidArgumentError(
        "graph index: need query_neighbors >= 2, 1 <= max_degree <= 256, connect_queue >= 1, "
        "refine_queue >= 0, "
        "max_queries >= 0, entry_points >= 1, 0 <= position_links <= 64, "
        "0 <= recent_entries <= 4096, pivots_per_query >= 1, prune_pool >= 1, prune_alpha > 0");
  }
  using Clock = std::chrono::steady_clock;
  const auto since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  const Clock::time_point start = Clock::now();
  const double cpu_start = ProcessCpuSeconds();
  GraphIndex g;
  g.n_ = n;
  g.d_ = d;
  g.keys_.assign(keys, keys + n * d);
  const std::vector<int64_t> rows = SampleRows(m, options.max_queries, options.seed);
  const int nn = static_cast<int>(std::min<int64_t>(options.query_neighbors, n));
  std::vector<float> norms(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) norms[i] = Dot(keys + i * d, keys + i * d, d);
  AdjacencyLists adj;
  std::vector<int32_t> knn;
  Clock::time_point t = Clock::now();
  double cpu = ProcessCpuSeconds();
  const auto cpu_since = [&cpu]() {
    const double now = ProcessCpuSeconds(), spent = now - cpu;
    cpu = now;
    return spent;
  };
  if (nn >= 2) {
    std::vector<float> sample(rows.size() * static_cast<size_t>(d));
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(queries + rows[i] * d, d, sample.data() + i * d);
    }
    knn.resize(rows.size() * static_cast<size_t>(nn));
    const int64_t m_sample = static_cast<int64_t>(rows.size());
    if (options.exact_topn &&
        options.exact_topn(keys, n, sample.data(), m_sample, d, nn, knn.data()).ok()) {
      g.profile_.topn_elsewhere = true;
    } else {
      KVWAVE_RETURN_IF_ERROR(
          options.blocked_topn
              ? ExactTopN(keys, n, sample.data(), m_sample, d, nn, knn.data())
              : ExactTopNRowwise(keys, n, sample.data(), m_sample, d, nn, knn.data()));
    }
    g.profile_.exact_neighbors = since(t);
    g.profile_.cpu_exact_neighbors = cpu_since();
    t = Clock::now();
    adj = ProjectOntoKeys(knn, nn, keys, n, d, norms, options);
  } else {
    adj.resize(static_cast<size_t>(n));
  }
  for (int64_t i = 0; i < n; ++i) {  // token-order links: attention favours runs of positions
    for (int64_t j = std::max<int64_t>(0, i - options.position_links);
         j <= std::min(n - 1, i + options.position_links); ++j) {
      if (j != i && std::find(adj[i].begin(), adj[i].end(), j) == adj[i].end()) {
        adj[i].push_back(static_cast<int32_t>(j));
      }
    }
  }
  g.entries_ = EntryPoints(keys, n, d, queries, rows, knn, nn, options.entry_points);
  g.profile_.project = since(t);
  g.profile_.cpu_project = cpu_since();
  t = Clock::now();
  if (options.refine_queue > 0) Refine(keys, n, d, g.entries_, norms, options, &adj);
  g.profile_.refine = since(t);
  g.profile_.cpu_refine = cpu_since();
  t = Clock::now();
  g.Connect(&adj, options);
  g.profile_.connect = since(t);
  g.search_entries_ = g.entries_;
  for (int64_t i = n - 1; i >= std::max<int64_t>(0, n - options.recent_entries); --i) {
    const int32_t key = static_cast<int32_t>(i);
    if (std::find(g.entries_.begin(), g.entries_.end(), key) == g.entries_.end()) {
      g.search_entries_.push_back(key);
    }
  }
  g.offsets_.assign(1, 0);
  for (const auto& list : adj) {
    g.targets_.insert(g.targets_.end(), list.begin(), list.end());
    g.offsets_.push_back(static_cast<int64_t>(g.targets_.size()));
  }
  g.profile_.total = since(start);
  g.profile_.process_cpu = ProcessCpuSeconds() - cpu_start;
  return g;
}

void GraphIndex::Connect(std::vector<std::vector<int32_t>>* adj, const GraphIndexOptions& options) {
  std::vector<char> reached(static_cast<size_t>(n_), 0);
  MarkReachable(*adj, entries_.front(), &reached);
  GraphSearchScratch scratch;
  const auto neighbors = [adj](int32_t u) -> const std::vector<int32_t>& { return (*adj)[u]; };
  for (int32_t u = 0; u < n_; ++u) {
    if (reached[u]) continue;
    const float* ku = keys_.data() + int64_t{u} * d_;
    BeamSearch(keys_.data(), n_, d_, std::span<const int32_t>(entries_), ku, options.connect_queue,
               neighbors, scratch.visited_, scratch.epoch_, scratch.queue_);
    int32_t from = scratch.queue_.front().id;
    for (const auto& e : scratch.queue_) {
      if (static_cast<int>((*adj)[e.id].size()) < options.max_degree) {
        from = e.id;
        break;
      }
    }
    (*adj)[from].push_back(u);
    ++connect_edges_;
    auto& out = (*adj)[u];
    if (static_cast<int>(out.size()) < options.max_degree &&
        std::find(out.begin(), out.end(), from) == out.end()) {
      out.push_back(from);
    }
    MarkReachable(*adj, u, &reached);
  }
}

namespace {

absl::Status CheckKeyList(const std::vector<int32_t>& keys, int64_t n, const char* what) {
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (int32_t k : keys) {
    if (k < 0 || k >= n)
      return absl::InvalidArgumentError(absl::StrCat("graph: ", what, " out of range"));
    if (seen[k]++) return absl::InvalidArgumentError(absl::StrCat("graph: ", what, " repeated"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<GraphIndex> GraphIndex::FromParts(const float* keys, int64_t n, int d,
                                                 GraphParts parts) {
  if (n < 1 || d < 1 || parts.n != n || parts.d != d) {
    return absl::InvalidArgumentError(absl::StrCat("graph: stored for n=", parts.n, " d=", parts.d,
                                                   ", keys have n=", n, " d=", d));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("graph: more than 2^31 keys");
  }
  if (parts.offsets.size() != static_cast<size_t>(n) + 1 || parts.offsets.front() != 0 ||
      parts.offsets.back() != static_cast<int64_t>(parts.targets.size())) {
    return absl::InvalidArgumentError("graph: offsets do not match the edges");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (parts.offsets[i + 1] < parts.offsets[i]) {
      return absl::InvalidArgumentError("graph: offsets decrease");
    }
  }
  for (int32_t t : parts.targets) {
    if (t < 0 || t >= n) return absl::InvalidArgumentError("graph: edge target out of range");
  }
  if (parts.entries.empty() || parts.search_entries.size() < parts.entries.size() ||
      !std::equal(parts.entries.begin(), parts.entries.end(), parts.search_entries.begin())) {
    return absl::InvalidArgumentError("graph: search entries must start with the entry points");
  }
  KVWAVE_RETURN_IF_ERROR(CheckKeyList(parts.search_entries, n, "search entry"));
  if (parts.connect_edges < 0 || parts.connect_edges > static_cast<int64_t>(parts.targets.size())) {
    return absl::InvalidArgumentError("graph: connect edge count out of range");
  }
  GraphIndex g;
  g.n_ = n;
  g.d_ = d;
  g.keys_.assign(keys, keys + n * d);
  g.entries_ = std::move(parts.entries);
  g.search_entries_ = std::move(parts.search_entries);
  g.offsets_ = std::move(parts.offsets);
  g.targets_ = std::move(parts.targets);
  g.connect_edges_ = parts.connect_edges;
  return g;
}

GraphParts GraphIndex::ToParts() const {
  GraphParts parts;
  parts.n = n_;
  parts.d = d_;
  parts.offsets = offsets_;
  parts.targets = targets_;
  parts.entries = entries_;
  parts.search_entries = search_entries_;
  parts.connect_edges = connect_edges_;
  return parts;
}

GraphSearchResult GraphIndex::Search(const float* q, int k, int queue_size,
                                     GraphSearchScratch* scratch) const {
  GraphSearchResult result;
  k = static_cast<int>(std::min<int64_t>(std::max(k, 1), n_));
  queue_size = static_cast<int>(std::clamp<int64_t>(queue_size, k, n_));
  const auto neighbors = [this](int32_t u) { return Neighbors(u); };
  result.scanned =
      BeamSearch(keys_.data(), n_, d_, std::span<const int32_t>(search_entries_), q, queue_size,
                 neighbors, scratch->visited_, scratch->epoch_, scratch->queue_);
  const size_t count = std::min<size_t>(static_cast<size_t>(k), scratch->queue_.size());
  result.ids.reserve(count);
  result.scores.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    result.ids.push_back(scratch->queue_[i].id);
    result.scores.push_back(scratch->queue_[i].score);
  }
  return result;
}

GraphSearchResult GraphIndex::Search(const float* q, int k, int queue_size) const {
  GraphSearchScratch scratch;
  return Search(q, k, queue_size, &scratch);
}

int64_t GraphIndex::MemoryBytes() const {
  return static_cast<int64_t>(keys_.size() * sizeof(float) + offsets_.size() * sizeof(int64_t) +
                              targets_.size() * sizeof(int32_t));
}

absl::Status SearchHeads(std::span<const GraphIndex* const> graphs, const float* queries,
                         int q_heads, int k, int queue_size, std::vector<GraphSearchResult>* out) {
  const int num_graphs = static_cast<int>(graphs.size());
  if (num_graphs < 1 || q_heads < 1 || q_heads % num_graphs != 0 || k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SearchHeads: ", q_heads, " query heads over ", num_graphs, " graphs, k=", k));
  }
  for (const GraphIndex* g : graphs) {
    if (g == nullptr) return absl::InvalidArgumentError("SearchHeads: null graph");
    if (g->dim() != graphs[0]->dim()) return absl::InvalidArgumentError("SearchHeads: dims differ");
  }
  const int group = q_heads / num_graphs;
  const int d = graphs[0]->dim();
  out->assign(static_cast<size_t>(q_heads), {});
  tbb::parallel_for(0, q_heads, [&](int h) {
    GraphSearchScratch scratch;
    (*out)[h] = graphs[h / group]->Search(queries + int64_t{h} * d, k, queue_size, &scratch);
  });
  return absl::OkStatus();
}

}  // namespace kvwave::index
