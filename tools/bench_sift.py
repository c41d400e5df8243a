"""OpenCV's SIFT beside finprint's on the same grey pixels (written by `examples/bench_sift`).

    python tools/bench_sift.py OUT        # OUT as given to bench_sift --out

Reports, over the photos: keypoints each finds; the share of finprint's keypoints that OpenCV
also finds (within 1.5 px and 25% in size); the cosine between finprint's RootSIFT descriptor
and OpenCV's computed at the same keypoint, upright (OpenCV given finprint's keypoints with
angle 0); and extraction time per photo (one thread each).
"""
import json
import sys
import time

import cv2
import numpy as np

cv2.setNumThreads(1)
out = sys.argv[1]
photos = json.load(open(f"{out}/finprint.json"))
found, agree, cos, t_ours, t_cv = [], [], [], [], []
for p in photos:
    img = cv2.imread(p["png"], cv2.IMREAD_GRAYSCALE)
    sift = cv2.SIFT_create(nfeatures=len(p["keypoints"]) or 1)
    start = time.perf_counter()
    theirs, _ = sift.detectAndCompute(img, None)
    t_cv.append(time.perf_counter() - start)
    t_ours.append(p["seconds"])
    ours = np.array(p["keypoints"], dtype=np.float64).reshape(-1, 5)
    found.append((len(ours), len(theirs)))
    if len(ours) == 0:
        continue
    tp = np.array([[k.pt[0], k.pt[1], k.size] for k in theirs]).reshape(-1, 3)
    for x, y, size, _, _ in ours:
        d = np.hypot(tp[:, 0] - x, tp[:, 1] - y) if len(tp) else np.array([np.inf])
        near = (d < 1.5) & (np.abs(tp[:, 2] / size - 1) < 0.25) if len(tp) else d < 0
        agree.append(bool(near.any()))
    kps = [cv2.KeyPoint(float(x), float(y), float(s), 0.0, float(r), int(o)) for x, y, s, r, o in ours]
    kps, desc = sift.compute(img, kps)
    desc = desc.astype(np.float64)
    desc /= np.maximum(desc.sum(1, keepdims=True), 1e-12)
    desc = np.sqrt(desc)
    mine = np.array(p["descriptors"], dtype=np.float64).reshape(-1, 128)
    cos.extend((desc * mine).sum(1).tolist())
ours_n = np.mean([f[0] for f in found])
theirs_n = np.mean([f[1] for f in found])
print(f"{len(photos)} photos: finprint {ours_n:.0f} keypoints per photo, OpenCV {theirs_n:.0f}")
print(f"finprint keypoints also found by OpenCV (1.5 px, 25% size): {np.mean(agree):.3f}")
c = np.array(cos)
print(f"RootSIFT at the same keypoints, cosine finprint vs OpenCV: median {np.median(c):.4f}, "
      f"5th percentile {np.percentile(c, 5):.4f}, min {c.min():.4f}")
print(f"time per photo (one thread): finprint {1e3 * np.mean(t_ours):.1f} ms, OpenCV detect+describe "
      f"{1e3 * np.mean(t_cv):.1f} ms, ratio {np.mean(t_ours) / np.mean(t_cv):.2f}× (OpenCV also computes orientations)")
print(json.dumps({"photos": len(photos), "keypoints": [ours_n, theirs_n], "agree": float(np.mean(agree)),
                  "cos_median": float(np.median(c)), "cos_p5": float(np.percentile(c, 5)),
                  "ms": [1e3 * float(np.mean(t_ours)), 1e3 * float(np.mean(t_cv))]}))
