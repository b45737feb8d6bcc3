// libFuzzer target over kvwaved's input path: the byte stream is split into reads (as a socket
// would deliver it), reassembled by FrameDecoder, and each frame's body is parsed as the message
// its type names; every tensor of a parsed request is then bounds-checked against a shared
// region, as the service does. Crashes, sanitizer reports and leaks are findings.
#include <cstddef>
#include <cstdint>
#include <span>

#include "rpc/frame.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/shared_region.h"

namespace {

using kvwave::rpc::SharedRegion;
namespace pb = kvwave::rpc::pb;

const SharedRegion& Region() {
  static SharedRegion* region = [] {
    auto r = SharedRegion::Create(1 << 16, "fuzz");
    return new SharedRegion(std::move(*r));
  }();
  return *region;
}

void Check(const pb::Tensor& t) {
  auto s = Region().Slice(t.offset(), t.length(), 4, "fuzz");
  if (s.ok() && !s->empty()) {
    volatile std::byte sink = (*s)[s->size() - 1];  // touching the last byte must be in bounds
    (void)sink;
  }
}

template <typename M>
void Parse(const kvwave::rpc::Frame& f) {
  M m;
  if (kvwave::rpc::ParseBody(f.body, m).ok()) {
    if constexpr (std::is_same_v<M, pb::AppendRequest> || std::is_same_v<M, pb::GatherRequest>) {
      Check(m.k());
      Check(m.v());
    } else if constexpr (std::is_same_v<M, pb::AttendRequest>) {
      Check(m.q());
      Check(m.out());
      Check(m.lse());
    } else if constexpr (std::is_same_v<M, pb::RetrieveRequest>) {
      Check(m.q());
      Check(m.positions());
      Check(m.scores());
    }
    (void)m.ByteSizeLong();
  }
}

void Dispatch(const kvwave::rpc::Frame& f) {
  switch (f.header.op()) {
    case pb::HELLO:
      Parse<pb::HelloRequest>(f);
      Parse<pb::HelloResponse>(f);
      break;
    case pb::PING:
      Parse<pb::PingRequest>(f);
      break;
    case pb::STATS:
      Parse<pb::StatsResponse>(f);
      break;
    case pb::OPEN:
      Parse<pb::OpenRequest>(f);
      break;
    case pb::APPEND:
      Parse<pb::AppendRequest>(f);
      break;
    case pb::SEAL:
      Parse<pb::SealRequest>(f);
      break;
    case pb::ATTEND:
      Parse<pb::AttendRequest>(f);
      Parse<pb::AttendResponse>(f);
      break;
    case pb::RETRIEVE:
      Parse<pb::RetrieveRequest>(f);
      break;
    case pb::GATHER:
      Parse<pb::GatherRequest>(f);
      break;
    case pb::INFO:
      Parse<pb::InfoResponse>(f);
      break;
    case pb::LIST_CONTEXTS:
      Parse<pb::ListContextsResponse>(f);
      break;
    default:
      Parse<pb::ErrorResponse>(f);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t chunk = 1 + data[0] % 64;  // read sizes as a socket might deliver them
  std::span<const std::byte> rest(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  kvwave::rpc::FrameDecoder decoder(1 << 20);
  while (!rest.empty()) {
    const size_t n = std::min(chunk, rest.size());
    const bool ok = decoder.Feed(rest.first(n)).ok();
    rest = rest.subspan(n);
    while (decoder.HasFrame()) Dispatch(decoder.TakeFrame());
    if (!ok) break;
  }
  return 0;
}
