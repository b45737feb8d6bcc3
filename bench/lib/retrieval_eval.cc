#include "bench/lib/retrieval_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "config/status_macros.h"
#include "index/distance.h"
#include "index/graph_index.h"

namespace kvwave::bench {

absl::StatusOr<GroupData> LoadGroup(const trace::Trace& trace, int64_t layer, int64_t kv_head,
                                    int64_t num_queries) {
  if (layer < 0 || layer >= trace.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer index ", layer, " out of range [0, ", trace.layers, ")"));
  }
  if (kv_head < 0 || kv_head >= trace.kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("KV head ", kv_head, " out of range"));
  }
  if (num_queries < 1 || num_queries >= trace.tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("--queries ", num_queries, " must be in [1, ", trace.tokens - 1, "]"));
  }
  GroupData g;
  g.d = static_cast<int>(trace.head_dim);
  g.n = trace.tokens - num_queries;
  g.num_queries = num_queries;
  const int64_t d = g.d;
  g.keys.resize(static_cast<size_t>(g.n * d));
  g.held_out_keys.resize(static_cast<size_t>(num_queries * d));
  for (int64_t t = 0; t < trace.tokens; ++t) {
    float* dst = t < g.n ? g.keys.data() + t * d : g.held_out_keys.data() + (t - g.n) * d;
    trace.k.CopyFloats(trace.KvIndex(layer, t, kv_head), d, dst);
  }
  const int64_t group = trace.q_heads / trace.kv_heads;
  for (int64_t j = 0; j < group; ++j) {
    const int64_t h = kv_head * group + j;
    std::vector<float> pre(static_cast<size_t>(g.n * d)), dec(static_cast<size_t>(num_queries * d));
    for (int64_t t = 0; t < trace.tokens; ++t) {
      float* dst = t < g.n ? pre.data() + t * d : dec.data() + (t - g.n) * d;
      trace.q.CopyFloats(trace.QIndex(layer, t, h), d, dst);
    }
    g.prefill.push_back(std::move(pre));
    g.decode.push_back(std::move(dec));
  }
  return g;
}

GroundTruth ExactGroundTruth(const float* keys, int64_t n, int d, const float* queries,
                             int64_t num_queries, int k) {
  GroundTruth truth;
  truth.k = k;
  std::vector<float> scores(static_cast<size_t>(n));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t i = 0; i < num_queries; ++i) {
    index::DotRows(queries + i * d, keys, n, d, scores.data());
    truth.top.push_back(index::TopKIndices(scores.data(), n, k));
    const double max_score = scores[truth.top.back()[0]];
    std::vector<double> e(static_cast<size_t>(n));
    double z = 0;
    for (int64_t j = 0; j < n; ++j) z += e[j] = std::exp((scores[j] - max_score) * scale);
    std::vector<float> w(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) w[j] = static_cast<float>(e[j] / z);
    truth.weight.push_back(std::move(w));
  }
  return truth;
}

absl::Status SweepIndex(AnnIndex* index, const float* queries, int64_t num_queries, int d,
                        int64_t n, const GroundTruth& truth, double build_us,
                        std::vector<SweepPoint>* points) {
  std::vector<int32_t> ids;
  std::vector<char> exact(static_cast<size_t>(n), 0);  // marks the true top-k of one query
  for (int knob : index->Knobs()) {
    index->SetKnob(knob);
    const std::string param = index->KnobLabel(knob);
    auto it = std::find_if(points->begin(), points->end(), [&](const SweepPoint& p) {
      return p.index == index->name() && p.param == param;
    });
    if (it == points->end()) {
      points->push_back({.index = index->name(), .param = param});
      it = points->end() - 1;
    }
    it->build_us += build_us;
    it->build_tokens += static_cast<double>(n);
    it->bytes += static_cast<double>(index->MemoryBytes());
    for (int64_t i = 0; i < num_queries; ++i) {
      int64_t scanned = 0;
      const auto start = std::chrono::steady_clock::now();
      KVWAVE_RETURN_IF_ERROR(index->Search(queries + i * d, truth.k, &ids, &scanned));
      const auto stop = std::chrono::steady_clock::now();
      it->search_us += std::chrono::duration<double, std::micro>(stop - start).count();
      for (int32_t id : truth.top[i]) exact[id] = 1;
      int hits = 0;
      double mass = 0;
      for (int32_t id : ids) {
        hits += exact[id];
        mass += truth.weight[i][id];
      }
      for (int32_t id : truth.top[i]) exact[id] = 0;
      it->recall += static_cast<double>(hits) / truth.k;
      it->mass += mass;
      it->scan_fraction += static_cast<double>(scanned) / static_cast<double>(n);
      ++it->queries;
    }
  }
  return absl::OkStatus();
}

