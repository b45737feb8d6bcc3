#include "index/graph_index.h"

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "index/distance.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvwave::index {
namespace {

using AdjacencyLists = std::vector<std::vector<int32_t>>;

// Rows of the m prefill queries used for the build: all of them, or `limit` drawn without
// replacement (partial Fisher-Yates on mt19937_64, whose sequence the standard fixes), sorted.
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

// out[h * n + i] = qs[h] . keys[i] for 4 queries, 4 keys at a time (16 AVX2 accumulators), so each
// loaded key and query vector feeds 4 FMAs instead of 1. REQUIRES: d % 8 == 0.
void DotBlock4(const float* qs, const float* keys, int64_t n, int d, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256 acc[4][4];
    for (auto& row : acc) {
      for (auto& a : row) a = _mm256_setzero_ps();
    }
    for (int j = 0; j < d; j += 8) {
      __m256 k[4], q[4];
      for (int r = 0; r < 4; ++r) k[r] = _mm256_loadu_ps(keys + (i + r) * d + j);
      for (int h = 0; h < 4; ++h) q[h] = _mm256_loadu_ps(qs + h * d + j);
      for (int h = 0; h < 4; ++h) {
        for (int r = 0; r < 4; ++r) acc[h][r] = _mm256_fmadd_ps(q[h], k[r], acc[h][r]);
      }
    }
    for (int h = 0; h < 4; ++h) {
      // Horizontal sums of the 4 accumulators of query h into one __m128.
      __m256 s01 = _mm256_hadd_ps(acc[h][0], acc[h][1]);
      __m256 s23 = _mm256_hadd_ps(acc[h][2], acc[h][3]);
      __m256 s = _mm256_hadd_ps(s01, s23);
      __m128 sum = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      _mm_storeu_ps(out + h * n + i, sum);
    }
  }
  for (; i < n; ++i) {
    for (int h = 0; h < 4; ++h) out[h * n + i] = Dot(qs + h * d, keys + i * d, d);
  }
}

// out[0, nn) = the nn largest of scores[0, n), best first (ties by lower index), like TopKIndices
// but in one pass: a min-heap of the best nn so far, and an AVX2 compare of 8 scores at a time
// against its smallest, which rejects almost every score (the build's exact top-N of many
// queries over many keys spends most of its time here otherwise). REQUIRES: 1 <= nn <= n.
void TopNInto(const float* scores, int64_t n, int nn, std::vector<std::pair<float, int32_t>>* heap,
              int32_t* out) {
  // Min-heap by (score, then higher index = worse): front() is the entry to replace first.
  const auto worse = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  heap->clear();
  for (int32_t i = 0; i < nn; ++i) heap->emplace_back(scores[i], i);
  std::make_heap(heap->begin(), heap->end(), worse);
  float threshold = heap->front().first;
  const auto offer = [&](int64_t i) {
    if (scores[i] > threshold) {  // equal scores keep the lower index already in the heap
      std::pop_heap(heap->begin(), heap->end(), worse);
      heap->back() = {scores[i], static_cast<int32_t>(i)};
      std::push_heap(heap->begin(), heap->end(), worse);
      threshold = heap->front().first;
    }
  };
  int64_t i = nn;
  for (; i + 8 <= n; i += 8) {
    const __m256 block = _mm256_loadu_ps(scores + i);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(block, _mm256_set1_ps(threshold), _CMP_GT_OQ));
    while (mask != 0) {
      offer(i + __builtin_ctz(static_cast<unsigned>(mask)));
      mask &= mask - 1;
    }
  }
  for (; i < n; ++i) offer(i);
  std::sort_heap(heap->begin(), heap->end(), worse);  // best first
  for (int r = 0; r < nn; ++r) out[r] = (*heap)[r].second;
}

// knn[j * nn + r] = the r-th best key of query rows[j] by q.k (exact). Parallel over query blocks.
std::vector<int32_t> ExactNeighbors(const float* keys, int64_t n, const float* queries,
                                    const std::vector<int64_t>& rows, int d, int nn) {
  constexpr int kBlock = 16;
  const int64_t m = static_cast<int64_t>(rows.size());
  std::vector<int32_t> knn(static_cast<size_t>(m * nn));
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks, 1), [&](const auto& range) {
    std::vector<float> qs(size_t{kBlock} * d), scores(static_cast<size_t>(kBlock * n));
    std::vector<std::pair<float, int32_t>> heap;
    heap.reserve(static_cast<size_t>(nn));
    for (int64_t b = range.begin(); b < range.end(); ++b) {
      const int64_t first = b * kBlock;
      const int count = static_cast<int>(std::min<int64_t>(kBlock, m - first));
      for (int i = 0; i < count; ++i) {
        std::copy_n(queries + rows[first + i] * d, d, qs.data() + int64_t{i} * d);
      }
      if (d % 8 == 0) {
        for (int i = 0; i < count; i += 4) {  // rows past `count` are stale but unused
          DotBlock4(qs.data() + int64_t{i} * d, keys, n, d, scores.data() + i * n);
        }
      } else {
        DotRowsMulti(qs.data(), count, keys, n, d, scores.data());
      }
      for (int i = 0; i < count; ++i) {
        TopNInto(scores.data() + i * n, n, nn, &heap, knn.data() + (first + i) * nn);
      }
    }
  });
  return knn;
}

