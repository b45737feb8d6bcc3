// Bad input against the real kvwaved: every case gets an error or a closed connection, and the
// daemon keeps serving other clients afterwards.
#include <sys/mman.h>

#include <algorithm>
#include <random>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

namespace pb = rpc::pb;

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = StartDaemon({"rpc.max_frame_bytes=1048576"});
    ASSERT_NE(daemon_, nullptr);
    healthy_ = Connect(daemon_->socket_path());
    ASSERT_NE(healthy_, nullptr);
  }
  void ExpectStillServing() {
    ASSERT_TRUE(daemon_->Running());
    EXPECT_TRUE(healthy_->Ping().ok());
    auto fresh = Connect(daemon_->socket_path());
    ASSERT_NE(fresh, nullptr);
    EXPECT_TRUE(fresh->Ping().ok());
  }
  // Opens a context over a raw connection with a region; returns its id.
  uint64_t RawOpen(RawConnection& c, int q_heads = 4, int kv_heads = 1, int head_dim = 64) {
    pb::OpenRequest req;
    req.mutable_shape()->set_layers(2);
    req.mutable_shape()->set_q_heads(q_heads);
    req.mutable_shape()->set_kv_heads(kv_heads);
    req.mutable_shape()->set_head_dim(head_dim);
    req.mutable_shape()->set_dtype(pb::F32);
    EXPECT_TRUE(c.SendFrame(pb::OPEN, 7, req));
    auto f = c.ReadFrame(5000);
    EXPECT_TRUE(f.has_value());
    pb::OpenResponse resp;
    EXPECT_TRUE(resp.ParseFromArray(f->body.data(), static_cast<int>(f->body.size())));
    EXPECT_EQ(resp.status().code(), 0) << resp.status().message();
    return resp.context_id();
  }
  std::unique_ptr<client::LocalDaemon> daemon_;
  std::unique_ptr<client::Client> healthy_;
};

TEST_F(BadInputTest, GarbageBytesCloseTheConnection) {
  std::mt19937 rng(1);
  for (int round = 0; round < 5; ++round) {
    RawConnection c(daemon_->socket_path());
    ASSERT_TRUE(c.ok());
    std::vector<uint8_t> junk(4096);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    c.SendBytes(junk.data(), junk.size());
    EXPECT_TRUE(c.ClosedByPeer(5000));
  }
  ExpectStillServing();
  auto stats = healthy_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GE(stats->frames_rejected, 5);
}

TEST_F(BadInputTest, TruncatedFrameThenVanish) {
  {
    RawConnection c(daemon_->socket_path());
    ASSERT_TRUE(c.Hello(0));
    rpc::FrameHeader h;
    h.type = pb::PING;
    h.request_id = 2;
    h.body_bytes = 1000;
    std::byte header[rpc::kFrameHeaderBytes];
    rpc::EncodeHeader(h, header);
    c.SendBytes(header, sizeof(header));
    c.SendBytes("0123456789", 10);
    // A truncated frame on one connection must not block the others.
    ExpectStillServing();
    EXPECT_FALSE(c.ReadFrame(200).has_value());
  }  // closes mid-frame
  ExpectStillServing();
}

TEST_F(BadInputTest, OversizedFrameIsRejected) {
  RawConnection c(daemon_->socket_path());
  ASSERT_TRUE(c.Hello(0));
  rpc::FrameHeader h;
  h.type = pb::APPEND;
  h.request_id = 9;
  h.body_bytes = 64u << 20;  // limit is 1 MiB
  std::byte header[rpc::kFrameHeaderBytes];
  rpc::EncodeHeader(h, header);
  c.SendBytes(header, sizeof(header));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->header.op(), pb::ERROR);
  EXPECT_EQ(f->header.request_id, 9u);
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(c.ClosedByPeer(5000));
  ExpectStillServing();
}

TEST_F(BadInputTest, WrongFrameVersionIsRejected) {
  RawConnection c(daemon_->socket_path());
  rpc::FrameHeader h;
  h.version = 99;
  h.type = pb::HELLO;
  h.request_id = 3;
  std::byte header[rpc::kFrameHeaderBytes];
  rpc::EncodeHeader(h, header);
  c.SendBytes(header, sizeof(header));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(c.ClosedByPeer(5000));
  ExpectStillServing();
}