double ScanFractionAtRecall(const std::vector<SweepPoint>& points, const std::string& index,
                            double target) {
  const SweepPoint* prev = nullptr;
  for (const SweepPoint& p : points) {
    if (p.index != index) continue;
    if (p.Recall() >= target) {
      if (prev == nullptr || prev->Recall() >= p.Recall()) return p.ScanFraction();
      const double t = (target - prev->Recall()) / (p.Recall() - prev->Recall());
      return prev->ScanFraction() + t * (p.ScanFraction() - prev->ScanFraction());
    }
    prev = &p;
  }
  return -1.0;
}

double UsAtRecall(const std::vector<SweepPoint>& points, const std::string& index, double target) {
  for (const SweepPoint& p : points) {
    if (p.index == index && p.Recall() >= target) return p.UsPerQuery();
  }
  return -1.0;
}

std::string FormatTable(const std::vector<SweepPoint>& points) {
  std::string out =
      absl::StrFormat("%-11s %-16s %8s %9s %8s %10s %12s %10s\n", "index", "param", "recall",
                      "scan_frac", "mass", "us/query", "build_us/tok", "bytes/tok");
  for (const SweepPoint& p : points) {
    absl::StrAppendFormat(&out, "%-11s %-16s %8.4f %9.4f %8.4f %10.1f %12.2f %10.1f\n", p.index,
                          p.param, p.Recall(), p.ScanFraction(), p.Mass(), p.UsPerQuery(),
                          p.BuildUsPerToken(), p.BytesPerToken());
  }
  return out;
}

absl::Status WriteJson(const std::string& path, const std::vector<SweepPoint>& points) {
  std::ofstream f(path);
  if (!f) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  f << "[\n";
  for (size_t i = 0; i < points.size(); ++i) {
    const SweepPoint& p = points[i];
    f << absl::StrFormat(
        "  {\"index\": \"%s\", \"param\": \"%s\", \"recall\": %.6f, \"scan_fraction\": %.6f, "
        "\"mass\": %.6f, \"us_per_query\": %.3f, \"build_us_per_token\": %.4f, "
        "\"bytes_per_token\": %.2f}%s\n",
        p.index, p.param, p.Recall(), p.ScanFraction(), p.Mass(), p.UsPerQuery(),
        p.BuildUsPerToken(), p.BytesPerToken(), i + 1 < points.size() ? "," : "");
  }
  f << "]\n";
  if (!f.good()) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

absl::Status WritePlot(const std::string& png, const std::string& script, const std::string& title,
                       const std::vector<SweepPoint>& points) {
  // One gnuplot data block per index (separated by two blank lines), named in its first line.
  const std::string data = png + ".tsv";
  {
    std::ofstream f(data);
    if (!f) return absl::InternalError(absl::StrCat(data, ": cannot open for writing"));
    std::string current;
    for (const SweepPoint& p : points) {
      if (p.index != current) {
        if (!current.empty()) f << "\n\n";
        current = p.index;
        f << "# " << p.index << "\n"
          << "scan_fraction\t" << p.index << "\n";
      }
      f << absl::StrFormat("%.6f\t%.6f\n", p.ScanFraction(), p.Recall());
    }
  }
  const std::string command = absl::StrCat("gnuplot -e \"datafile='", data, "'; outfile='", png,
                                           "'; plottitle='", title, "'\" '", script, "'");
  if (std::system(command.c_str()) != 0) {
    return absl::InternalError(absl::StrCat(
        "plot failed: ", command, " (is gnuplot installed? apt-get install gnuplot-nox)"));
  }
  return absl::OkStatus();
}

}  // namespace kvwave::bench
