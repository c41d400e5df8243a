"""Pool the GPU screen's folds: top-1, top-5 and MAP@5 of each (recipe, epoch, fusion weight), and
its paired gain over the untrained features (epoch 0) with 95% bootstrap intervals over animals.

Usage: python3 tools/gpu_screen/analyse.py results.jsonl
"""
import json, collections, random, sys
L = [json.loads(l) for l in open(sys.argv[1])]
R = collections.defaultdict(dict)  # (recipe, epoch, w) -> fold -> q
for l in L:
    R[(l["recipe"], l["epoch"], l["w"])][l["fold"]] = l["q"]
def metrics(q):
    n = len(q)
    return (sum(r == 1 for _, r in q) / n, sum(r <= 5 for _, r in q) / n, sum(1 / r for _, r in q if r <= 5) / n)
def boot(qa, qb, B=1000):
    # paired over animals: top-1 difference
    by = collections.defaultdict(list)
    for (a, ra), (b, rb) in zip(qa, qb):
        assert a == b
        by[a].append(((ra == 1) - (rb == 1), (1 / ra if ra <= 5 else 0) - (1 / rb if rb <= 5 else 0)))
    ids = sorted(by); rng = random.Random(0); d1 = []; dm = []
    for _ in range(B):
        s = [by[rng.choice(ids)] for _ in ids]
        flat = [x for v in s for x in v]
        d1.append(sum(x for x, _ in flat) / len(flat)); dm.append(sum(y for _, y in flat) / len(flat))
    d1.sort(); dm.sort()
    return d1[25], d1[974], dm[25], dm[974]
recipes = sorted({k[0] for k in R})
for rc in recipes:
    base = R[(rc, 0, 0.0)]
    folds = sorted(base)
    for (r, e, w), byf in sorted(R.items()):
        if r != rc: continue
        fs = [f for f in folds if f in byf]
        q = [x for f in fs for x in byf[f]]; qb = [x for f in fs for x in base[f]]
        t1, t5, m = metrics(q); b1, b5, bm = metrics(qb)
        extra = ""
        if e:
            lo1, hi1, lom, him = boot(q, qb)
            extra = f"  vs untrained: top1 {t1-b1:+.3f} ({lo1:+.3f} to {hi1:+.3f})  MAP5 {m-bm:+.3f} ({lom:+.3f} to {him:+.3f})"
        print(f"{rc:9s} ep{e:2d} w{w:.1f} folds{len(fs)} n{len(q)}  top1 {t1:.3f} top5 {t5:.3f} MAP5 {m:.3f}{extra}")
