#include "rpc/stats.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvwave::rpc {

void LatencyHistogram::Record(double micros) {
  int i = 0;
  if (micros > 1.0) i = static_cast<int>(std::ceil(4.0 * std::log2(micros)));
  if (i >= kBuckets) i = kBuckets - 1;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(micros * 1000.0), std::memory_order_relaxed);
}

uint64_t LatencyHistogram::Count() const {
  uint64_t n = 0;
  for (const auto& b : buckets_) n += b.load(std::memory_order_relaxed);
  return n;
}

double LatencyHistogram::BucketUpperMicros(int i) { return std::exp2(i / 4.0); }

double LatencyHistogram::Quantile(double q) const {
  const uint64_t n = Count();
  if (n == 0) return 0;
  const auto rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(n)));
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets_[i].load(std::memory_order_relaxed);
    if (seen >= rank && seen > 0) return BucketUpperMicros(i);
  }
  return BucketUpperMicros(kBuckets - 1);
}

double LatencyHistogram::MeanMicros() const {
  const uint64_t n = Count();
  return n == 0 ? 0 : sum_ns_.load(std::memory_order_relaxed) / 1000.0 / static_cast<double>(n);
}

ServerStats::ServerStats() : start_(std::chrono::steady_clock::now()) {}

void ServerStats::RecordOp(uint16_t op, bool ok, double micros, uint64_t bytes_in,
                           uint64_t bytes_out) {
  Op& o = ops_[op <= kMaxOp ? op : 0];
  o.count.fetch_add(1, std::memory_order_relaxed);
  if (!ok) o.errors.fetch_add(1, std::memory_order_relaxed);
  o.bytes_in.fetch_add(bytes_in, std::memory_order_relaxed);
  o.bytes_out.fetch_add(bytes_out, std::memory_order_relaxed);
  o.latency.Record(micros);
}