float SquaredL2(const float* a, const float* b, float norm_a, float norm_b, int d) {
  return norm_a + norm_b - 2.0f * Dot(a, b, d);
}

// "Distance" between keys a and b for pruning: squared L2, or -a.b when pruning by inner product.
float PruneDistance(const float* a, const float* b, float norm_a, float norm_b, int d, bool by_ip) {
  return by_ip ? -Dot(a, b, d) : SquaredL2(a, b, norm_a, norm_b, d);
}

// Relative-neighbourhood pruning of pivot p's candidates to at most m, in order of distance to p;
// candidates occluded by a kept neighbour top the list up to m afterwards.

std::vector<int32_t> PruneCandidates(int32_t p, std::vector<int32_t> cand, const float* keys,
                                     const std::vector<float>& norms, int d, int m, float alpha,
                                     bool by_ip) {
  std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  std::erase(cand, p);
  const float* kp = keys + int64_t{p} * d;
  std::vector<std::pair<float, int32_t>> by_dist;
  by_dist.reserve(cand.size());
  for (int32_t c : cand) {
    by_dist.emplace_back(PruneDistance(kp, keys + int64_t{c} * d, norms[p], norms[c], d, by_ip), c);
  }
  // Only the 8m nearest go through the O(candidates x m) occlusion test: a pivot chosen by many
  // queries has thousands of candidates, and the far ones are rarely kept (Vamana prunes a pool of
  // similar size).
  const size_t pool = std::min(by_dist.size(), static_cast<size_t>(8) * m);
  std::partial_sort(by_dist.begin(), by_dist.begin() + pool, by_dist.end());
  by_dist.resize(pool);
  std::vector<int32_t> kept, occluded;
  const float alpha2 = by_ip ? 1.0f : alpha * alpha;  // alpha scales L2 distances only
  for (const auto& [dist_pc, c] : by_dist) {
    if (static_cast<int>(kept.size()) >= m) break;
    const float* kc = keys + int64_t{c} * d;
    bool is_occluded = false;
    for (int32_t s : kept) {
      if (alpha2 * PruneDistance(keys + int64_t{s} * d, kc, norms[s], norms[c], d, by_ip) <
          dist_pc) {
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
  AdjacencyLists cand(static_cast<size_t>(n));
  const int64_t queries = static_cast<int64_t>(knn.size()) / nn;
  for (int64_t j = 0; j < queries; ++j) {
    const int32_t* row = knn.data() + j * nn;
    cand[row[0]].insert(cand[row[0]].end(), row + 1, row + nn);
  }
  AdjacencyLists adj(static_cast<size_t>(n));
  tbb::parallel_for(int64_t{0}, n, [&](int64_t p) {
    if (!cand[p].empty()) {
      adj[p] = PruneCandidates(static_cast<int32_t>(p), std::move(cand[p]), keys, norms, d,
                               options.max_degree, options.prune_alpha, options.prune_by_ip);
    }
  });
  AddReverseEdges(AdjacencyLists(adj), options.max_degree, &adj);
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
    for (int i = 0; i < num_fresh; ++i) {
      const float score = Dot(q, keys + int64_t{fresh[i]} * d, d);
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
      added[u] = PruneCandidates(static_cast<int32_t>(u), std::move(cand), keys, norms, d,
                                 free_slots, options.prune_alpha, options.prune_by_ip);
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
      options.recent_entries < 0 || options.recent_entries > 4096 ||
      !(options.prune_alpha > 0.0f)) {
    return absl::InvalidArgumentError(
        "graph index: need query_neighbors >= 2, 1 <= max_degree <= 256, connect_queue >= 1, "
        "refine_queue >= 0, "
        "max_queries >= 0, entry_points >= 1, 0 <= position_links <= 64, "
        "0 <= recent_entries <= 4096, prune_alpha > 0");
  }
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
  if (nn >= 2) {
    knn = ExactNeighbors(keys, n, queries, rows, d, nn);
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
  if (options.refine_queue > 0) Refine(keys, n, d, g.entries_, norms, options, &adj);
  g.Connect(&adj, options);
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
