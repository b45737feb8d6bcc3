// kvwave-bench attend: tripartite Attend of the engine on a real trace, against exact attention.
//
// For each trace layer: open a context, append keys/values of positions [0, N - queries), Seal,
// then use the last `queries` positions as decode queries. For each (retrieval, estimation)
// budget it reports, averaged over layers, KV heads, query heads and queries:
//   err     relative L2 error of the output vs float64 exact attention over the same keys
//   recall  |exact top-k  ∩  tokens attended exactly (steady + retrieval zone)| / k, taken from
//           Retrieve at the same cluster budget, which ranks by centroid (so not two_pass's set)
//   us      Attend latency per (layer, KV head), one thread; "full" = the 100% budget
//   scanned keys attended exactly plus those a second ranking pass scored (attend.rank =
//           two_pass), per key
// A budget may name its ranking, retrieval:estimation:rank (centroid | two_pass | auto; default:
// the settings' default); each ranking gets its own engine over the same keys.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "bench/subcommand.h"
#include "client/trace_file.h"
#include "engine/engine.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Row {
  double retrieval, estimation;
  std::string rank;
  double err = 0, recall = 0, us = 0, scanned = 0, scored = 0;
  int64_t samples = 0, calls = 0;
};

// Float64 exact attention of one query head over keys [0, n) of one (layer, KV head), and its
// top-k.
void Exact(const trace::Trace& tr, const std::vector<float>& keys, const std::vector<float>& vals,
           int64_t n, const float* q, int k, std::vector<double>& out, std::vector<int64_t>& top) {
  const int64_t d = tr.head_dim;
  std::vector<double> logit(n);
  double m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += double{q[j]} * keys[t * d + j];
    logit[t] = dot / std::sqrt(double(d));
    m = std::max(m, logit[t]);
  }
  out.assign(d, 0.0);
  double z = 0;
  for (int64_t t = 0; t < n; ++t) {
    double w = std::exp(logit[t] - m);
    z += w;
    for (int64_t j = 0; j < d; ++j) out[j] += w * vals[t * d + j];
  }
  for (auto& x : out) x /= z;
  std::vector<int64_t> idx(n);
  for (int64_t t = 0; t < n; ++t) idx[t] = t;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return logit[a] > logit[b]; });
  top.assign(idx.begin(), idx.begin() + k);
}

