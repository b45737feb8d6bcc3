#!/usr/bin/env python3
"""Would prefetching the clusters ranked just below the retrieval cut raise the wave buffer's hit ratio?
A model of kvwave-decode-bench's synthetic setting (one KV head, 4 query heads, d 128, clusters of 1..31
tokens around N(0,1) centres, AR(1) queries rho 0.9, 2.5*(walk + 0.3 noise)), softmax-sum cluster scores,
retrieval = top 1.8% of clusters, an LRU pool of 5% of the tokens in 16-row pages. Prefetch p: after each
step the clusters ranked [k, k+p) are admitted too (most recently used after the retrieved ones)."""
import sys
from collections import OrderedDict
import numpy as np

def run(n_tokens, p_frac, pool=0.05, steps=300, warm=50, seed=1, rho=0.9, G=4, D=128, page=16):
    rng = np.random.default_rng(seed)
    sizes = []
    t = 0
    while t < n_tokens:
        s = int(rng.integers(1, 32)); sizes.append(s); t += s
    n = len(sizes); sizes = np.array(sizes)
    pages = (sizes + page - 1) // page
    C = rng.standard_normal((n, D)).astype(np.float32)
    cap = int(pool * n_tokens / page)
    k = max(1, int(round(0.018 * n))); p = int(round(p_frac * n))
    walk = rng.standard_normal(D).astype(np.float32)
    lru = OrderedDict(); used = 0
    hit = miss = adm = 0
    for s in range(steps):
        walk = rho * walk + np.sqrt(1 - rho * rho) * rng.standard_normal(D).astype(np.float32)
        q = 2.5 * (walk[None] + 0.3 * rng.standard_normal((G, D)).astype(np.float32))
        lg = (q @ C.T) / np.sqrt(D)
        sc = np.exp(lg - lg.max(1, keepdims=True)); sc = (sc / sc.sum(1, keepdims=True)).sum(0)
        order = np.argpartition(-sc, k + p)[:k + p]
        order = order[np.argsort(-sc[order])]
        top, pre = order[:k], order[k:k + p]
        for c in top:
            if c in lru:
                if s >= warm: hit += pages[c]
                lru.move_to_end(c)
            else:
                if s >= warm: miss += pages[c]
        def admit(c):
            nonlocal used, adm
            if c in lru: lru.move_to_end(c); return
            while used + pages[c] > cap and lru:
                _, pg = lru.popitem(last=False); used -= pg
            lru[c] = pages[c]; used += pages[c]
            if s >= warm: adm += pages[c]
        for c in pre[::-1]: admit(c)   # prefetched: older than the retrieved ones
        for c in top: admit(c)
    m = steps - warm
    return hit / (hit + miss), miss / m, adm / m, k, p, cap

for n_tokens in (32768, 131072):
    for pf in (0.0, 0.009, 0.018, 0.036):
        hr, mps, aps, k, p, cap = run(n_tokens, pf)
        print(f"tokens {n_tokens} k {k} prefetch {p:4d} ({pf*100:.1f}%) pool {cap} pages: page-hit {hr:.3f}  "
              f"miss pages/step {mps:6.1f}  admitted pages/step {aps:6.1f}", flush=True)

# The pool's size instead (gpu.cache_fraction), no prefetch.
for pool in (0.10, 0.20):
    hr, mps, aps, k, p, cap = run(131072, 0.0, pool=pool)
    print(f"tokens 131072 k {k} prefetch 0 pool {pool:.2f} of the tokens ({cap} pages): page-hit {hr:.3f}  "
          f"miss pages/step {mps:6.1f}", flush=True)
