// The C ABI of client/capi/kvwave_c.h over kvwave::client::Client.
#include "client/capi/kvwave_c.h"

#include <algorithm>
#include <iterator>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvwave/client.h"

struct kvwave_client {
  std::unique_ptr<kvwave::client::Client> client;
};

namespace {

thread_local std::string last_error;

int Fail(const absl::Status& st) {
  last_error = st.ToString();
  return st.ok() ? 0 : static_cast<int>(st.code());
}

}  // namespace

extern "C" {

const char* kvwave_last_error(void) { return last_error.c_str(); }

kvwave_client* kvwave_connect(const char* socket_path, size_t shared_memory_bytes) {
  kvwave::client::ClientOptions o;
  o.socket_path = socket_path;
  o.shared_memory_bytes = shared_memory_bytes;
  auto c = kvwave::client::Client::Connect(o);
  if (!c.ok()) {
    Fail(c.status());
    return nullptr;
  }
  return new kvwave_client{std::move(*c)};
}

void kvwave_disconnect(kvwave_client* c) { delete c; }

uint64_t kvwave_open(kvwave_client* c, int layers, int q_heads, int kv_heads, int head_dim,
                     int dtype) {
  kvwave::client::OpenOptions o;
  o.shape = {layers, q_heads, kv_heads, head_dim, static_cast<kvwave::DType>(dtype)};
  auto r = c->client->Open(o);
  if (!r.ok()) {
    Fail(r.status());
    return 0;
  }
  return r->id;
}

int kvwave_append(kvwave_client* c, uint64_t ctx, int layer, int64_t n, const void* k,
                  const void* v, size_t bytes_each) {
  return Fail(c->client->Append(ctx, layer, n,
                                std::span(static_cast<const std::byte*>(k), bytes_each),
                                std::span(static_cast<const std::byte*>(v), bytes_each)));
}

int kvwave_seal(kvwave_client* c, uint64_t ctx) { return Fail(c->client->Seal(ctx)); }

int kvwave_close(kvwave_client* c, uint64_t ctx) { return Fail(c->client->Close(ctx)); }

int kvwave_attend(kvwave_client* c, uint64_t ctx, int layer, const float* q, size_t q_floats,
                  double retrieval, double estimation, float* out, float* lse) {
  return kvwave_attend_stats(c, ctx, layer, q, q_floats, retrieval, estimation, out, lse, nullptr);
}

int kvwave_attend_stats(kvwave_client* c, uint64_t ctx, int layer, const float* q, size_t q_floats,
                        double retrieval, double estimation, float* out, float* lse,
                        int64_t* stats) {
  auto info = c->client->Info(ctx);
  if (!info.ok()) return Fail(info.status());
  const size_t heads = static_cast<size_t>(info->shape.q_heads);
  kvwave::client::AttendStats st;
  const int rc = Fail(c->client->Attend(ctx, layer, std::span(q, q_floats), {retrieval, estimation},
                                        std::span(out, q_floats), std::span(lse, heads), &st));
  if (rc == 0 && stats != nullptr) {
    const int64_t v[] = {st.steady_tokens,      st.retrieved_tokens, st.retrieved_clusters,
                         st.estimated_clusters, st.total_clusters,   st.scored_tokens,
                         st.graph_keys_scored};
    std::copy(std::begin(v), std::end(v), stats);
  }
  return rc;
}

uint64_t kvwave_register_device_buffers(kvwave_client* c, uintptr_t q, size_t q_bytes,
                                        uintptr_t out, size_t out_bytes, uintptr_t lse,
                                        size_t lse_bytes) {
  auto r = c->client->RegisterDeviceBuffers(reinterpret_cast<const void*>(q), q_bytes,
                                            reinterpret_cast<void*>(out), out_bytes,
                                            reinterpret_cast<void*>(lse), lse_bytes);
  if (!r.ok()) {
    Fail(r.status());
    return 0;
  }
  return *r;
}

int kvwave_unregister_device_buffers(kvwave_client* c, uint64_t registration) {
  return Fail(c->client->UnregisterDeviceBuffers(registration));
}

int kvwave_attend_device(kvwave_client* c, uint64_t registration, int layer, const uint64_t* ctxs,
                         size_t count, uint64_t q_offset, uint64_t out_offset, uint64_t lse_offset,
                         double retrieval, double estimation, uintptr_t stream) {
  std::vector<kvwave::client::AttendBatchEntry> entries(count);
  for (size_t i = 0; i < count; ++i) entries[i] = {ctxs[i], {retrieval, estimation}};
  return Fail(c->client->AttendBatchDevice(registration, layer, entries,
                                           {q_offset, out_offset, lse_offset},
                                           reinterpret_cast<CUstream_st*>(stream)));
}

}  // extern "C"