int Run(int argc, char** argv) {
  CLI::App app{"tripartite Attend vs exact attention on a trace"};
  std::string prefix = trace::DefaultTracePrefix(KVWAVE_SOURCE_DIR);
  int queries = 256, topk = 100;
  std::string budgets = "0.018:0.232,0.018:0,0.05:0.232,0.05:0,0.1:0.232,0.1:0,0.25:0.25,1:0";
  std::string json_path, layers_text;
  app.add_option("--layers", layers_text,
                 "trace layer indices (first axis), e.g. 1,2; default all");
  app.add_option("--trace", prefix, "trace prefix (PREFIX_{q,k,v}.npy)");
  app.add_option("--queries", queries, "last positions used as decode queries");
  app.add_option("--topk", topk, "k of recall@k");
  app.add_option("--budgets", budgets,
                 "retrieval:estimation[:rank] triples, comma separated (rank: centroid, two_pass, "
                 "auto)");
  app.add_option("--json", json_path, "write the rows as JSON");
  CLI11_PARSE(app, argc, argv);
  if (prefix.empty()) {
    std::fprintf(stderr, "no trace: pass --trace PREFIX (../shared/data/traces/dd16k is absent)\n");
    return 2;
  }
  auto tr = trace::Trace::Open(prefix);
  if (!tr.ok()) {
    std::fprintf(stderr, "%s\n", std::string(tr.status().message()).c_str());
    return 2;
  }
  std::vector<Row> rows;
  for (absl::string_view pair : absl::StrSplit(budgets, ',')) {
    std::vector<std::string> parts = absl::StrSplit(pair, ':');
    rows.push_back({std::stod(parts.at(0)), parts.size() > 1 ? std::stod(parts[1]) : 0.0,
                    parts.size() > 2 ? parts[2] : config::Settings{}.rank});
    if (rows.back().rank != "centroid" && rows.back().rank != "two_pass" &&
        rows.back().rank != "auto") {
      std::fprintf(stderr, "--budgets: unknown rank '%s'\n", rows.back().rank.c_str());
      return 2;
    }
  }
  PrintEnvironmentHeader();
  const int64_t n = tr->tokens - queries, d = tr->head_dim, g = tr->q_heads / tr->kv_heads;
  std::printf(
      "# trace %s: %lld layers, %lld tokens, %lld/%lld heads, d=%lld; keys [0,%lld), "
      "queries = last %d positions\n",
      prefix.c_str(), (long long)tr->layers, (long long)tr->tokens, (long long)tr->q_heads,
      (long long)tr->kv_heads, (long long)d, (long long)n, queries);
  // One engine per ranking named by the rows.
  std::map<std::string, std::unique_ptr<engine::Engine>> engines;
  for (const Row& r : rows) {
    if (engines.count(r.rank)) continue;
    config::Settings settings;
    settings.compute_threads = 1;
    settings.rank = r.rank;
    engines[r.rank] = engine::Engine::Create(settings).value();
  }
  store::ModelShape shape{1, static_cast<int32_t>(tr->q_heads), static_cast<int32_t>(tr->kv_heads),
                          static_cast<int32_t>(d), DType::kF16};
  double index_seconds = 0;
  std::vector<int64_t> layers;
  for (absl::string_view l : absl::StrSplit(layers_text, ',', absl::SkipEmpty())) {
    layers.push_back(std::stoll(std::string(l)));
    if (layers.back() < 0 || layers.back() >= tr->layers) {
      std::fprintf(stderr, "--layers: %lld out of range\n", (long long)layers.back());
      return 2;
    }
  }
  if (layers.empty()) {
    for (int64_t l = 0; l < tr->layers; ++l) layers.push_back(l);
  }
  for (int64_t layer : layers) {
    std::map<std::string, engine::ContextId> ids;
    const int64_t token_elems = tr->kv_heads * d;
    auto* kbase =
        static_cast<const std::byte*>(tr->k.data()) + layer * tr->tokens * token_elems * 2;
    auto* vbase =
        static_cast<const std::byte*>(tr->v.data()) + layer * tr->tokens * token_elems * 2;
    absl::Status st;
    for (auto& [rank, engine] : engines) {
      const engine::ContextId id = engine->Open({shape}).value().id;
      ids[rank] = id;
      auto t0 = Clock::now();
      st = engine->Append(id, 0, n, {kbase, size_t(n * token_elems * 2)},
                          {vbase, size_t(n * token_elems * 2)});
      if (st.ok()) st = engine->Seal(id);
      index_seconds += std::chrono::duration<double>(Clock::now() - t0).count() / engines.size();
      if (!st.ok()) break;
    }
    if (!st.ok()) {
      std::fprintf(stderr, "append: %s\n", st.ToString().c_str());
      return 1;
    }
    for (int64_t h = 0; h < tr->kv_heads; ++h) {
      std::vector<float> keys(n * d), vals(n * d);
      for (int64_t t = 0; t < n; ++t) {
        tr->k.CopyFloats(tr->KvIndex(layer, t, h), d, keys.data() + t * d);
        tr->v.CopyFloats(tr->KvIndex(layer, t, h), d, vals.data() + t * d);
      }
      for (int qi = 0; qi < queries; ++qi) {
        const int64_t pos = n + qi;
        std::vector<float> q(tr->q_heads * d);
        tr->q.CopyFloats(tr->QIndex(layer, pos, 0), tr->q_heads * d, q.data());
        std::vector<std::vector<double>> want(g);
        std::vector<std::vector<int64_t>> top(g);
        for (int64_t j = 0; j < g; ++j)
          Exact(*tr, keys, vals, n, &q[(h * g + j) * d], topk, want[j], top[j]);
        for (Row& row : rows) {
          engine::Engine* engine = engines[row.rank].get();
          const engine::ContextId id = ids[row.rank];
          std::vector<float> out(q.size()), lse(tr->q_heads);
          engine::AttendStats stats;
          auto a = Clock::now();
          st = engine->Attend(id, 0, q, {row.retrieval, row.estimation}, out, lse, &stats);
          row.us +=
              std::chrono::duration<double, std::micro>(Clock::now() - a).count() / tr->kv_heads;
          ++row.calls;
          engine::RetrieveOptions ro;
          ro.k = topk;
          ro.cluster_budget = row.retrieval;
          std::vector<int64_t> got(tr->q_heads * topk);
          std::vector<float> scores(got.size());
          engine::RetrieveStats rs;
          if (st.ok()) st = engine->Retrieve(id, 0, q, ro, got, scores, &rs);
          if (!st.ok()) {
            std::fprintf(stderr, "attend: %s\n", st.ToString().c_str());
            return 1;
          }
          for (int64_t j = 0; j < g; ++j) {
            const int64_t qh = h * g + j;
            double num = 0, den = 0;
            for (int64_t x = 0; x < d; ++x) {
              num += std::pow(out[qh * d + x] - want[j][x], 2);
              den += want[j][x] * want[j][x];
            }
            row.err += std::sqrt(num / den);
            std::vector<int64_t> mine(got.begin() + qh * topk, got.begin() + (qh + 1) * topk);
            std::sort(mine.begin(), mine.end());
            int hits = 0;
            for (int64_t t : top[j]) hits += std::binary_search(mine.begin(), mine.end(), t);
            row.recall += double(hits) / topk;
            row.scanned += double(stats.steady_tokens + stats.retrieved_tokens) / n / tr->kv_heads;
            row.scored += double(stats.scored_tokens) / n / tr->kv_heads;
            ++row.samples;
          }
        }
      }
    }
    for (auto& [rank, engine] : engines) (void)engine->Close(ids[rank]);
  }
  std::printf(
      "# index build (append + seal, one thread): %.1f ms per (layer, KV head) of %lld tokens\n",
      1e3 * index_seconds / (layers.size() * tr->kv_heads), (long long)n);
  const double full_us = rows.back().retrieval >= 1.0 ? rows.back().us / rows.back().calls : 0;
  std::printf("%-10s %-10s %-9s %-12s %-10s %-12s %-12s %-10s %-10s\n", "retrieval", "estimation",
              "rank", "rel_err", "recall@k", "exact_frac", "scored_frac", "us", "speedup");
  std::string json = "[";
  for (const Row& r : rows) {
    const double us = r.us / r.calls;
    std::printf("%-10.3f %-10.3f %-9s %-12.5f %-10.4f %-12.4f %-12.4f %-10.1f %-10.2f\n",
                r.retrieval, r.estimation, r.rank.c_str(), r.err / r.samples, r.recall / r.samples,
                r.scanned / r.samples, r.scored / r.samples, us, full_us > 0 ? full_us / us : 0.0);
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"retrieval\": %g, \"estimation\": %g, \"rank\": \"%s\", \"rel_err\": %.6f, "
                  "\"recall\": %.5f, \"exact_fraction\": %.5f, \"scored_fraction\": %.5f, "
                  "\"us_per_head\": %.2f}",
                  json.size() > 1 ? ", " : "", r.retrieval, r.estimation, r.rank.c_str(),
                  r.err / r.samples, r.recall / r.samples, r.scanned / r.samples,
                  r.scored / r.samples, us);
    json += buf;
  }
  json += "]\n";
  if (!json_path.empty()) std::ofstream(json_path) << json;
  return 0;
}

const bool kRegistered =
    Register({"attend", "tripartite Attend vs exact attention on a trace", &Run});

}  // namespace
}  // namespace kvwave::bench