TEST_F(BadInputTest, HelloWithUnsupportedVersionRange) {
  RawConnection c(daemon_->socket_path());
  pb::HelloRequest req;
  req.set_min_version(2);
  req.set_max_version(5);
  ASSERT_TRUE(c.SendFrame(pb::HELLO, 1, req));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(c.ClosedByPeer(5000));
}

TEST_F(BadInputTest, FirstFrameMustBeHello) {
  RawConnection c(daemon_->socket_path());
  ASSERT_TRUE(c.SendFrame(pb::PING, 5, pb::PingRequest()));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(c.ClosedByPeer(5000));
}

TEST_F(BadInputTest, UnsealedRegionIsRefused) {
  RawConnection c(daemon_->socket_path());
  const int fd = memfd_create("unsealed", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
  pb::HelloRequest req;
  req.set_min_version(1);
  req.set_max_version(1);
  req.set_has_shared_memory(true);
  rpc::FrameHeader h;
  h.type = pb::HELLO;
  h.request_id = 1;
  auto frame = rpc::EncodeFrame(h, req);
  ASSERT_TRUE(
      rpc::SendWithFd(c.fd(), std::as_bytes(std::span(frame->data(), frame->size())), fd).ok());
  close(fd);
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(c.ClosedByPeer(5000));
}

TEST_F(BadInputTest, WrongShapesGetInvalidArgument) {
  auto c = Connect(daemon_->socket_path());
  ASSERT_NE(c, nullptr);
  client::OpenOptions bad;
  bad.shape = {2, 4, 3, 64, DType::kF32};  // q_heads not a multiple of kv_heads
  EXPECT_EQ(c->Open(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.shape = {2, 4, 0, 64, DType::kF32};
  EXPECT_EQ(c->Open(bad).status().code(), absl::StatusCode::kInvalidArgument);
  auto ctx = c->Open({{2, 4, 1, 64, DType::kF32}, {}, ""});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  std::vector<float> kv(10 * 64, 0.5f);
  auto bytes = std::as_bytes(std::span<const float>(kv));
  // n says 11 tokens, the data has 10.
  EXPECT_EQ(c->Append(ctx->id, 0, 11, bytes, bytes).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Append(ctx->id, 5, 10, bytes, bytes).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Append(ctx->id, 0, -1, bytes, bytes).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(c->Append(ctx->id, 0, 10, bytes, bytes).ok());
  std::vector<float> q(3 * 64, 0.1f), out(3 * 64), lse(3);  // 3 heads, the context has 4
  EXPECT_EQ(c->Attend(ctx->id, 0, q, {}, out, lse).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> q4(4 * 64, 0.1f), out4(4 * 64), lse4(4);
  EXPECT_EQ(c->Attend(ctx->id, 0, q4, {2.0, 0.0}, out4, lse4).code(),
            absl::StatusCode::kInvalidArgument);  // budget > 1
  std::vector<int64_t> pos(4 * 5);
  std::vector<float> sc(4 * 5);
  client::RetrieveOptions ro;
  ro.k = 0;
  EXPECT_EQ(c->Retrieve(ctx->id, 0, q4, ro, pos, sc).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(c->Ping().ok());
  ExpectStillServing();
}

TEST_F(BadInputTest, UnknownIdsAndTypes) {
  auto c = Connect(daemon_->socket_path());
  ASSERT_NE(c, nullptr);
  std::vector<float> kv(64, 1.0f);
  auto bytes = std::as_bytes(std::span<const float>(kv));
  EXPECT_EQ(c->Append(123456789, 0, 1, bytes, bytes).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->Close(123456789).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->Seal(123456789).code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(c->Info(123456789).ok());
  // Another session's context is invisible to this one.
  auto other = Connect(daemon_->socket_path());
  auto ctx = other->Open({{1, 1, 1, 64, DType::kF32}, {}, ""});
  ASSERT_TRUE(ctx.ok());
  EXPECT_EQ(c->Append(ctx->id, 0, 1, bytes, bytes).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(other->Append(ctx->id, 0, 1, bytes, bytes).ok());

  RawConnection raw(daemon_->socket_path());
  ASSERT_TRUE(raw.Hello(0));
  ASSERT_TRUE(raw.SendFrame(77, 42, pb::PingRequest()));  // unknown message type
  auto f = raw.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->header.request_id, 42u);
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kInvalidArgument));
  // A body that does not parse as its type.
  std::string junk = "\xff\xff\xff\xff\xff";
  rpc::FrameHeader h;
  h.type = pb::OPEN;
  h.request_id = 43;
  h.body_bytes = static_cast<uint32_t>(junk.size());
  std::byte header[rpc::kFrameHeaderBytes];
  rpc::EncodeHeader(h, header);
  raw.SendBytes(header, sizeof(header));
  raw.SendBytes(junk.data(), junk.size());
  f = raw.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->header.request_id, 43u);
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kInvalidArgument));
  // The connection survives request-level errors.
  ASSERT_TRUE(raw.SendFrame(pb::PING, 44, pb::PingRequest()));
  f = raw.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), 0);
}

