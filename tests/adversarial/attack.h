// Helpers for the adversarial-client suite: a raw protocol connection that issues typed
// requests and returns the raw reply frame, plus readers of what the kernel says about the
// daemon process (/proc: RSS, peak RSS, CPU time, open fds, listening addresses).
//
// Thread-safety: test-only helpers, used from the test's thread.
#ifndef KVWAVE_TESTS_ADVERSARIAL_ATTACK_H_
#define KVWAVE_TESTS_ADVERSARIAL_ATTACK_H_

#include <dirent.h>
#include <sys/stat.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tests/integration/harness.h"

namespace kvwave::testing {

namespace pb = rpc::pb;

// One request / one reply over a RawConnection.
class Attacker {
 public:
  explicit Attacker(RawConnection& c) : c_(c) {}

  // Sends `req` as `type` and waits for the reply with the same id.
  std::optional<rpc::Frame> Call(uint16_t type, const google::protobuf::MessageLite& req,
                                 int timeout_ms = 10000) {
    const uint64_t id = next_id_++;
    if (!c_.SendFrame(type, id, req)) return std::nullopt;
    for (;;) {
      std::optional<rpc::Frame> f = c_.ReadFrame(timeout_ms);
      if (!f || f->header.request_id == id) return f;
    }
  }
  // The status code of the reply (-1: none).
  int Code(uint16_t type, const google::protobuf::MessageLite& req) {
    std::optional<rpc::Frame> f = Call(type, req);
    last_message_ = f ? StatusMessageOf(*f) : "(no reply)";
    return f ? StatusCodeOf(*f) : -1;
  }
  const std::string& last_message() const { return last_message_; }

  // Opens a context; 0 on failure.
  uint64_t Open(int layers, int q_heads, int kv_heads, int head_dim) {
    pb::OpenRequest req;
    pb::ModelShape* s = req.mutable_shape();
    s->set_layers(layers);
    s->set_q_heads(q_heads);
    s->set_kv_heads(kv_heads);
    s->set_head_dim(head_dim);
    s->set_dtype(pb::F32);
    std::optional<rpc::Frame> f = Call(pb::OPEN, req);
    pb::OpenResponse resp;
    if (!f || !resp.ParseFromArray(f->body.data(), static_cast<int>(f->body.size())) ||
        resp.status().code() != 0) {
      return 0;
    }
    return resp.context_id();
  }
  // Appends `tokens` rows of kv_heads x head_dim float32 (value: row index) inline.
  bool AppendInline(uint64_t ctx, int layer, int64_t tokens, int kv_heads, int head_dim) {
    std::vector<float> rows(static_cast<size_t>(tokens) * kv_heads * head_dim);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i % 977) * 0.01f;
    pb::AppendRequest req;
    req.set_context_id(ctx);
    req.set_layer(layer);
    req.set_tokens(tokens);
    req.mutable_k()->set_data(rows.data(), rows.size() * 4);
    req.mutable_v()->set_data(rows.data(), rows.size() * 4);
    return Code(pb::APPEND, req) == 0;
  }
  // A Gather of `n` rows (positions 0..n-1 modulo `tokens`), answered inline.
  static pb::GatherRequest GatherInline(uint64_t ctx, int64_t n, int64_t tokens) {
    std::vector<int64_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = i % tokens;
    pb::GatherRequest req;
    req.set_context_id(ctx);
    req.set_layer(0);
    req.mutable_positions()->set_data(pos.data(), pos.size() * 8);
    return req;
  }

 private:
  RawConnection& c_;
  uint64_t next_id_ = 100;
  std::string last_message_;
};

inline int64_t DaemonRss(pid_t pid) { return ProcStatusBytes(pid, "VmRSS"); }
inline int64_t DaemonPeakRss(pid_t pid) { return ProcStatusBytes(pid, "VmHWM"); }

// utime + stime of `pid`, in clock ticks.
inline int64_t CpuTicks(pid_t pid) {
  const std::string stat = ReadTextFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return -1;
  std::istringstream in(stat.substr(paren + 2));
  std::string field;
  int64_t utime = 0, stime = 0;
  for (int i = 3; in >> field; ++i) {  // field 3 is the state
    if (i == 14) utime = std::atoll(field.c_str());
    if (i == 15) {
      stime = std::atoll(field.c_str());
      break;
    }
  }
  return utime + stime;
}

inline int OpenFds(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return -1;
  int n = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(d);
  return n;
}

// The local addresses ("7F000001" style, as /proc/net/tcp spells them: hex, host order of a
// little-endian machine) on which something listens on TCP `port`.
inline std::vector<std::string> ListeningAddresses(int port) {
  std::vector<std::string> out;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::istringstream in(ReadTextFile(table));
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string slot, local, remote, state;
      f >> slot >> local >> remote >> state;
      const size_t colon = local.find(':');
      if (colon == std::string::npos || state != "0A") continue;  // 0A = LISTEN
      if (std::stoi(local.substr(colon + 1), nullptr, 16) == port) {
        out.push_back(local.substr(0, colon));
      }
    }
  }
  return out;
}

// The count of `op` requests with `outcome` ("ok"/"error") in a Prometheus text.
inline int64_t RequestCount(const std::string& prometheus, const std::string& op,
                            const std::string& outcome = "ok") {
  const std::string key = "kvwave_requests_total{op=\"" + op + "\",outcome=\"" + outcome + "\"} ";
  const size_t at = prometheus.find(key);
  return at == std::string::npos ? -1 : std::atoll(prometheus.c_str() + at + key.size());
}

}  // namespace kvwave::testing

#endif  // KVWAVE_TESTS_ADVERSARIAL_ATTACK_H_
