"""RetrievalAttention through the Python binding (issue 19): prefill queries appended with K/V,
graphs per sealed segment reported by info(), retrieve(method="graph") and
attend(method="retrievalattention") checked against float64; a context without queries is refused
the graph methods."""
import os
import signal

import numpy as np
import pytest

import kvwave
from conftest import BINARY_DIR, start_kvwaved

SEGMENT, RECENT = 512, 16


@pytest.fixture(scope="module")
def graph_daemon(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("kvwave-graph") / "kvwaved.sock")
    settings = ["rpc.socket_path=" + sock, "log.level=warn", "gpu.mode=off", "index.graph=on",
                "index.graph_queries=600", "index.graph_degree=16",
                "store.prefill_segment_tokens=%d" % SEGMENT, "store.recent_tokens=%d" % RECENT]
    args = []
    for s in settings:
        args += ["--set", s]
    proc = start_kvwaved(os.path.join(BINARY_DIR, "rpc", "kvwaved"), args)
    yield sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def exact(q, k, v):
    """q [Hq, D], k/v [N, Hkv, D] -> (out [Hq, D], top positions by score) in float64."""
    hq, d = q.shape
    g = hq // k.shape[1]
    out, scores = np.zeros((hq, d)), []
    for h in range(hq):
        s = k[:, h // g, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(d)
        w = np.exp(s - s.max())
        out[h] = (w[:, None] * v[:, h // g, :].astype(np.float64)).sum(0) / w.sum()
        scores.append(s)
    return out, np.array(scores)


@pytest.mark.parametrize("shm", [True, False])
def test_graph_methods_match_float64(graph_daemon, shm):
    seed = np.random.SeedSequence().entropy % (2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    client = kvwave.Client(graph_daemon, shared_memory_bytes=(8 << 20) if shm else 0)
    n, hq, hkv, d = 2 * SEGMENT + RECENT, 4, 2, 32
    ctx, _ = client.open(1, hq, hkv, d, dtype="f32")
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    pq = (rng.standard_normal((n, hq, d)) + 0.3).astype(np.float32)
    for t in range(0, n, 200):
        client.append(ctx, 0, k[t:t + 200], v[t:t + 200], q=pq[t:t + 200])
    client.seal(ctx)
    info = client.info(ctx)
    assert info["has_queries"] and info["graph_segments"] == 2 * hkv
    assert info["query_tokens"] == RECENT * hkv
    q = (rng.standard_normal((hq, d)) + 0.3).astype(np.float32)
    ref, scores = exact(q, k, v)
    positions, _, _, _ = client.retrieve(ctx, 0, q, k=10, method="graph", beam=65536)
    for h in range(hq):
        np.testing.assert_array_equal(positions[h], np.argsort(-scores[h], kind="stable")[:10])
    out, lse, stats = client.attend(ctx, 0, q, method="retrievalattention", graph_top_k=65536,
                                    beam=65536)
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-4, rel
    assert stats["retrieved_tokens"] == (2 * SEGMENT - 4) * hq and stats["graph_keys_scored"] > 0
    client.close(ctx)


def test_context_without_queries_is_refused_the_graph_methods(graph_daemon):
    client = kvwave.Client(graph_daemon)
    ctx, _ = client.open(1, 4, 2, 32, dtype="f32")
    kv = np.ones((600, 2, 32), np.float32)
    client.append(ctx, 0, kv, kv)
    assert not client.info(ctx)["has_queries"]
    q = np.ones((4, 32), np.float32)
    with pytest.raises(kvwave.Error, match="no RetrievalAttention graphs"):
        client.retrieve(ctx, 0, q, method="graph")
    with pytest.raises(kvwave.Error, match="no RetrievalAttention graphs"):
        client.attend(ctx, 0, q, method="retrievalattention")
    with pytest.raises(ValueError):
        client.attend(ctx, 0, q, method="nonsense")
    with pytest.raises(ValueError):  # queries of 3 heads, the context has 4
        client.append(ctx, 0, kv[:5], kv[:5], q=np.ones((5, 3, 32), np.float32))
    client.attend(ctx, 0, q)  # the wave index serves it
