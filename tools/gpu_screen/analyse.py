"""Pool the GPU screen's folds: top-1, top-5 and MAP@5 of each (recipe, epoch, fusion weight), and
its paired gain over the untrained features (epoch 0) with 95% bootstrap intervals over animals.

Usage: python3 tools/gpu_screen/analyse.py results.jsonl [more.jsonl ...] [--vs A=B ...]

A recipe's rows pool only the folds that reached that epoch, against the same folds untrained.
`--vs A=B` adds recipe A's paired gain over recipe B at each (epoch, weight) both reached, on the
folds both reached (the same set's queries: for example `--vs m_br:beluga=b_full`).
"""
import collections
import json
import random
import sys


def metrics(queries):
    """top-1, top-5 and MAP@5 of (animal, rank) pairs."""
    n = len(queries)
    return (sum(r == 1 for _, r in queries) / n, sum(r <= 5 for _, r in queries) / n,
            sum(1 / r for _, r in queries if r <= 5) / n)


def paired_intervals(trained, untrained, resamples=1000):
    """95% intervals of the gain in top-1 and in MAP@5, resampling animals for both at once."""
    by_animal = collections.defaultdict(list)
    for (a, ra), (b, rb) in zip(trained, untrained):
        assert a == b, "the two measurements list their queries in different orders"
        by_animal[a].append(((ra == 1) - (rb == 1), (1 / ra if ra <= 5 else 0) - (1 / rb if rb <= 5 else 0)))
    animals = sorted(by_animal)
    rng = random.Random(0)
    top1, map5 = [], []
    for _ in range(resamples):
        drawn = [d for _ in animals for d in by_animal[rng.choice(animals)]]
        top1.append(sum(d for d, _ in drawn) / len(drawn))
        map5.append(sum(d for _, d in drawn) / len(drawn))
    lo, hi = int(0.025 * resamples), int(0.975 * resamples) - 1
    top1.sort()
    map5.sort()
    return top1[lo], top1[hi], map5[lo], map5[hi]


def gain(q, qb):
    """q's paired gain over qb (the same queries) in top-1 and MAP@5, with 95% intervals."""
    (t1, _, m), (b1, _, bm) = metrics(q), metrics(qb)
    lo1, hi1, lom, him = paired_intervals(q, qb)
    return f"top1 {t1 - b1:+.3f} ({lo1:+.3f} to {hi1:+.3f})  MAP5 {m - bm:+.3f} ({lom:+.3f} to {him:+.3f})"


def main():
    args = sys.argv[1:]
    pairs = [args[i + 1].split("=") for i, a in enumerate(args) if a == "--vs"]
    files = [a for i, a in enumerate(args) if a != "--vs" and (i == 0 or args[i - 1] != "--vs")]
    runs = collections.defaultdict(dict)  # (recipe, epoch, w) -> fold -> [(animal, rank)]
    for path in files:
        for line in open(path):
            row = json.loads(line)
            runs[(row["recipe"], row["epoch"], row["w"])][row["fold"]] = row["q"]
    for (recipe, epoch, w), by_fold in sorted(runs.items()):
        base = runs[(recipe, 0, 0.0)]
        folds = [f for f in sorted(base) if f in by_fold]
        q = [x for f in folds for x in by_fold[f]]
        qb = [x for f in folds for x in base[f]]
        t1, t5, m = metrics(q)
        line = f"{recipe:9s} ep{epoch:2d} w{w:.1f} folds{len(folds)} n{len(q)}  top1 {t1:.3f} top5 {t5:.3f} MAP5 {m:.3f}"
        if epoch:
            line += f"  vs untrained: {gain(q, qb)}"
        print(line)
    for a, b in pairs:
        for (recipe, epoch, w), by_fold in sorted(runs.items()):
            other = runs.get((b, epoch, w))
            if recipe != a or not epoch or not other:
                continue
            folds = [f for f in sorted(by_fold) if f in other]
            q = [x for f in folds for x in by_fold[f]]
            qb = [x for f in folds for x in other[f]]
            print(f"{a} vs {b} ep{epoch:2d} w{w:.1f} folds{len(folds)} n{len(q)}  top1 {metrics(q)[0]:.3f} "
                  f"vs {metrics(qb)[0]:.3f}; gain {gain(q, qb)}")


if __name__ == "__main__":
    main()
