"""OpenCV's CLAHE on generated 8-bit images: the parity fixture of `Gray::clahe`.

    .venv-bench/bin/python tools/make_clahe_fixture.py   # writes tests/fixtures/clahe_opencv.bin

The images are the integer pattern `pattern` below (the Rust test computes the same), shaded
left to right, at sizes with and without a whole number of 8×8 tiles; for each (width, height,
clip) of CASES in order, the file holds OpenCV's output, row-major, one byte a pixel.
"""
from pathlib import Path

import cv2
import numpy as np

CASES = [(61, 45, 2.0), (64, 48, 2.0), (64, 45, 4.0), (40, 90, 1.0)]


def pattern(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return ((40 + (150 * x) // w + ((x * 31 + y * 17) % 23) * ((x // 5 + y // 7) % 3)) % 256).astype(np.uint8)


out = b"".join(cv2.createCLAHE(clipLimit=c, tileGridSize=(8, 8)).apply(pattern(w, h)).tobytes() for w, h, c in CASES)
path = Path(__file__).resolve().parent.parent / "tests/fixtures/clahe_opencv.bin"
path.write_bytes(out)
print(f"{path}: {len(out)} bytes, OpenCV {cv2.__version__}")
