// Framing, the shared region's bounds checks, fd passing and the latency histogram.
#include "rpc/frame.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <random>

#include "gtest/gtest.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/shared_region.h"
#include "rpc/stats.h"
#include "rpc/wire.h"

namespace kvwave::rpc {
namespace {

std::string Frame1(uint16_t type, uint64_t id, const google::protobuf::MessageLite& m) {
  FrameHeader h;
  h.type = type;
  h.request_id = id;
  auto f = EncodeFrame(h, m);
  EXPECT_TRUE(f.ok());
  return *f;
}

TEST(FrameTest, HeaderRoundTrip) {
  FrameHeader h;
  h.type = pb::ATTEND | kResponseBit;
  h.request_id = 0x0123456789abcdefULL;
  h.body_bytes = 77;
  h.deadline_ms = 1234;
  std::byte buf[kFrameHeaderBytes];
  EncodeHeader(h, buf);
  const FrameHeader back = DecodeHeaderUnchecked(buf);
  EXPECT_EQ(back.magic, kFrameMagic);
  EXPECT_EQ(back.version, kProtocolVersion);
  EXPECT_EQ(back.type, h.type);
  EXPECT_TRUE(back.is_response());
  EXPECT_EQ(back.op(), pb::ATTEND);
  EXPECT_EQ(back.request_id, h.request_id);
  EXPECT_EQ(back.body_bytes, 77u);
  EXPECT_EQ(back.deadline_ms, 1234u);
  EXPECT_EQ(std::to_integer<int>(buf[0]), 'K');  // little-endian magic reads "KVW1"
}

TEST(FrameTest, DecoderReassemblesAnySplit) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::string stream;
  std::vector<std::string> payloads;
  for (uint64_t id = 1; id <= 50; ++id) {
    pb::PingRequest ping;
    std::string payload(rng() % 3000, '\0');
    for (char& c : payload) c = static_cast<char>(rng());
    ping.set_payload(payload);
    payloads.push_back(payload);
    stream += Frame1(pb::PING, id, ping);
  }
  FrameDecoder decoder(1 << 20);
  size_t pos = 0;
  std::vector<Frame> frames;
  while (pos < stream.size()) {
    const size_t n = std::min<size_t>(1 + rng() % 700, stream.size() - pos);
    ASSERT_TRUE(decoder.Feed(std::as_bytes(std::span(stream.data() + pos, n))).ok());
    pos += n;
    while (decoder.HasFrame()) frames.push_back(decoder.TakeFrame());
  }
  ASSERT_EQ(frames.size(), 50u);
  EXPECT_EQ(decoder.pending_bytes(), 0u);
  for (size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(frames[i].header.request_id, i + 1);
    pb::PingRequest ping;
    ASSERT_TRUE(ParseBody(frames[i].body, ping).ok());
    EXPECT_EQ(ping.payload(), payloads[i]);
  }
}

TEST(FrameTest, DecoderRejectsBadMagicVersionAndSize) {
  FrameHeader h;
  std::byte buf[kFrameHeaderBytes];
  h.magic = 0xdeadbeef;
  EncodeHeader(h, buf);
  FrameDecoder a(1 << 20);
  EXPECT_EQ(a.Feed(buf).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(a.Feed(buf).ok());  // poisoned
  h = FrameHeader();
  h.version = 2;
  EncodeHeader(h, buf);
  FrameDecoder b(1 << 20);
  EXPECT_EQ(b.Feed(buf).code(), absl::StatusCode::kFailedPrecondition);
  h = FrameHeader();
  h.request_id = 31;
  h.body_bytes = 4096;
  EncodeHeader(h, buf);
  FrameDecoder c(4096);  // header + body > limit
  EXPECT_EQ(c.Feed(buf).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(c.last_header().request_id, 31u);
  EXPECT_FALSE(c.HasFrame());
}

TEST(FrameTest, MalformedBodyIsAnError) {
  const std::string junk = "\x0a\xff\xff\xff\xff\x0f";
  pb::OpenRequest open;
  EXPECT_EQ(ParseBody(std::as_bytes(std::span(junk.data(), junk.size())), open).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SharedRegionTest, SliceChecksBoundsAndAlignment) {
  auto r = SharedRegion::Create(1 << 16, "t");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->Slice(0, 1 << 16, 8, "x").ok());
  EXPECT_TRUE(r->Slice(1 << 16, 0, 1, "x").ok());
  EXPECT_EQ(r->Slice(1, 1 << 16, 1, "x").status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Slice((1 << 16) + 1, 0, 1, "x").status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Slice(~uint64_t{0} - 3, 8, 1, "x").status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Slice(8, ~uint64_t{0}, 1, "x").status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Slice(2, 4, 4, "x").status().code(), absl::StatusCode::kInvalidArgument);
  uint64_t off = 0;
  EXPECT_TRUE(r->Contains(r->data() + 100, 10, &off));
  EXPECT_EQ(off, 100u);
  EXPECT_FALSE(r->Contains(r->data() + (1 << 16) - 4, 10, &off));
  int outside = 0;
  EXPECT_FALSE(r->Contains(&outside, 4, &off));
}

TEST(SharedRegionTest, AdoptNeedsASizeSealedMemfd) {
  const int unsealed = memfd_create("u", MFD_CLOEXEC);
  ASSERT_EQ(ftruncate(unsealed, 4096), 0);
  EXPECT_EQ(SharedRegion::Adopt(unsealed, 1 << 20).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto created = SharedRegion::Create(8192, "s");
  ASSERT_TRUE(created.ok());
  EXPECT_EQ(SharedRegion::Adopt(dup(created->fd()), 4096).status().code(),
            absl::StatusCode::kResourceExhausted);  // larger than allowed
  auto adopted = SharedRegion::Adopt(dup(created->fd()), 1 << 20);
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ(adopted->size(), 8192u);
  created->data()[5] = std::byte{42};
  EXPECT_EQ(adopted->data()[5], std::byte{42});  // the same memory
  EXPECT_NE(ftruncate(created->fd(), 100), 0);   // the seal forbids shrinking
}

// Regions charge their size to an AddressBudget while mapped and give it back when unmapped.
TEST(SharedRegionTest, AdoptChargesTheAddressBudget) {
  AddressBudget budget(3 * 8192);
  auto created = SharedRegion::Create(8192, "s");
  ASSERT_TRUE(created.ok());
  std::vector<SharedRegion> held;
  for (int i = 0; i < 3; ++i) {
    auto r = SharedRegion::Adopt(dup(created->fd()), 1 << 20, &budget);
    ASSERT_TRUE(r.ok()) << r.status();
    held.push_back(*std::move(r));
  }
  EXPECT_EQ(budget.used(), 3u * 8192);
  auto refused = SharedRegion::Adopt(dup(created->fd()), 1 << 20, &budget);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("rpc.max_mapped_bytes"), std::string::npos);
  held.pop_back();
  EXPECT_EQ(budget.used(), 2u * 8192);
  EXPECT_TRUE(SharedRegion::Adopt(dup(created->fd()), 1 << 20, &budget).ok());
  EXPECT_EQ(budget.used(), 2u * 8192);  // the temporary was unmapped again
}

// A header announcing a large body reserves it but does not fill it: the bytes count as they
// come, and the frame completes exactly at its end, whatever the chunking.
TEST(FrameDecoderTest, FeedOneStopsAfterTheFirstFrame) {
  FrameHeader h;
  h.type = 1;
  h.request_id = 7;
  std::string two;
  for (int i = 0; i < 2; ++i) {
    pb::PingRequest ping;
    ping.set_payload(std::string(100, 'a' + i));
    auto f = EncodeFrame(h, ping);
    ASSERT_TRUE(f.ok());
    two += *f;
  }
  FrameDecoder d(1 << 20);
  auto bytes = std::as_bytes(std::span(two.data(), two.size()));
  auto consumed = d.FeedOne(bytes);
  ASSERT_TRUE(consumed.ok());
  EXPECT_EQ(*consumed, two.size() / 2);
  ASSERT_TRUE(d.HasFrame());
  (void)d.TakeFrame();
  EXPECT_FALSE(d.HasFrame());
  d.set_max_frame_bytes(64);  // the second frame is now too large
  EXPECT_EQ(d.FeedOne(bytes.subspan(*consumed)).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(SharedRegionTest, FdTravelsOverASocketPair) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  auto region = SharedRegion::Create(4096, "p");
  ASSERT_TRUE(region.ok());
  region->data()[0] = std::byte{7};
  const std::string msg = "hello";
  ASSERT_TRUE(
      SendWithFd(sv[0], std::as_bytes(std::span(msg.data(), msg.size())), region->fd()).ok());
  std::vector<std::byte> buf(64);
  std::vector<int> fds;
  auto n = ReceiveWithFds(sv[1], buf, fds);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, msg.size());
  ASSERT_EQ(fds.size(), 1u);
  auto adopted = SharedRegion::Adopt(fds[0], 1 << 20);
  ASSERT_TRUE(adopted.ok());
  EXPECT_EQ(adopted->data()[0], std::byte{7});
  close(sv[0]);
  close(sv[1]);
}

TEST(WireTest, CheckedBytesAndStatus) {
  EXPECT_EQ(*CheckedBytes(10, 20, 30, 1 << 20, "x"), 6000u);
  EXPECT_FALSE(CheckedBytes(int64_t{1} << 40, int64_t{1} << 40, 2, ~uint64_t{0}, "x").ok());
  EXPECT_FALSE(CheckedBytes(-1, 2, 3, 100, "x").ok());
  pb::Status p;
  ToProto(absl::NotFoundError("gone"), &p);
  EXPECT_EQ(FromProto(p), absl::NotFoundError("gone"));
  p.set_code(999);
  EXPECT_EQ(FromProto(p).code(), absl::StatusCode::kUnknown);
  EXPECT_STREQ(OpName(pb::APPEND), "append");
}

TEST(StatsTest, HistogramQuantilesWithinABucket) {
  LatencyHistogram h;
  for (int i = 1; i <= 1000; ++i) h.Record(static_cast<double>(i));
  EXPECT_EQ(h.Count(), 1000u);
  const double p50 = h.Quantile(0.5), p99 = h.Quantile(0.99);
  EXPECT_GE(p50, 500.0);
  EXPECT_LE(p50, 500.0 * 1.19 + 1);
  EXPECT_GE(p99, 990.0);
  EXPECT_LE(p99, 990.0 * 1.19 + 1);
  EXPECT_NEAR(h.MeanMicros(), 500.5, 1.0);
}

}  // namespace
}  // namespace kvwave::rpc
