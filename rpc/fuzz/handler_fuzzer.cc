// libFuzzer target over kvwaved's request handlers: rpc::Service with a real in-process engine
// (CPU backend, no persistence), driven like one client session per input.
//
// Two engines serve the inputs: engine 0 with the defaults' methods (centroid ranking, no
// graphs), engine 1 with RetrievalAttention graphs on (prefill queries kept, graph Retrieve and
// retrievalattention Attend served) and the two-pass ranking.
//
// Input: byte 0 picks the session kind (bit 0: a Unix session with a 1 MiB shared region, or one
// without: tensors inline) and the engine (bit 1), the next bytes up to the first record fill the
// start of the region (tensor data: keys, values, queries, any bit pattern). Then records, each
//   [op selector: 1 byte][body length: 2 bytes LE][body]
// The body is parsed as the op's request; a context id below 16 is replaced by the id of one of
// the contexts this input opened (so requests reach real contexts), then the request is
// re-serialised and handed to Service::Handle. With the selector's top bit set the body goes in
// raw instead (unparsable and odd bodies included). Every reply must be one well-formed frame
// within the frame limit that answers the request's id. The session is released at the end,
// which must close all its contexts (checked). The engine's memory is bounded by its
// memory_limit_bytes (64 MiB), so no input can make it allocate more than that plus what one
// request's replies need.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "config/settings.h"
#include "engine/engine.h"
#include "rpc/frame.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/service.h"
#include "rpc/session.h"
#include "rpc/shared_region.h"
#include "spdlog/spdlog.h"

