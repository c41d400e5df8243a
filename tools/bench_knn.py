#!/usr/bin/env python3
"""The faiss reference for `examples/bench_knn.rs`, on the vectors that example wrote.

    cargo run --release --example bench_knn -- --n 51000 --dim 512
    .venv-bench/bin/python tools/bench_knn.py --dir target/knn

Measures IndexFlatIP (f32), IndexScalarQuantizer fp16 and IndexHNSWFlat (inner product) as the
Rust example measures its indexes (the same queries, repetitions and statistics), writes
<dir>/faiss.json and prints both side by side. `tools/bench.sh` runs both.
"""

import argparse
import json
import pathlib
import time

import faiss
import numpy as np


def reset_peak_rss():
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def vm_hwm_mb():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e3
    return None


def recall(got, exact, k):
    hits = sum(len(set(g[g >= 0]) & set(e)) for g, e in zip(got, exact))
    return hits / (k * len(exact))


def own_first(ids, truth):
    """The share of queries whose first result shows the query's own individual."""
    if truth is None:
        return None
    labels, query_labels = truth
    first = ids[:, 0]
    return float(np.mean((first >= 0) & (labels[np.maximum(first, 0)] == query_labels)))


def stats(values):
    v = sorted(values)
    return {"median": float(np.median(v)), "min": v[0], "max": v[-1], "runs": len(v)}


def measure_search(name, ef, index, queries, meta, exact, truth=None):
    k, single = meta["k"], meta["single"]
    latencies = []
    for i in range(single):
        q = queries[i % len(queries)][None, :]
        start = time.perf_counter()
        index.search(q, k)
        latencies.append((time.perf_counter() - start) * 1e3)
    rates = []
    for _ in range(max(1, meta.get("batch_runs", 1))):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        rates.append(len(queries) / (time.perf_counter() - start))
    return ids, {
        "index": name,
        "n": index.ntotal,
        "ef_search": ef,
        "single_ms": stats(latencies),
        "batch_qps": stats(rates),
        "vm_hwm_mb": vm_hwm_mb(),
        "recall": None if exact is None else recall(ids, exact, k),
        "own_first": own_first(ids, truth),
    }


def measure(name, index, rows, queries, meta, exact, storage_bytes, ef=None, truth=None):
    reset_peak_rss()
    start = time.perf_counter()
    if not index.is_trained:
        index.train(rows)
    index.add(rows)
    build_s = time.perf_counter() - start
    ids, row = measure_search(name, ef, index, queries, meta, exact, truth)
    row["build_s"] = build_s
    row["storage_mb"] = storage_bytes(index) / 1e6
    print(f"{name}: built in {build_s:.2f} s", flush=True)
    return ids, row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("target/knn"))
    args = parser.parse_args()
    meta = json.loads((args.dir / "meta.json").read_text())
    n, dim, k, hnsw_n = meta["n"], meta["dim"], meta["k"], meta["hnsw_n"]
    faiss.omp_set_num_threads(meta["threads"])
    base = np.fromfile(args.dir / "base.f32", dtype="<f4").reshape(n, dim)
    queries = np.fromfile(args.dir / "queries.f32", dtype="<f4").reshape(-1, dim)
    truth = None
    if (args.dir / "labels.u32").exists():
        truth = (np.fromfile(args.dir / "labels.u32", dtype="<u4"), np.fromfile(args.dir / "query_labels.u32", dtype="<u4"))

    rows = []
    flat = faiss.IndexFlatIP(dim)
    exact, row = measure("flat f32", flat, base, queries, meta, None, lambda i: i.ntotal * dim * 4, truth=truth)
    rows.append(row)
    del flat
    if meta.get("f16", True):
        half = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        rows.append(measure("flat f16", half, base, queries, meta, exact, lambda i: i.ntotal * dim * 2, truth=truth)[1])
        del half
    if hnsw_n > 0:
        rows.extend(hnsw_rows(base[:hnsw_n], queries, meta, exact, truth))

    (args.dir / "faiss.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ours_path = args.dir / "rust.json"
    ours = json.loads(ours_path.read_text())["rows"] if ours_path.exists() else [{}] * len(rows)
    print_table(ours, rows)


def hnsw_rows(subset, queries, meta, exact, truth):
    dim, k = meta["dim"], meta["k"]
    if len(subset) < meta["n"]:
        exact_flat = faiss.IndexFlatIP(dim)
        exact_flat.add(subset)
        _, exact = exact_flat.search(queries, k)
        del exact_flat
    hnsw = faiss.IndexHNSWFlat(dim, meta["m"], faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = meta["ef_construction"]
    efs = meta["ef_search"]
    hnsw.hnsw.efSearch = efs[0]

    def hnsw_bytes(index):
        links = faiss.vector_to_array(index.hnsw.neighbors).nbytes
        return index.ntotal * dim * 4 + links

    _, first = measure("hnsw", hnsw, subset, queries, meta, exact, hnsw_bytes, ef=efs[0], truth=truth)
    rows = [first]
    for ef in efs[1:]:
        hnsw.hnsw.efSearch = ef
        _, row = measure_search("hnsw", ef, hnsw, queries, meta, exact, truth)
        row["build_s"], row["storage_mb"] = first["build_s"], first["storage_mb"]
        rows.append(row)
    return rows


def print_table(ours, theirs):
    columns = [
        ("build_s", "build s"),
        ("storage_mb", "storage MB"),
        ("vm_hwm_mb", "VmHWM MB"),
        ("single_ms", "1q ms"),
        ("batch_qps", "batch q/s"),
        ("recall", "recall"),
        ("own_first", "own first"),
    ]
    print("| index | n | " + " | ".join(f"{t} ours / faiss (ratio)" for _, t in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for o, f in zip(ours, theirs):
        name = f["index"] + (f" ef={f['ef_search']}" if f.get("ef_search") else "")
        cells = []
        for key, _ in columns:
            a, b = o.get(key), f.get(key)
            a, b = (x["median"] if isinstance(x, dict) else x for x in (a, b))
            if a is None or b is None:
                cells.append(f"{fmt(a)} / {fmt(b)}")
            else:
                ratio = a / b if b else float("nan")
                cells.append(f"{fmt(a)} / {fmt(b)} ({ratio:.2f})")
        print(f"| {name} | {f['n']} | " + " | ".join(cells) + " |")


def fmt(x):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


if __name__ == "__main__":
    main()
