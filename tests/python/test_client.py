"""The Python binding against the real kvwaved: numpy in, numpy out, checked against float64."""
import numpy as np
import pytest

import kvwave


def exact_attention(q, k, v):
    """q [Hq, D], k/v [N, Hkv, D] -> out [Hq, D] in float64."""
    hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros((hq, d))
    for h in range(hq):
        s = k[:, h // g, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(d)
        w = np.exp(s - s.max())
        out[h] = (w[:, None] * v[:, h // g, :].astype(np.float64)).sum(0) / w.sum()
    return out


@pytest.fixture(params=["shm", "inline"])
def client(daemon, request):
    return kvwave.Client(daemon, shared_memory_bytes=(8 << 20) if request.param == "shm" else 0)


def test_round_trip_matches_float64(client):
    seed = np.random.SeedSequence().entropy % (2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    n, hq, hkv, d = 2000, 8, 2, 64
    ctx, matched = client.open(2, hq, hkv, d, dtype="f16")
    assert matched == 0
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    for layer in range(2):
        client.append(ctx, layer, k, v)
    client.seal(ctx)
    q = (0.5 * rng.standard_normal((hq, d))).astype(np.float32)
    out, lse, stats = client.attend(ctx, 1, q, retrieval_budget=1.0, estimation_budget=0.0)
    ref = exact_attention(q, k, v)
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert out.shape == (hq, d) and lse.shape == (hq,)
    assert rel.max() < 1e-3, rel
    positions, scores, scored, total = client.retrieve(ctx, 0, q, k=10, method="flat")
    assert positions.shape == (hq, 10) and positions.dtype == np.int64
    assert scored > 0 and total > 0
    gk, gv = client.gather(ctx, 0, np.array([0, 5, n - 1]))
    assert gk.dtype == np.float16
    np.testing.assert_array_equal(gk, k[[0, 5, n - 1]])
    np.testing.assert_array_equal(gv, v[[0, 5, n - 1]])
    info = client.info(ctx)
    assert info["tokens_per_layer"] == [n, n] and info["dtype"] == "f16"
    client.close(ctx)


def test_errors_become_python_exceptions(client):
    with pytest.raises(KeyError):
        client.seal(987654321)
    ctx, _ = client.open(1, 4, 1, 64, dtype="f32")
    with pytest.raises(ValueError):  # 3 heads, the context has 4
        client.attend(ctx, 0, np.ones((3, 64), np.float32))
    with pytest.raises(ValueError):  # wrong element type for an f32 context (bytes mismatch)
        client.append(ctx, 0, np.ones((4, 1, 64), np.float16), np.ones((4, 1, 64), np.float16))
    client.ping()
    client.close(ctx)


def test_stats_and_contexts(daemon):
    c = kvwave.Client(daemon)
    ctx, _ = c.open(1, 2, 1, 64)
    assert any(i["id"] == ctx and i["session_id"] == c.session_id for i in c.contexts())
    s = c.stats()
    assert s["ops"]["open"]["count"] >= 1
    assert "kvwave_requests_total" in s["prometheus_text"]
    c.drop(ctx)
    with pytest.raises(KeyError):
        c.close(ctx)


def test_credentials_are_presented_and_unknown_ones_refused(daemon):
    # The daemon has no trust.* tokens configured: any credential matches none and is refused at
    # connect (PERMISSION_DENIED); none at all connects as before.
    with pytest.raises(Exception, match="PERMISSION_DENIED"):
        kvwave.Client(daemon, credentials=["not-a-configured-token-0123456789"])
    assert kvwave.Client(daemon, credentials=[]).ping() is None


def test_attend_batch_equals_one_attend_per_context(client):
    seed = np.random.SeedSequence().entropy % (2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    hq, hkv, d = 8, 2, 64
    ctxs = []
    for n in (10, 700, 2500):  # contexts of different lengths, one batch
        ctx, _ = client.open(1, hq, hkv, d, dtype="f32")
        client.append(ctx, 0, rng.standard_normal((n, hkv, d)).astype(np.float32),
                      rng.standard_normal((n, hkv, d)).astype(np.float32))
        ctxs.append(ctx)
    q = (0.5 * rng.standard_normal((len(ctxs), hq, d))).astype(np.float32)
    budgets = [(1.0, 0.0), (0.1, 0.2), (-1.0, -1.0)]
    out, lse, stats = client.attend_batch(0, ctxs, q, budgets)
    assert out.shape == (3, hq, d) and lse.shape == (3, hq) and len(stats) == 3
    for i, ctx in enumerate(ctxs):
        one, one_lse, one_stats = client.attend(ctx, 0, q[i], *budgets[i])
        np.testing.assert_array_equal(out[i], one)
        np.testing.assert_array_equal(lse[i], one_lse)
        assert stats[i] == one_stats
    with pytest.raises(ValueError):  # the same context twice
        client.attend_batch(0, [ctxs[0], ctxs[0]], q[:2])
    for ctx in ctxs:
        client.close(ctx)


def test_device_calls_on_a_cpu_daemon_are_clear_errors(daemon):
    c = kvwave.Client(daemon)
    with pytest.raises(Exception, match="no GPU backend"):
        c.register_device_handles(b"\x01" * 16, (b"q" * 64, 0, 1024), (b"o" * 64, 0, 1024),
                                  (b"l" * 64, 0, 64), b"e" * 64, b"f" * 64)
    with pytest.raises(Exception, match="not open in this session"):
        c.attend_device(1, 0, [1], 0, 0, 0, 0)
    assert c.ping() is None
