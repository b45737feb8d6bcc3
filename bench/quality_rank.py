#!/usr/bin/env python3
"""Prototype cluster rankings for kvwave's retrieval zone, judged on the real model (issue 18, item 2).

Each prototype is a decode-step attention attend(layer, q, k_cache, v_cache) (the NIAH kit's swappable
function) that emulates kvwave in torch: the prefill keys outside the steady zone (4 sinks + the latest 64
prefill tokens + every decoded token) are clustered like the wave index (segments of 8192 tokens; mean-centred,
L2-normalised keys; ceil(n/T) clusters seeded with evenly spaced tokens; 10 rounds of spherical k-means; a final
assignment; centroids = plain means of the members' keys; value sums), then a RANKING picks the clusters that
are attended exactly, the steady zone is attended exactly, and the clusters not retrieved are estimated from
centroid and value sum (weight size * e^{q.c/sqrt(D)}) - all of them ('rest') or the next 23.2% ('paper').
Every prototype retrieves the same number of keys as the default ranking would (ceil(1.8% of the clusters) of
16 tokens), except the adaptive one, whose mean budget is reported.

Rankings (per KV head; the group's query heads combined by summing per-head softmaxes, as kvwave does):
  centroid      q.c (kvwave's)
  quest         Quest's per-dimension bound over each cluster's members: sum_d max(q_d min_d, q_d max_d)
  radius        q.c + |q| r_c, r_c = the largest distance of a member key from the centroid (a true bound)
  fineT         centroid ranking over clusters of T tokens (T = 8, 4), same number of retrieved keys
  twopassM      centroid ranking picks M x the budget's clusters; their members are scored exactly; clusters
                are re-ranked by their best member's logit and the budget's clusters retrieved
  adaptT        retrieve clusters in centroid order until the share of the estimated mass left out is < T
                when that takes at most 3x the default budget, else the default budget (a diffuse head:
                estimation covers it); its mean exactly attended keys reported
  oracle        the best keys by true softmax mass (as many as the centroid ranking retrieves), no estimation

Used by bench/niah_lm.py (--methods proto:NAME[:est]) for NIAH accuracy, and here for the loss:

    python3 bench/quality_rank.py loss --context 8192 --steps 64 --protos centroid,quest,... [--json OUT]

(the base model of ../shared/data/lm, teacher-forced over The Devil's Dictionary after C tokens; loss and top-1
agreement against the model's own full attention, like bench/e2e_lm.py but without the daemon).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

SEGMENT, SINKS, RECENT, TPC, ITERS = 8192, 4, 64, 16, 10
RETRIEVAL, PAPER_EST = 0.018, 0.232


def spherical_kmeans(keys, tokens_per_cluster, iters=ITERS):
    """kvwave's wave-index clustering of one segment's keys (m, d) -> assignment (m,), centroids (C, d)"""
    m = keys.shape[0]
    C = max(1, math.ceil(m / tokens_per_cluster))
    x = keys - keys.mean(0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cent = x[torch.arange(C) * m // C].clone()  # token c * m / C, as the wave index seeds
    for _ in range(iters + 1):
        assign = (x @ cent.T).argmax(1)
        s = torch.zeros(C, x.shape[1]).index_add_(0, assign, x)
        empty = s.norm(dim=1) == 0
        s[empty] = cent[empty]  # an empty cluster keeps its centre
        cent = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return assign, C


class Index:
    """the emulated wave index of one layer and KV head: clusters over positions [SINKS, P - RECENT)"""

    def __init__(s, K, V, P, tpc):
        lo, hi = SINKS, max(SINKS, P - RECENT)
        s.lo, s.hi = lo, hi
        cents, sizes, vsum, kmin, kmax, rad, members, kvar = [], [], [], [], [], [], [], []
        for a in range(lo, hi, SEGMENT):
            b = min(hi, a + SEGMENT)
            assign, C = spherical_kmeans(K[a:b], tpc)
            cnt = torch.bincount(assign, minlength=C)
            keep = cnt > 0
            ids = torch.nonzero(keep).flatten()
            remap = torch.full((C,), -1, dtype=torch.long)
            remap[ids] = torch.arange(len(ids))
            assign = remap[assign]
            C = len(ids)
            cnt = cnt[keep].float()
            c = torch.zeros(C, K.shape[1]).index_add_(0, assign, K[a:b]) / cnt[:, None]
            cents.append(c)
            sizes.append(cnt)
            # per-dimension variance of the members' keys (the 'var' / 'iso' estimation corrections)
            k2 = torch.zeros(C, K.shape[1]).index_add_(0, assign, K[a:b] ** 2) / cnt[:, None]
            kvar.append((k2 - c ** 2).clamp_min(0))
            vsum.append(torch.zeros(C, V.shape[1]).index_add_(0, assign, V[a:b]))
            mn = torch.full((C, K.shape[1]), float('inf')).scatter_reduce(0, assign[:, None].expand(-1, K.shape[1]), K[a:b], 'amin')
            mx = torch.full((C, K.shape[1]), float('-inf')).scatter_reduce(0, assign[:, None].expand(-1, K.shape[1]), K[a:b], 'amax')
            kmin.append(mn)
            kmax.append(mx)
            dist = (K[a:b] - c[assign]).norm(dim=1)
            rad.append(torch.zeros(C).scatter_reduce(0, assign, dist, 'amax'))
            order = torch.argsort(assign, stable=True) + a
            members.append((order, torch.cumsum(torch.cat([torch.zeros(1), cnt]), 0).long()))
        s.cent = torch.cat(cents) if cents else torch.zeros(0, K.shape[1])
        s.size = torch.cat(sizes) if sizes else torch.zeros(0)
        s.vsum = torch.cat(vsum) if vsum else torch.zeros(0, V.shape[1])
        s.kmin = torch.cat(kmin) if kmin else torch.zeros(0, K.shape[1])
        s.kmax = torch.cat(kmax) if kmax else torch.zeros(0, K.shape[1])
        s.rad = torch.cat(rad) if rad else torch.zeros(0)
        s.kvar = torch.cat(kvar) if kvar else torch.zeros(0, K.shape[1])
        # members of cluster j (global numbering): positions pos[start[j]:start[j + 1]]
        pos, start, base, off = [], [0], 0, 0
        for order, st in members:
            pos.append(order)
            start += (st[1:] + base).tolist()
            base += int(st[-1])
        s.pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
        s.start = torch.tensor(start)
        s.C = len(s.size)

    def member_positions(s, clusters):
        if len(clusters) == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([s.pos[s.start[j]:s.start[j + 1]] for j in clusters.tolist()])


_CACHE = {}


def cached_index(layer, kh, K, V, P, tpc):
    """the same prefill gives the same index: shared by the prototypes run on one instance"""
    key = (layer, kh, P, tpc, float(K[:P].double().sum()), float(V[:P].double().sum()))
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.clear()
        _CACHE[key] = Index(K, V, P, tpc)
    return _CACHE[key]


def group_softmax_sum(logits):
    """(g, C) logits -> (C,) sum over the group's heads of each head's softmax (kvwave's cluster score)"""
    return logits.softmax(-1).sum(0)


class Proto:
    """one prototype attention; begin() before each sequence (drops the indexes)"""

    def __init__(s, ranking, estimation='rest', tpc=TPC, param=None, kv=1, heads=4):
        s.ranking, s.estimation, s.tpc, s.param = ranking, estimation, tpc, param
        s.index, s.exact_keys, s.keys, s.scored = {}, 0, 0, 0

    def begin(s):
        s.index = {}

    def end(s):
        s.index = {}

    def count(s, exact, n):
        s.exact_keys += exact
        s.keys += n

    def attend(s, layer, q, k_cache, v_cache):
        H, d = q.shape
        KV, n, _ = k_cache.shape
        g = H // KV
        scale = 1.0 / math.sqrt(d)
        out = torch.empty(H, d)
        for kh in range(KV):
            K, V = k_cache[kh].cpu().half().float(), v_cache[kh].cpu().half().float()  # f16, as kvwaved stores them
            qq = q[kh * g:(kh + 1) * g].float().cpu()
            key = (layer, kh)
            if key not in s.index:  # first decode step: positions 0..n-2 are the prefill
                s.index[key] = cached_index(layer, kh, K, V, n - 1, s.tpc)
            ix = s.index[key]
            out[kh * g:(kh + 1) * g] = s.head(ix, qq, K, V, n, scale)
        return out.to(q.device)

    def head(s, ix, q, K, V, n, scale):
        steady = torch.cat([torch.arange(0, min(SINKS, n)), torch.arange(ix.hi, n)])
        C = ix.C
        r = min(C, math.ceil(RETRIEVAL * math.ceil((ix.hi - ix.lo) / TPC) - 1e-9))  # the default's cluster count
        budget_keys = r * TPC  # keys the default retrieves on average
        clog = (q @ ix.cent.T) * scale  # (g, C)
        s.scored += C
        if s.ranking == 'oracle':
            sc = (q @ K.T) * scale
            mass = sc.softmax(-1).sum(0)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[steady] = True
            mass[mask] = -1
            take = int(ix.size[(-group_softmax_sum(clog)).argsort()[:r]].sum()) if C else 0
            if take:
                mask[mass.topk(min(take, int((~mask).sum()))).indices] = True
            s.count(int(mask.sum()), n)
            return sc.masked_fill(~mask, float('-inf')).softmax(-1) @ V
        if s.ranking in ('centroid', 'fine'):
            score = group_softmax_sum(clog)
        elif s.ranking == 'quest':
            ub = torch.maximum(q[:, None] * ix.kmin[None], q[:, None] * ix.kmax[None]).sum(-1) * scale
            score = group_softmax_sum(ub)
            s.scored += C
        elif s.ranking == 'radius':
            ub = clog + q.norm(dim=1, keepdim=True) * ix.rad[None] * scale
            score = group_softmax_sum(ub)
        elif s.ranking == 'twopass':
            cand = group_softmax_sum(clog).argsort(descending=True)[:min(C, int(s.param) * max(r, 1))]
            best = torch.full((C,), float('-inf'))
            for j in cand.tolist():
                p = ix.pos[ix.start[j]:ix.start[j + 1]]
                best[j] = ((q @ K[p].T) * scale).max()
                s.scored += len(p)
            score = best
        elif s.ranking == 'adapt':
            base = group_softmax_sum(clog)
            order = base.argsort(descending=True)
            est = (clog + ix.size.log()[None]).softmax(-1).mean(0)  # each cluster's estimated share of the mass
            left = 1.0 - torch.cumsum(est[order], 0)
            need = int((left >= s.param).sum()) + 1
            # a head whose mass is concentrated gets what it needs (up to 3x); a diffuse one (needs more than
            # that) the default budget - the estimation zone covers diffuse mass about as well
            rr = min(C, max(1, need if need <= 3 * r else r))
            score = torch.zeros(C)
            score[order[:rr]] = torch.arange(rr, 0, -1).float()
            r = rr
        else:
            raise ValueError(s.ranking)
        order = score.argsort(descending=True)
        if s.ranking == 'fine':  # about as many keys as the default's clusters of 16 (never more)
            csum = torch.cumsum(ix.size[order], 0)
            r = max(1, int((csum <= budget_keys).sum()))
        elif s.ranking in ('quest', 'radius', 'twopass'):  # never more keys than the centroid ranking's r clusters
            ref = ix.size[group_softmax_sum(clog).argsort(descending=True)[:r]].sum()
            csum = torch.cumsum(ix.size[order], 0)
            r = max(1, int((csum <= ref).sum()))
        chosen = order[:r]
        rest = order[r:]
        zone = s.estimation.removesuffix('var').removesuffix('iso')
        if zone == 'paper':
            rest = rest[:math.ceil(PAPER_EST * (C - r) - 1e-9)]
        elif zone == 'none':
            rest = rest[:0]
        exact = torch.cat([steady, ix.member_positions(chosen)])
        s.count(len(exact), n)
        lx = (q @ K[exact].T) * scale  # (g, e)
        le = clog[:, rest] + ix.size[rest].log()[None]  # (g, est)
        # A cluster's mass sum_i e^{s_i} >= size * e^{mean s} (Jensen): the plain estimate is low by
        # E[e^{s - mean s}]. With the scores Gaussian over the members, log E = Var(s) / 2, and
        # Var(s) = scale^2 q^T Sigma q: 'var' takes Sigma's diagonal (a d-vector per cluster),
        # 'iso' its mean (one float per cluster).
        if s.estimation.endswith('var'):
            le = le + 0.5 * scale ** 2 * (q ** 2) @ ix.kvar[rest].T
        elif s.estimation.endswith('iso'):
            le = le + 0.5 * scale ** 2 * (q ** 2).sum(1, keepdim=True) * ix.kvar[rest].mean(1)[None]
        vm = ix.vsum[rest] / ix.size[rest][:, None]
        w = torch.cat([lx, le], 1).softmax(-1)
        return w[:, :lx.shape[1]] @ V[exact] + w[:, lx.shape[1]:] @ vm


def make(name):
    """'centroid', 'quest', 'radius', 'fine8', 'twopass4', 'adapt0.5', 'oracle', each with an optional ':rest' /
    ':paper' / ':none' estimation suffix (default rest)"""
    base, _, est = name.partition(':')
    est = est or 'rest'
    if base.startswith('fine'):
        return Proto('fine', est, tpc=int(base[4:]))
    if base.startswith('twopass'):
        return Proto('twopass', est, param=float(base[7:]))
    if base.startswith('adapt'):
        return Proto('adapt', est, param=float(base[5:]))
    if base in ('centroid', 'quest', 'radius', 'oracle'):
        return Proto(base, est)
    raise SystemExit(f'quality_rank: unknown prototype {name!r}')


def loss_main(argv):
    ap = argparse.ArgumentParser(description='loss and top-1 agreement of prototype rankings (base model)')
    ap.add_argument('--context', type=int, default=8192)
    ap.add_argument('--steps', type=int, default=64)
    ap.add_argument('--offset', type=int, default=0, help='first token of the text used')
    ap.add_argument('--protos', default='centroid:paper,centroid,quest,radius,fine8,twopass4,oracle:none')
    ap.add_argument('--model', default=None)
    ap.add_argument('--tokens', default=None)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--json', default='')
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import niah_lm
    shared = niah_lm.SHARED
    model_dir = args.model or os.path.join(shared, 'lm')
    _, evaluate, qk = niah_lm.load_kit(os.path.join(shared, 'niah'), model_dir)
    import numpy as np
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    toks = np.fromfile(args.tokens or os.path.join(model_dir, 'eval.u16'), '<u2').astype(np.int64)
    C, S = args.context, args.steps
    ids = torch.from_numpy(toks[args.offset:args.offset + C + S + 1])
    model, cfg = qk.load(model_dir)
    model.eval()
    R = evaluate.Runner(qk, model, C + S)
    targets = ids[C + 1:C + S + 1]
    t0 = time.time()
    R.prefill(ids[:C])
    tp = time.time() - t0

    def run(fn):
        R.attend = fn
        return torch.stack([R.step(int(ids[p]), p) for p in range(C, C + S)])

    full = run(evaluate.attend)
    full_loss = F.cross_entropy(full, targets).item()
    print(f'# quality_rank loss: model {model_dir} C={C} S={S} offset {args.offset}; full-attention loss {full_loss:.4f} '
          f'(prefill {tp:.0f}s, torch threads {torch.get_num_threads()})', flush=True)
    print(f'{"prototype":16s} {"loss":>8s} {"rel.incr":>9s} {"top1":>6s} {"exact keys":>10s} {"scored/step":>11s} {"s":>5s}')
    rows = [{'proto': 'full', 'loss': full_loss, 'full_loss': full_loss, 'top1_agreement': 1.0, 'exact_key_fraction': 1.0}]
    for name in args.protos.split(','):
        if name.startswith('oracle') and name.partition(':')[2] not in ('', 'none'):
            print(f'{name:16s} skipped: the oracle drops what it does not attend (no estimation zone)', flush=True)
            continue
        p = make(name)
        p.begin()
        t = time.time()
        lg = run(p.attend)
        loss = F.cross_entropy(lg, targets).item()
        top1 = (lg.argmax(-1) == full.argmax(-1)).float().mean().item()
        frac = p.exact_keys / max(1, p.keys)
        calls = S * cfg['layers'] * cfg['kv_heads']
        rows.append({'proto': name, 'loss': loss, 'full_loss': full_loss, 'top1_agreement': top1,
                     'exact_key_fraction': frac, 'scored_per_call': p.scored / calls})
        print(f'{name:16s} {loss:8.4f} {(loss - full_loss) / full_loss:+9.4f} {top1:6.3f} {frac * 100:9.2f}% '
              f'{p.scored / calls:11.0f} {time.time() - t:5.0f}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'context': C, 'steps': S, 'model': model_dir, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'loss':
        loss_main(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
