"""Export the demo's MNI152 training slices as 16-bit PNGs, for a GPU machine without nilearn.

The lent GPU machine has no network and no nilearn/nibabel, so the short GPU pre-training run of
``benchmarks/gpu_check.sh`` reads the shipped MNI152 2009a template as PNG files made here first:
the same axial training slices as ``ld-ext demo`` (every 5th slice is held out and NOT exported),
preprocessed the same way, at ``--size``. About 5 MB at 128x128.

    python benchmarks/gpu_data.py                 # writes .gpu_data/mni152/*.png (ignored by git)
    bash benchmarks/gpu_check.sh                  # on the GPU machine, with .gpu_data carried along
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def export(out: str, size: int) -> int:
    import io

    from PIL import Image

    from ld_ext.atomic import atomic_write_bytes
    from ld_ext.demos.mni import load_mni_slices

    data = load_mni_slices(size)
    imgs = data["images"][data["train"]][:, 0].numpy()
    index = data["index"][data["train"]].tolist()
    os.makedirs(out, exist_ok=True)
    for img, z in zip(imgs, index):
        arr = np.round(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        atomic_write_bytes(os.path.join(out, f"slice_{z:03d}.png"), buf.getvalue())
    return len(imgs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(_ROOT, ".gpu_data", "mni152"), help="folder for the PNGs")
    p.add_argument("--size", type=int, default=128, help="slice size")
    args = p.parse_args(argv)
    n = export(args.out, args.size)
    print(f"gpu_data: {n} training slices of {args.size}x{args.size} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
