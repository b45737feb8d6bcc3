/* A C ABI over the C++ client (client/include/kvwave/client.h), for languages that load a shared
 * library (Python's ctypes in client/python/kvwave_ctypes.py, which needs no build for a given
 * Python version). Only what a decode loop needs: open, append, seal, attend on host tensors,
 * and device tensors (register / attend_device / unregister).
 *
 * Errors: functions return 0 on success, else the absl status code (and 0 / null for handles and
 * ids); kvwave_last_error() is the message of the calling thread's last error.
 * Thread-safety: a client handle as a kvwave::client::Client (calls serialised). */
#ifndef KVWAVE_CLIENT_CAPI_KVWAVE_C_H_
#define KVWAVE_CLIENT_CAPI_KVWAVE_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvwave_client kvwave_client;

const char* kvwave_last_error(void);
kvwave_client* kvwave_connect(const char* socket_path, size_t shared_memory_bytes);
void kvwave_disconnect(kvwave_client* c);
/* dtype: 0 f32, 1 f16, 2 bf16. */
uint64_t kvwave_open(kvwave_client* c, int layers, int q_heads, int kv_heads, int head_dim,
                     int dtype);
int kvwave_append(kvwave_client* c, uint64_t ctx, int layer, int64_t n, const void* k,
                  const void* v, size_t bytes_each);
int kvwave_seal(kvwave_client* c, uint64_t ctx);
/* Closes a context of this session (its memory is released; shared prefix blocks stay cached). */
int kvwave_close(kvwave_client* c, uint64_t ctx);
/* Host tensors: q, out [q_heads x head_dim], lse [q_heads] float32; budgets < 0: defaults. */
int kvwave_attend(kvwave_client* c, uint64_t ctx, int layer, const float* q, size_t q_floats,
                  double retrieval, double estimation, float* out, float* lse);
/* kvwave_attend with the call's statistics (null: none): stats[0..6] = steady_tokens,
 * retrieved_tokens, retrieved_clusters, estimated_clusters, total_clusters, scored_tokens,
 * graph_keys_scored (kvwave::client::AttendStats, in its order). */
int kvwave_attend_stats(kvwave_client* c, uint64_t ctx, int layer, const float* q, size_t q_floats,
                        double retrieval, double estimation, float* out, float* lse,
                        int64_t* stats);
uint64_t kvwave_register_device_buffers(kvwave_client* c, uintptr_t q, size_t q_bytes,
                                        uintptr_t out, size_t out_bytes, uintptr_t lse,
                                        size_t lse_bytes);
int kvwave_unregister_device_buffers(kvwave_client* c, uint64_t registration);
/* One layer of B contexts on a registration, ordered on `stream` (a cudaStream_t). */
int kvwave_attend_device(kvwave_client* c, uint64_t registration, int layer, const uint64_t* ctxs,
                         size_t count, uint64_t q_offset, uint64_t out_offset, uint64_t lse_offset,
                         double retrieval, double estimation, uintptr_t stream);

#ifdef __cplusplus
}
#endif

#endif /* KVWAVE_CLIENT_CAPI_KVWAVE_C_H_ */