TEST_F(BadInputTest, OffsetsOutsideTheRegion) {
  RawConnection c(daemon_->socket_path());
  ASSERT_TRUE(c.Hello(1 << 20));
  const uint64_t ctx = RawOpen(c);
  const uint64_t row = 64 * 4;  // 1 kv head x 64 x f32
  struct Case {
    uint64_t offset, length;
    absl::StatusCode code;
  } cases[] = {
      {(1 << 20) - row + 8, row, absl::StatusCode::kOutOfRange},  // runs past the end
      {uint64_t{1} << 40, row, absl::StatusCode::kOutOfRange},    // starts past the end
      {~uint64_t{0} - 7, row, absl::StatusCode::kOutOfRange},     // offset + length overflows
      {0, row * 2, absl::StatusCode::kInvalidArgument},           // length != shape
  };
  uint64_t id = 100;
  for (const Case& k : cases) {
    pb::AppendRequest req;
    req.set_context_id(ctx);
    req.set_layer(0);
    req.set_tokens(1);
    req.mutable_k()->set_offset(k.offset);
    req.mutable_k()->set_length(k.length);
    req.mutable_v()->set_offset(0);
    req.mutable_v()->set_length(row);
    ASSERT_TRUE(c.SendFrame(pb::APPEND, ++id, req));
    auto f = c.ReadFrame(5000);
    ASSERT_TRUE(f.has_value());
    EXPECT_EQ(f->header.request_id, id);
    EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(k.code)) << "offset " << k.offset;
  }
  // Output offsets are checked too: Attend writing past the region.
  pb::AttendRequest att;
  att.set_context_id(ctx);
  att.set_layer(0);
  att.mutable_q()->set_offset(0);
  att.mutable_q()->set_length(4 * 64 * 4);
  att.mutable_out()->set_offset((1 << 20) - 16);
  att.mutable_out()->set_length(4 * 64 * 4);
  att.set_retrieval_budget(-1);
  att.set_estimation_budget(-1);
  ASSERT_TRUE(c.SendFrame(pb::ATTEND, ++id, att));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), static_cast<int>(absl::StatusCode::kOutOfRange));
  // A valid one on the same connection still works.
  pb::AppendRequest good;
  good.set_context_id(ctx);
  good.set_layer(0);
  good.set_tokens(1);
  good.mutable_k()->set_offset(0);
  good.mutable_k()->set_length(row);
  good.mutable_v()->set_offset(row);
  good.mutable_v()->set_length(row);
  auto* floats = reinterpret_cast<float*>(c.region().data());
  for (int i = 0; i < 128; ++i) floats[i] = 0.25f + i;
  ASSERT_TRUE(c.SendFrame(pb::APPEND, ++id, good));
  f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(StatusCodeOf(*f), 0);
  ExpectStillServing();
}

