"""The sparse path's accuracy through a real kvwaved at its default budgets, on seeded data: Attend's output
error against a float64 reference and Retrieve's top-k recall stay within stated bounds (issue 18 item 3).

The data has the structure sparse attention relies on: keys around 64 centres (so a cluster holds related
keys) and each query pointing at one key (so the attention mass sits on few keys). The bounds are the values
measured with the default seed, with margin: a regression in ranking, estimation or merging breaks them.
KVWAVE_TEST_SEED=N runs another seed (the bounds are set loosely enough to hold for other seeds too)."""
import os

import numpy as np
import pytest

kvwave = pytest.importorskip("kvwave")

SEED = int(os.environ.get("KVWAVE_TEST_SEED", "20261207"))
N, KV, G, D, QUERIES, TOPK = 4096, 2, 4, 128, 16, 32


def make_data(rng):
    centres = rng.standard_normal((KV, 64, D))
    member = rng.integers(0, 64, size=(KV, N))
    k = (np.take_along_axis(centres, member[..., None], 1) + 0.5 * rng.standard_normal((KV, N, D)))
    v = rng.standard_normal((KV, N, D))
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    # query i of KV head h: the group's heads point at one random key beyond the steady zone (each with its own
    # noise), scaled so that its logit is ~8 above the typical one
    targets = rng.integers(100, N - 100, size=(QUERIES, KV))
    q = np.empty((QUERIES, KV * G, D), np.float32)
    for i in range(QUERIES):
        for h in range(KV):
            for g in range(G):
                t = k16[h, targets[i, h]].astype(np.float64)
                q[i, h * G + g] = (8.0 * np.sqrt(D) * t / np.dot(t, t) + 0.3 * rng.standard_normal(D))
    return k16, v16, q


