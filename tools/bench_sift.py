"""OpenCV's SIFT beside finprint's on the same grey pixels (written by `examples/bench_sift`).

    python tools/bench_sift.py OUT        # OUT as given to bench_sift --out

Reports, over the photos: keypoints each finds; the share of finprint's keypoints that OpenCV
also finds (within 1.5 px and 25% in size); the cosine between finprint's RootSIFT descriptor
and OpenCV's computed at the same keypoint, upright (OpenCV given finprint's keypoints with
angle 0); and extraction time per photo (one thread each). Then the re-scoring of each photo's
shortlist (all the other photos) in NumPy and OpenCV, as HotSpotter's Python does it, on
finprint's descriptors: LNBNN votes (k = 4, one per photo per query descriptor) and each photo's
correspondences verified by `cv2.estimateAffine2D` (RANSAC, 3% of the longer side); its time
per query beside finprint's `Matcher::rescore`, and how often both put the same photo first.
The last line is the JSON of all figures.
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


def lnbnn_affine(q, gallery, side, k=4):
    """Verified LNBNN votes of each gallery photo for query q (points, descriptors)."""
    qp, qd = q
    owner = np.concatenate([np.full(len(d), i) for i, (_, d) in enumerate(gallery)])
    point = np.concatenate([np.arange(len(d)) for _, d in gallery])
    pooled = np.concatenate([d for _, d in gallery])
    sims = qd @ pooled.T
    nearest = np.argpartition(-sims, k, axis=1)[:, :k + 1]
    order = np.take_along_axis(sims, nearest, 1).argsort(1)[:, ::-1]
    nearest = np.take_along_axis(nearest, order, 1)
    dist = np.sqrt(np.maximum(2 - 2 * np.take_along_axis(sims, nearest, 1), 0))
    pairs = [[] for _ in gallery]
    for r in range(len(qd)):
        voted = set()
        for c in range(k):
            j = nearest[r, c]
            if owner[j] in voted:
                continue
            voted.add(owner[j])
            pairs[owner[j]].append((qp[r], gallery[owner[j]][0][point[j]], dist[r, k] - dist[r, c]))
    scores = []
    for ps in pairs:
        if len(ps) < 3:
            scores.append(0.0)
            continue
        src = np.array([p[0] for p in ps], np.float32)
        dst = np.array([p[1] for p in ps], np.float32)
        w = np.array([p[2] for p in ps])
        _, inliers = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=0.03 * side,
                                          maxIters=300, refineIters=0)
        scores.append(float(w[inliers.ravel() == 1].sum()) if inliers is not None else 0.0)
    return scores


feats = []
for p in photos:
    pts = np.array(p["keypoints"], dtype=np.float64).reshape(-1, 5)[:, :2]
    feats.append((pts, np.array(p["descriptors"], dtype=np.float32).reshape(-1, 128)))
side = max(cv2.imread(photos[0]["png"], cv2.IMREAD_GRAYSCALE).shape)
t_ref, t_fp, same_first = [], [], []
for q in range(len(photos)):
    gallery = [feats[j] for j in range(len(photos)) if j != q]
    if len(feats[q][1]) == 0 or sum(len(d) for _, d in gallery) < 5:
        continue
    start = time.perf_counter()
    ref = lnbnn_affine(feats[q], gallery, side)
    t_ref.append(time.perf_counter() - start)
    t_fp.append(photos[q]["rescore_seconds"])
    same_first.append(int(np.argmax(ref)) == int(np.argmax(photos[q]["verified"])))
ours_n = np.mean([f[0] for f in found])
theirs_n = np.mean([f[1] for f in found])
print(f"{len(photos)} photos: finprint {ours_n:.0f} keypoints per photo, OpenCV {theirs_n:.0f}")
print(f"finprint keypoints also found by OpenCV (1.5 px, 25% size): {np.mean(agree):.3f}")
c = np.array(cos)
print(f"RootSIFT at the same keypoints, cosine finprint vs OpenCV: median {np.median(c):.4f}, "
      f"5th percentile {np.percentile(c, 5):.4f}, min {c.min():.4f}")
print(f"time per photo (one thread): finprint {1e3 * np.mean(t_ours):.1f} ms, OpenCV detect+describe "
      f"{1e3 * np.mean(t_cv):.1f} ms, ratio {np.mean(t_ours) / np.mean(t_cv):.2f}× (OpenCV also computes orientations)")
print(f"re-scoring a shortlist of {len(photos) - 1} (one thread): finprint {1e3 * np.mean(t_fp):.1f} ms, "
      f"NumPy + OpenCV {1e3 * np.mean(t_ref):.1f} ms, ratio {np.mean(t_fp) / np.mean(t_ref):.2f}×; "
      f"same photo first for {np.mean(same_first):.3f} of the queries")
print(json.dumps({"photos": len(photos), "keypoints": [ours_n, theirs_n], "agree": float(np.mean(agree)),
                  "cos_median": float(np.median(c)), "cos_p5": float(np.percentile(c, 5)),
                  "ms": [1e3 * float(np.mean(t_ours)), 1e3 * float(np.mean(t_cv))],
                  "shortlist": len(photos) - 1, "rescore_ms": [1e3 * float(np.mean(t_fp)), 1e3 * float(np.mean(t_ref))],
                  "same_first": float(np.mean(same_first))}))