TEST_F(BadInputTest, PipelinedRequestsAreAllAnsweredById) {
  RawConnection c(daemon_->socket_path());
  ASSERT_TRUE(c.Hello(0));
  const uint64_t ctx = RawOpen(c, 8, 2, 128);
  // A large append (computed) followed by many pings (answered on the io thread).
  const int64_t tokens = 400;  // 400 x 2 x 128 x 4 x 2 = 800 KiB per Append (limit 1 MiB)
  std::string k(tokens * 2 * 128 * 4, '\x01');
  pb::AppendRequest req;
  req.set_context_id(ctx);
  req.set_tokens(tokens);
  req.mutable_k()->set_data(k);
  req.mutable_v()->set_data(k);
  rpc::FrameHeader h;
  std::string batch;
  for (uint64_t id = 1000; id < 1004; ++id) {
    h.type = pb::APPEND;
    h.request_id = id;
    req.set_layer(static_cast<int>(id % 2));
    batch += *rpc::EncodeFrame(h, req);
  }
  for (uint64_t id = 2000; id < 2050; ++id) {
    h.type = pb::PING;
    h.request_id = id;
    batch += *rpc::EncodeFrame(h, pb::PingRequest());
  }
  std::thread writer([&] { c.SendBytes(batch.data(), batch.size()); });
  std::vector<uint64_t> order;
  for (int i = 0; i < 54; ++i) {
    auto f = c.ReadFrame(20000);
    ASSERT_TRUE(f.has_value()) << "reply " << i;
    EXPECT_EQ(StatusCodeOf(*f), 0);
    order.push_back(f->header.request_id);
  }
  writer.join();
  std::vector<uint64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "duplicate reply";
  EXPECT_EQ(sorted.front(), 1000u);
  EXPECT_EQ(sorted.back(), 2049u);
  const bool reordered = !std::is_sorted(order.begin(), order.end());
  std::printf("pipelined: replies %s request order\n", reordered ? "overtook" : "kept");
}

TEST(DeadlineTest, ExpiredDeadlineIsNotRun) {
  // One compute thread, so requests queue behind a slow Seal.
  auto daemon = StartDaemon({"attend.compute_threads=1"});
  ASSERT_NE(daemon, nullptr);
  RawConnection c(daemon->socket_path());
  ASSERT_TRUE(c.Hello(0));
  pb::OpenRequest open;
  *open.mutable_shape() = [] {
    pb::ModelShape s;
    s.set_layers(2);
    s.set_q_heads(4);
    s.set_kv_heads(2);
    s.set_head_dim(128);
    s.set_dtype(pb::F32);
    return s;
  }();
  ASSERT_TRUE(c.SendFrame(pb::OPEN, 1, open));
  auto f = c.ReadFrame(5000);
  ASSERT_TRUE(f.has_value());
  pb::OpenResponse opened;
  ASSERT_TRUE(opened.ParseFromArray(f->body.data(), static_cast<int>(f->body.size())));
  const uint64_t ctx = opened.context_id();
  const int64_t tokens = 8000;
  std::mt19937 rng(7);
  std::string kv(tokens * 2 * 128 * 4, '\0');
  auto* floats = reinterpret_cast<float*>(kv.data());
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < kv.size() / 4; ++i) floats[i] = normal(rng);
  pb::AppendRequest req;
  req.set_context_id(ctx);
  req.set_tokens(tokens);
  req.mutable_k()->set_data(kv);
  req.mutable_v()->set_data(kv);
  for (int layer = 0; layer < 2; ++layer) {
    req.set_layer(layer);
    ASSERT_TRUE(c.SendFrame(pb::APPEND, 10 + layer, req));
    f = c.ReadFrame(30000);
    ASSERT_TRUE(f.has_value());
    ASSERT_EQ(StatusCodeOf(*f), 0);
  }
  pb::SealRequest seal;
  seal.set_context_id(ctx);
  ASSERT_TRUE(c.SendFrame(pb::SEAL, 20, seal));
  pb::InfoRequest info;
  info.set_context_id(ctx);
  for (uint64_t id = 21; id < 31; ++id) ASSERT_TRUE(c.SendFrame(pb::INFO, id, info, 1));
  int expired = 0, ok = 0;
  for (int i = 0; i < 11; ++i) {
    f = c.ReadFrame(30000);
    ASSERT_TRUE(f.has_value());
    const int code = StatusCodeOf(*f);
    if (code == static_cast<int>(absl::StatusCode::kDeadlineExceeded)) {
      ++expired;
      EXPECT_NE(f->header.request_id, 20u);  // the Seal had the default deadline
    } else {
      EXPECT_EQ(code, 0);
      ++ok;
    }
  }
  std::printf("deadline: %d of 10 Info requests (1 ms deadline, queued behind Seal) expired\n",
              expired);
  EXPECT_GT(expired, 0);
}

}  // namespace
}  // namespace kvwave::testing