void ServerStats::Fill(pb::StatsResponse& out) const {
  for (uint16_t i = 0; i <= kMaxOp; ++i) {
    const Op& o = ops_[i];
    const uint64_t count = o.count.load(std::memory_order_relaxed);
    if (count == 0) continue;
    pb::OpStats* s = out.add_ops();
    s->set_op(std::string(OpName(i)));
    s->set_count(count);
    s->set_errors(o.errors.load(std::memory_order_relaxed));
    s->set_p50_us(o.latency.Quantile(0.5));
    s->set_p99_us(o.latency.Quantile(0.99));
    s->set_p999_us(o.latency.Quantile(0.999));
    s->set_mean_us(o.latency.MeanMicros());
    s->set_bytes_in(o.bytes_in.load(std::memory_order_relaxed));
    s->set_bytes_out(o.bytes_out.load(std::memory_order_relaxed));
  }
  out.set_sessions(sessions_.load(std::memory_order_relaxed));
  out.set_sessions_total(sessions_total_.load(std::memory_order_relaxed));
  out.set_frames_rejected(frames_rejected_.load(std::memory_order_relaxed));
  out.set_rss_bytes(ResidentBytes());
  out.set_uptime_s(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
}

namespace {

void Gauge(std::string& out, const char* name, const char* help, double value) {
  absl::StrAppendFormat(&out, "# HELP %s %s\n# TYPE %s gauge\n%s %.17g\n", name, help, name, name,
                        value);
}

}  // namespace

std::string ServerStats::Prometheus(const pb::StatsResponse& s) const {
  std::string out;
  Gauge(out, "kvwave_sessions", "Connected client sessions.", s.sessions());
  Gauge(out, "kvwave_sessions_total", "Sessions accepted since start.", s.sessions_total());
  Gauge(out, "kvwave_contexts", "Open contexts.", s.contexts());
  Gauge(out, "kvwave_memory_used_bytes", "Host bytes held by the store.", s.memory_used_bytes());
  Gauge(out, "kvwave_memory_limit_bytes", "Store memory limit.", s.memory_limit_bytes());
  Gauge(out, "kvwave_segments_sealed", "Segments sealed since start.", s.segments_sealed());
  Gauge(out, "kvwave_tokens_appended", "Tokens appended since start.", s.tokens_appended());
  Gauge(out, "kvwave_prefix_blocks_registered", "Prefix blocks sealed and shared by this daemon.",
        s.prefix_blocks_registered());
  Gauge(out, "kvwave_prefix_blocks_resident", "Shared prefix blocks whose segments are in DRAM.",
        s.prefix_blocks_resident());
  Gauge(out, "kvwave_prefix_blocks_known", "Shared prefix blocks known (in DRAM or on disk).",
        s.prefix_blocks_known());
  Gauge(out, "kvwave_prefix_matched_blocks", "Prefix blocks attached by Open since start.",
        s.prefix_matched_blocks());
  Gauge(out, "kvwave_prefix_evictions", "Prefix blocks evicted from DRAM at the memory limit.",
        s.prefix_evictions());
  Gauge(out, "kvwave_prefix_reloads", "Prefix blocks reloaded from RocksDB.", s.prefix_reloads());
  Gauge(out, "kvwave_persist_bytes_written", "Segment bytes written to RocksDB.",
        s.persist_bytes_written());
  Gauge(out, "kvwave_persist_corrupt_records",
        "Corrupt records detected, dropped and never served.", s.persist_corrupt_records());
  Gauge(out, "kvwave_persist_errors", "Prefix blocks that could not be persisted.",
        s.persist_errors());
  Gauge(out, "kvwave_remote_blocks_written", "Prefix blocks written to the Redis Cluster tier.",
        s.remote_blocks_written());
  Gauge(out, "kvwave_remote_bytes_written",
        "Bytes written to the Redis Cluster tier (parts and manifests).", s.remote_bytes_written());
  Gauge(out, "kvwave_remote_parts_sent", "Part values sent to the Redis Cluster tier.",
        s.remote_parts_sent());
  Gauge(out, "kvwave_remote_write_errors", "Prefix blocks the remote tier could not write.",
        s.remote_write_errors());
  Gauge(out, "kvwave_remote_queue_dropped",
        "Prefix blocks not written behind because the remote queue was full.",
        s.remote_queue_dropped());
  Gauge(out, "kvwave_remote_blocks_fetched", "Prefix blocks attached from the Redis Cluster tier.",
        s.remote_blocks_fetched());
  Gauge(out, "kvwave_remote_bytes_read", "Bytes read from the Redis Cluster tier.",
        s.remote_bytes_read());
  Gauge(out, "kvwave_remote_blocks_partial",
        "Remote blocks skipped: a part was missing (writer died, or evicted).",
        s.remote_blocks_partial());
  Gauge(out, "kvwave_remote_blocks_corrupt",
        "Remote blocks skipped: corrupt or truncated (never served).", s.remote_blocks_corrupt());
  Gauge(out, "kvwave_remote_blocks_version_mismatch",
        "Remote blocks skipped: another format version.", s.remote_blocks_version_mismatch());
  Gauge(out, "kvwave_remote_unavailable",
        "Remote reads that failed on a slow or dead cluster node.", s.remote_unavailable());
  Gauge(out, "kvwave_remote_nodes", "Masters of the Redis Cluster tier.", s.remote_nodes());
  Gauge(out, "kvwave_remote_nodes_down", "Masters of the Redis Cluster tier marked down now.",
        s.remote_nodes_down());
  Gauge(out, "kvwave_remote_blocks_attached_lazily",
        "Remote blocks attached with their index only (remote.attach = index), rows fetched later.",
        s.remote_blocks_attached_lazily());
  Gauge(out, "kvwave_remote_kv_on_demand_bytes",
        "Row bytes of remote-attached blocks fetched on demand (GETRANGE of the clusters a call "
        "needed).",
        s.remote_kv_on_demand_bytes());
  Gauge(out, "kvwave_remote_kv_on_demand_ranges", "GETRANGE commands of on-demand row fetches.",
        s.remote_kv_on_demand_ranges());
  Gauge(out, "kvwave_remote_kv_behind_bytes",
        "Row part bytes of remote-attached blocks read by the background fetch.",
        s.remote_kv_behind_bytes());
  Gauge(out, "kvwave_remote_kv_behind_segments",
        "Remote-attached segments whose rows the background fetch completed.",
        s.remote_kv_behind_segments());
  Gauge(out, "kvwave_remote_kv_lost_segments",
        "Remote-attached segments whose rows were gone or corrupt after the attach (never served).",
        s.remote_kv_lost_segments());
  Gauge(out, "kvwave_remote_kv_unavailable",
        "Row fetches of remote-attached blocks that failed on a slow or dead node (tried again "
        "later).",
        s.remote_kv_unavailable());
  Gauge(out, "kvwave_remote_kv_queued_segments",
        "Remote-attached segments waiting for the background row fetch now.",
        s.remote_kv_queued_segments());
  Gauge(out, "kvwave_host_pool_idle_bytes",
        "Freed KV blocks kept resident for reuse (not in kvwave_memory_used_bytes).",
        s.host_pool_idle_bytes());
  Gauge(out, "kvwave_host_pool_limit_bytes", "Bound on kvwave_host_pool_idle_bytes.",
        s.host_pool_limit_bytes());
  Gauge(out, "kvwave_host_pool_hits", "KV block allocations served by the pool.",
        s.host_pool_hits());
  Gauge(out, "kvwave_host_pool_misses", "KV block allocations the pool could not serve.",
        s.host_pool_misses());
  absl::StrAppendFormat(&out,
                        "# HELP kvwave_attention_backend The attention backend serving Attend "
                        "(label backend).\n# TYPE kvwave_attention_backend gauge\n"
                        "kvwave_attention_backend{backend=\"%s\"} 1\n",
                        s.attention_backend().empty() ? "cpu" : s.attention_backend());
  Gauge(out, "kvwave_gpu_pool_bytes", "GPU page pool capacity (0 on the CPU backend).",
        s.gpu_pool_bytes());
  Gauge(out, "kvwave_gpu_pool_used_bytes", "GPU page pool bytes in use.", s.gpu_pool_used_bytes());
  Gauge(out, "kvwave_gpu_hits", "Retrieved clusters served from the GPU page pool.", s.gpu_hits());
  Gauge(out, "kvwave_gpu_misses", "Retrieved clusters read from host memory by the GPU.",
        s.gpu_misses());
  Gauge(out, "kvwave_gpu_pcie_bytes", "Bytes moved host -> GPU by the attention backend.",
        s.gpu_pcie_bytes());
  Gauge(out, "kvwave_gpu_segments_resident", "Sealed segments whose meta index is on the GPU.",
        s.gpu_segments_resident());
  Gauge(out, "kvwave_gpu_device_registrations",
        "GPU clients' device-buffer registrations open (CUDA IPC).", s.gpu_device_registrations());
  Gauge(out, "kvwave_gpu_ipc_mappings", "GPU clients' allocations mapped into kvwaved.",
        s.gpu_ipc_mappings());
  Gauge(out, "kvwave_gpu_ipc_events", "GPU clients' interprocess events open.", s.gpu_ipc_events());
  Gauge(out, "kvwave_gpu_device_calls", "AttendDevice calls served by the backend.",
        s.gpu_device_calls());
  Gauge(out, "kvwave_gpu_device_errors", "AttendDevice calls failed in the backend.",
        s.gpu_device_errors());
  Gauge(out, "kvwave_in_flight", "Requests being computed.", s.in_flight());
  Gauge(out, "kvwave_rss_bytes", "Resident set size of kvwaved.", s.rss_bytes());
  Gauge(out, "kvwave_frames_rejected", "Frames rejected as malformed.", s.frames_rejected());
  Gauge(out, "kvwave_uptime_seconds", "Seconds since start.", s.uptime_s());
  out += "# HELP kvwave_requests_total Requests by operation and outcome.\n";
  out += "# TYPE kvwave_requests_total counter\n";
  for (uint16_t i = 0; i <= kMaxOp; ++i) {
    const Op& o = ops_[i];
    const uint64_t count = o.count.load(std::memory_order_relaxed);
    if (count == 0) continue;
    const uint64_t errors = o.errors.load(std::memory_order_relaxed);
    absl::StrAppend(&out, "kvwave_requests_total{op=\"", OpName(i), "\",outcome=\"ok\"} ",
                    count - errors, "\n");
    absl::StrAppend(&out, "kvwave_requests_total{op=\"", OpName(i), "\",outcome=\"error\"} ",
                    errors, "\n");
  }
  out += "# HELP kvwave_request_seconds Server-side latency of requests by operation.\n";
  out += "# TYPE kvwave_request_seconds histogram\n";
  for (uint16_t i = 0; i <= kMaxOp; ++i) {
    const Op& o = ops_[i];
    if (o.count.load(std::memory_order_relaxed) == 0) continue;
    uint64_t cumulative = 0;
    for (int b = 0; b < LatencyHistogram::kBuckets; ++b) {
      cumulative += o.latency.BucketCount(b);
      if (b % 4 != 0 || b > 4 * 26) continue;  // powers of two, 1 us .. ~67 s
      absl::StrAppendFormat(&out, "kvwave_request_seconds_bucket{op=\"%s\",le=\"%g\"} %d\n",
                            OpName(i), LatencyHistogram::BucketUpperMicros(b) * 1e-6, cumulative);
    }
    const uint64_t n = o.latency.Count();
    absl::StrAppendFormat(&out, "kvwave_request_seconds_bucket{op=\"%s\",le=\"+Inf\"} %d\n",
                          OpName(i), n);
    absl::StrAppendFormat(&out, "kvwave_request_seconds_sum{op=\"%s\"} %.9g\n", OpName(i),
                          o.latency.MeanMicros() * static_cast<double>(n) * 1e-6);
    absl::StrAppendFormat(&out, "kvwave_request_seconds_count{op=\"%s\"} %d\n", OpName(i), n);
  }
  return out;
}

int64_t ResidentBytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long pages = 0, resident = 0;
  const int n = std::fscanf(f, "%ld %ld", &pages, &resident);
  std::fclose(f);
  return n == 2 ? resident * sysconf(_SC_PAGESIZE) : 0;
}

}  // namespace kvwave::rpc
