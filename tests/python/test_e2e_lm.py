"""The real model of ../shared/data/lm decodes through a real kvwaved (bench/e2e_lm.py, small)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY_DIR = os.environ.get("KVWAVE_BINARY_DIR", os.path.join(ROOT, "build"))
LM = os.path.join(ROOT, "..", "shared", "data", "lm")


def test_full_budget_reproduces_full_attention_loss(tmp_path):
    pytest.importorskip("torch")
    if not os.path.exists(os.path.join(LM, "qkdump.py")):
        pytest.skip("../shared/data/lm is absent (the project was cloned alone)")
    out = tmp_path / "e2e.json"
    env = dict(os.environ, KVWAVE_PYTHONPATH=os.path.join(BINARY_DIR, "client", "python"),
               KVWAVED=os.path.join(BINARY_DIR, "rpc", "kvwaved"))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e_lm.py"), "--context", "2048",
                    "--steps", "24", "--methods", "full,tripartite-0.018-0.232,tripartite-0.02-rest", "--json", str(out)],
                   check=True, env=env, timeout=600)
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    full = rows["full"]
    # A 100% budget is exact attention: same loss (K/V travel as f16) and the same greedy tokens.
    assert abs(full["loss"] - full["full_loss"]) <= 2e-3 * full["full_loss"]
    assert full["top1_agreement"] == 1.0
    sparse = rows["tripartite-0.018-0.232"]
    assert sparse["loss"] > 0 and 0.0 <= sparse["top1_agreement"] <= 1.0
    # Rows at any budgets by name ("rest" = every cluster not retrieved).
    rest = rows["tripartite-0.02-rest"]
    assert rest["retrieval_budget"] == 0.02 and abs(rest["estimation_budget"] - 0.98) < 1e-12
    # The daemon holds at least the raw f16 K/V of the context (plus page padding and the meta index).
    assert full["memory_ratio"] >= 1.0 and rest["memory_ratio"] >= 1.0