def reference(q, k16, v16):
    """float64 exact attention of one query [KV*G, D] -> out [KV*G, D], logits [KV*G, N]"""
    out = np.empty((KV * G, D))
    logits = np.empty((KV * G, N))
    for h in range(KV * G):
        s = k16[h // G].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(D)
        w = np.exp(s - s.max())
        out[h] = (w / w.sum()) @ v16[h // G].astype(np.float64)
        logits[h] = s
    return out, logits


def test_default_budgets_error_and_recall_on_seeded_data(daemon):
    print(f"seed {SEED} (KVWAVE_TEST_SEED)")
    rng = np.random.default_rng(SEED)
    k16, v16, q = make_data(rng)
    c = kvwave.Client(daemon)
    ctx, _ = c.open(layers=1, q_heads=KV * G, kv_heads=KV, head_dim=D, dtype="f16")
    for a in range(0, N, 1024):  # a few appends, then the end of prefill
        c.append(ctx, 0, np.ascontiguousarray(k16[:, a:a + 1024].transpose(1, 0, 2)),
                 np.ascontiguousarray(v16[:, a:a + 1024].transpose(1, 0, 2)))
    c.seal(ctx)
    errs, errs_noest, errs_full, recalls, exact_share = [], [], [], [], []
    for i in range(QUERIES):
        ref, logits = reference(q[i], k16, v16)
        out, _, st = c.attend(ctx, 0, q[i])  # the daemon's default budgets
        # the default estimation is the rest (capped at what retrieval leaves), also when a request names
        # only its retrieval budget: every non-empty cluster (those a 100% budget retrieves) is covered
        _, _, st100 = c.attend(ctx, 0, q[i], retrieval_budget=1.0, estimation_budget=0.0)
        _, _, st5 = c.attend(ctx, 0, q[i], retrieval_budget=0.05)
        for s in (st, st5):
            assert s["retrieved_clusters"] + s["estimated_clusters"] == st100["retrieved_clusters"], (s, st100)
        assert st5["retrieved_clusters"] > st["retrieved_clusters"], (st5, st)
        errs.append(np.linalg.norm(out - ref, axis=1).mean() / np.linalg.norm(ref, axis=1).mean())
        exact_share.append((st["steady_tokens"] + st["retrieved_tokens"]) / (KV * N))
        noest, _, _ = c.attend(ctx, 0, q[i], retrieval_budget=0.018, estimation_budget=0.0)
        errs_noest.append(np.linalg.norm(noest - ref, axis=1).mean() / np.linalg.norm(ref, axis=1).mean())
        full, _, _ = c.attend(ctx, 0, q[i], retrieval_budget=1.0, estimation_budget=0.0)
        errs_full.append(np.abs(full - ref).max())
        pos, _, _, _ = c.retrieve(ctx, 0, q[i], k=TOPK)
        for h in range(KV * G):
            top = set(np.argsort(-logits[h])[:TOPK].tolist())
            recalls.append(len(top & set(pos[h].tolist())) / TOPK)
    c.close(ctx)
    err, recall = float(np.mean(errs)), float(np.mean(recalls))
    print(f"default budgets: mean relative output error {err:.4f} (max {max(errs):.4f}), Retrieve recall@{TOPK} "
          f"{recall:.3f} (min {min(recalls):.2f}), exactly attended {np.mean(exact_share) * 100:.1f}% of keys; "
          f"100% budget max |error| {max(errs_full):.2e}; 1.8% retrieved without estimation: error "
          f"{np.mean(errs_noest):.4f}")
    assert max(errs_full) < 2e-3  # a 100% budget is exact attention (f16 K/V, f32 math)
    assert np.mean(exact_share) < 0.05  # the defaults attend only a small share exactly
    # Measured with seeds 20261207 and 1-5 at the paper's budgets (the defaults until issue 18): mean error
    # 0.068-0.084, worst query 0.137, recall@32 1.0; at today's defaults (two_pass, 1.8% + the rest), seeds
    # 20261207 and 1-3: 0.012-0.018, worst query 0.058.
    assert err < 0.12, err
    assert max(errs) < 0.25, max(errs)
    assert recall > 0.95, recall
    # The estimation zone earns its place: the same retrieval without it is worse.
    assert err < np.mean(errs_noest), (err, np.mean(errs_noest))


@pytest.fixture(scope="module")
def rank_daemons(tmp_path_factory):
    """one kvwaved per ranking (attend.rank named explicitly, whatever the default is)"""
    import signal

    from conftest import BINARY_DIR, start_kvwaved
    out, procs = {}, []
    try:
        for rank in ("centroid", "two_pass"):
            sock = str(tmp_path_factory.mktemp("kvwave") / "kvwaved.sock")
            procs.append(start_kvwaved(os.path.join(BINARY_DIR, "rpc", "kvwaved"),
                                       ["--set", "rpc.socket_path=" + sock, "--set", "log.level=warn",
                                        "--set", "attend.rank=" + rank]))
            out[rank] = sock
        yield out
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=30) == 0


def push(c, k16, v16):
    ctx, _ = c.open(layers=1, q_heads=KV * G, kv_heads=KV, head_dim=D, dtype="f16")
    for a in range(0, N, 1024):
        c.append(ctx, 0, np.ascontiguousarray(k16[:, a:a + 1024].transpose(1, 0, 2)),
                 np.ascontiguousarray(v16[:, a:a + 1024].transpose(1, 0, 2)))
    c.seal(ctx)
    return ctx


def test_two_pass_ranking_through_the_daemon(rank_daemons):
    """attend.rank = two_pass (issue 18): the same error bounds as the centroid ranking at the default budgets,
    never more keys attended exactly than the centroid ranking, the second pass's scored keys reported (at least
    the keys the centroid ranking retrieves: its candidates include them), and a 100% budget still exact."""
    print(f"seed {SEED} (KVWAVE_TEST_SEED)")
    rng = np.random.default_rng(SEED)
    k16, v16, q = make_data(rng)
    cc, ct = kvwave.Client(rank_daemons["centroid"]), kvwave.Client(rank_daemons["two_pass"])
    xc, xt = push(cc, k16, v16), push(ct, k16, v16)
    errs, errs_c, errs_full, scored = [], [], [], []
    for i in range(QUERIES):
        ref, _ = reference(q[i], k16, v16)
        out, _, st = ct.attend(xt, 0, q[i])
        outc, _, sc = cc.attend(xc, 0, q[i])
        errs.append(np.linalg.norm(out - ref, axis=1).mean() / np.linalg.norm(ref, axis=1).mean())
        errs_c.append(np.linalg.norm(outc - ref, axis=1).mean() / np.linalg.norm(ref, axis=1).mean())
        assert sc["scored_tokens"] == 0
        assert st["retrieved_tokens"] <= sc["retrieved_tokens"]
        assert st["scored_tokens"] >= sc["retrieved_tokens"] > 0
        assert st["retrieved_clusters"] + st["estimated_clusters"] == sc["retrieved_clusters"] + sc["estimated_clusters"]
        scored.append(st["scored_tokens"] / (KV * N))
        full, _, _ = ct.attend(xt, 0, q[i], retrieval_budget=1.0, estimation_budget=0.0)
        errs_full.append(np.abs(full - ref).max())
    cc.close(xc)
    ct.close(xt)
    print(f"two_pass: mean relative output error {np.mean(errs):.4f} (max {max(errs):.4f}; centroid "
          f"{np.mean(errs_c):.4f}), keys scored by the second pass {np.mean(scored) * 100:.2f}%; 100% budget max "
          f"|error| {max(errs_full):.2e}")
    assert max(errs_full) < 2e-3
    assert np.mean(errs) < 0.12, np.mean(errs)
    assert max(errs) < 0.25, max(errs)