namespace {

namespace pb = kvwave::rpc::pb;
using kvwave::rpc::Frame;
using kvwave::rpc::FrameHeader;

constexpr size_t kRegionBytes = 1 << 20;
constexpr uint16_t kOps[] = {
    pb::PING, pb::STATS, pb::OPEN, pb::APPEND, pb::SEAL, pb::ATTEND, pb::RETRIEVE, pb::GATHER,
    pb::CLOSE, pb::INFO, pb::LIST_CONTEXTS, pb::DROP, 0x7ffe /* unknown */,
    // After the seeds' ops (rpc/fuzz/handler_seeds.py numbers the first
    // 12): batches, and the GPU-client ops (here: no GPU backend).
    pb::ATTEND_BATCH, pb::REGISTER_DEVICE, pb::UNREGISTER_DEVICE, pb::ATTEND_DEVICE};

struct World {
  std::unique_ptr<kvwave::engine::Engine> engine[2];
  std::unique_ptr<kvwave::rpc::Service> service[2];
  kvwave::rpc::SharedRegion region;
  uint64_t max_frame_bytes = 0;
};

World& TheWorld() {
  static World* world = [] {
    spdlog::set_level(spdlog::level::off);  // a log line per session would dominate the run
    auto* w = new World;
    for (int e = 0; e < 2; ++e) {
      kvwave::config::Settings s;
      s.memory_limit_bytes = int64_t{64} << 20;  // keeps every input's memory bounded
      s.compute_threads = 1;
      s.prefill_segment_tokens = 64;
      s.decode_segment_tokens = 32;
      s.recent_tokens = 8;
      s.sink_tokens = 2;
      s.tokens_per_cluster = 8;
      s.kmeans_iterations = 2;
      s.max_frame_bytes = int64_t{16} << 20;
      s.host_pool_bytes = int64_t{16} << 20;
      if (e == 1) {
        s.graph = "on";
        s.graph_queries = 64;
        s.graph_pivots = 4;
        s.graph_degree = 8;
        s.graph_beam = 16;
        s.graph_top_k = 8;
        s.rank = "two_pass";
      }
      auto engine = kvwave::engine::Engine::Create(s);
      if (!engine.ok()) {
        std::fprintf(stderr, "engine: %s\n", engine.status().ToString().c_str());
        std::abort();
      }
      w->engine[e] = *std::move(engine);
      w->service[e] = std::make_unique<kvwave::rpc::Service>(*w->engine[e], s);
      w->max_frame_bytes = w->service[e]->max_frame_bytes();
    }
    w->region = *kvwave::rpc::SharedRegion::Create(kRegionBytes, "fuzz");
    return w;
  }();
  return *world;
}

// The reply must be exactly one valid response frame for `request_id`; returns it.
Frame CheckReply(const std::string& reply, uint64_t request_id, uint64_t max_frame_bytes) {
  if (reply.size() < kvwave::rpc::kFrameHeaderBytes || reply.size() > max_frame_bytes) {
    std::fprintf(stderr, "reply of %zu bytes (limit %llu)\n", reply.size(),
                 static_cast<unsigned long long>(max_frame_bytes));
    std::abort();
  }
  kvwave::rpc::FrameDecoder decoder(max_frame_bytes);
  if (!decoder.Feed(std::as_bytes(std::span(reply.data(), reply.size()))).ok() ||
      !decoder.HasFrame()) {
    std::fprintf(stderr, "reply is not a frame\n");
    std::abort();
  }
  Frame f = decoder.TakeFrame();
  if (decoder.HasFrame() || !f.header.is_response() || f.header.request_id != request_id) {
    std::fprintf(stderr, "reply is not one response to request %llu\n",
                 static_cast<unsigned long long>(request_id));
    std::abort();
  }
  return f;
}

template <typename M>
bool Remap(std::vector<std::byte>& body, const std::vector<uint64_t>& opened) {
  M m;
  if (!m.ParseFromArray(body.data(), static_cast<int>(body.size()))) return false;
  if constexpr (requires { m.context_id(); }) {
    if (!opened.empty() && m.context_id() < 16)
      m.set_context_id(opened[m.context_id() % opened.size()]);
  }
  std::string out = m.SerializeAsString();
  body.assign(reinterpret_cast<const std::byte*>(out.data()),
              reinterpret_cast<const std::byte*>(out.data()) + out.size());
  return true;
}

// A batch names its contexts in its entries.
template <typename M>
void RemapEntries(std::vector<std::byte>& body, const std::vector<uint64_t>& opened) {
  M m;
  if (!m.ParseFromArray(body.data(), static_cast<int>(body.size()))) return;
  for (pb::AttendBatchEntry& entry : *m.mutable_entries()) {
    if (!opened.empty() && entry.context_id() < 16)
      entry.set_context_id(opened[entry.context_id() % opened.size()]);
  }
  std::string out = m.SerializeAsString();
  body.assign(reinterpret_cast<const std::byte*>(out.data()),
              reinterpret_cast<const std::byte*>(out.data()) + out.size());
}

void RemapBody(uint16_t op, std::vector<std::byte>& body, const std::vector<uint64_t>& opened) {
  switch (op) {
    case pb::ATTEND_BATCH:
      RemapEntries<pb::AttendBatchRequest>(body, opened);
      break;
    case pb::ATTEND_DEVICE:
      RemapEntries<pb::AttendDeviceRequest>(body, opened);
      break;
    case pb::APPEND:
      Remap<pb::AppendRequest>(body, opened);
      break;
    case pb::SEAL:
      Remap<pb::SealRequest>(body, opened);
      break;
    case pb::ATTEND:
      Remap<pb::AttendRequest>(body, opened);
      break;
    case pb::RETRIEVE:
      Remap<pb::RetrieveRequest>(body, opened);
      break;
    case pb::GATHER:
      Remap<pb::GatherRequest>(body, opened);
      break;
    case pb::CLOSE:
      Remap<pb::CloseRequest>(body, opened);
      break;
    case pb::INFO:
      Remap<pb::InfoRequest>(body, opened);
      break;
    case pb::DROP:
      Remap<pb::DropRequest>(body, opened);
      break;
    default:
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  World& w = TheWorld();
  const bool with_region = (data[0] & 1) != 0;
  const int e = (data[0] >> 1) & 1;
  kvwave::rpc::Service& service = *w.service[e];
  kvwave::engine::Engine& engine = *w.engine[e];
  // Region bytes: up to the first record (byte 1 says how many, times 64).
  const size_t fill = std::min<size_t>(size - 2, size_t{data[1]} * 64);
  std::memset(w.region.data(), 0, 1 << 16);
  std::memcpy(w.region.data(), data + 2, fill);
  size_t at = 2 + fill;

  static uint64_t next_session = 1;
  kvwave::rpc::Session session(next_session++, /*local=*/true);
  {
    pb::HelloRequest hello;
    hello.set_min_version(kvwave::rpc::kProtocolVersion);
    hello.set_max_version(kvwave::rpc::kProtocolVersion);
    hello.set_has_shared_memory(with_region);
    std::string body = hello.SerializeAsString();
    Frame f;
    f.header.type = pb::HELLO;
    f.header.request_id = 1;
    f.body.assign(reinterpret_cast<const std::byte*>(body.data()),
                  reinterpret_cast<const std::byte*>(body.data()) + body.size());
    std::vector<int> fds;
    if (with_region) fds.push_back(dup(w.region.fd()));
    bool accepted = false;
    CheckReply(service.HandleHello(session, f, fds, &accepted), 1, w.max_frame_bytes);
    if (!accepted) std::abort();
  }

  std::vector<uint64_t> opened;
  uint64_t request_id = 2;
  while (at + 3 <= size) {
    const uint8_t selector = data[at];
    const size_t len = std::min<size_t>(size - at - 3, data[at + 1] | (size_t{data[at + 2]} << 8));
    at += 3;
    Frame f;
    const uint16_t op = kOps[(selector & 0x7f) % std::size(kOps)];
    f.header.type = op;
    f.header.request_id = request_id;
    f.body.assign(reinterpret_cast<const std::byte*>(data + at),
                  reinterpret_cast<const std::byte*>(data + at + len));
    at += len;
    if ((selector & 0x80) == 0) RemapBody(op, f.body, opened);
    f.header.body_bytes = static_cast<uint32_t>(f.body.size());
    std::string reply = service.Handle(session, f, kvwave::rpc::Clock::now());
    Frame r = CheckReply(reply, request_id, w.max_frame_bytes);
    if (op == pb::OPEN) {
      pb::OpenResponse resp;
      if (resp.ParseFromArray(r.body.data(), static_cast<int>(r.body.size())) &&
          resp.status().code() == 0) {
        opened.push_back(resp.context_id());
      }
    }
    ++request_id;
  }
  service.ReleaseSession(session);
  // Every context of the session is closed (blocks it shared may stay cached: they are charged
  // to the engine's limit and evictable).
  const auto stats = engine.Stats();
  if (stats.contexts != 0) {
    std::fprintf(stderr, "%lld contexts left after the session ended\n",
                 static_cast<long long>(stats.contexts));
    std::abort();
  }
  return 0;
}
