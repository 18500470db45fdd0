"""Settings of ``ld-ext demo --dims 3`` chosen on other warps than the ones it reports on
(benchmarks/RESULTS_3D.md, "Choosing the demo's learning rate").

    python protocols/demo3d_dev.py --out DIR [--seed 1] [--lr 3e-4] [--epochs2 12] [--only-ld]

Writes the demo's warped copies for ``--seed`` (the demo itself reports on ``--seed 0``; select on
``--seed 1``) into ``DIR/volumes`` (kept and reused by later calls with the same ``DIR``), pre-trains
as the demo does (``ld_ext.demos.volumes3d``: 32^3 patches, batch 2, 4 + ``--epochs2`` epochs of 5
steps, ``--lr-step`` 6) with ``--lr`` into ``DIR/run_<lr>_<epochs2>``, and probes the held-out copies
with the demo's probe (1 shot, 3 seeds, half of the copies the test set) for two kinds of frozen
features: ``z+decoder`` (what ``ld-ext probe`` and the demo use) and a hypercolumn (the same plus the
encoder's levels 2-5 upsampled trilinearly), for LD and, unless ``--only-ld``, for the same network at
random initialisation, with the intensity and position controls. Prints the 3-D Dice per structure
and the mean. One torch thread.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ld_ext.checkpoint import load_model
from ld_ext.demos import volumes3d
from ld_ext.demos.mni import STRUCTURES
from ld_ext.models import LDNet
from ld_ext.normalization import normalize_embeddings
from ld_ext.tasks import common, probe_volumes, volumes
from ld_ext.tasks.probe_volumes import LazyFeatures
from ld_ext.train import TrainConfig, pretrain


def features(net, vols, kind: str, window) -> list:
    """Frozen features per volume by the probe's sliding windows: 'z+decoder' or 'hyper'."""

    def fn(x):
        enc = net.encoder(common.model_input(x))
        h = net.decoder.features(enc)
        parts = [normalize_embeddings(net.decoder.emb_head(h)), h]
        if kind == "hyper":
            parts += [F.interpolate(e, size=x.shape[-3:], mode="trilinear", align_corners=False) for e in enc[1:]]
        return torch.cat(parts, 1)

    net.eval()
    with torch.no_grad():
        return [volumes.sliding_window(fn, torch.from_numpy(v.astype(np.float32))[None], window) for v in vols]


def random_init(model, vols, kind: str, window, seed: int) -> list:
    """The features of the same architecture at random initialisation, drawn per probe seed as the demo does."""
    torch.manual_seed(10_000 + seed)
    return features(LDNet(**model.config), vols, kind, window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=volumes3d.LR_3D)
    p.add_argument("--epochs2", type=int, default=volumes3d.DEFAULTS_3D["epochs2"])
    p.add_argument("--only-ld", action="store_true", help="skip the baselines (they do not depend on --lr)")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    args = argparse.Namespace(
        seed=a.seed, spacing=volumes3d.SPACING, warps=volumes3d.TRAIN_WARPS, heldout_warps=volumes3d.HELDOUT_WARPS
    )
    vdir = out / "volumes"
    if not vdir.is_dir():
        volumes3d.make_volumes(out, args)
    d3 = volumes3d.DEFAULTS_3D
    run = out / f"run_{a.lr:g}_{a.epochs2}"
    cfg = TrainConfig(
        data=[str(vdir / "train")], out=str(run), dims=3, size=d3["size"], n_clusters=16,
        batch_size=d3["batch_size"], epochs1=d3["epochs1"], epochs2=a.epochs2, steps_per_epoch=d3["steps_per_epoch"],
        lr=a.lr, lr_step=d3["lr_step"], seed=a.seed, device="cpu", progress=False, overwrite=True,
    )  # fmt: skip
    t0 = time.time()
    pretrain(cfg)
    print(f"pre-training: {time.time() - t0:.0f} s", flush=True)
    model = load_model(run / "model.pt")
    _, vols, labels = volumes3d.load_heldout(vdir / "heldout" / "images", vdir / "heldout" / "labels")
    window = (d3["size"],) * 3
    feats = {}
    for kind in ("z+decoder", "hyper"):
        feats[f"LD:{kind}"] = LazyFeatures(lambda seed, k=kind: features(model, vols, k, window))
        if not a.only_ld:
            draw = lambda seed, k=kind: random_init(model, vols, k, window, seed)  # noqa: E731
            feats[f"random-init:{kind}"] = LazyFeatures(draw, per_seed=True)
    if not a.only_ld:
        feats["intensity"] = LazyFeatures(lambda seed: [probe_volumes.volume_intensity_features(v) for v in vols])
        feats["position"] = LazyFeatures(lambda seed: [probe_volumes.volume_position_features(v) for v in vols])
    structures = [(name, [lab == k + 1 for lab in labels]) for k, name in enumerate(STRUCTURES)]
    res = probe_volumes.volume_probe_experiments(
        feats, structures, shots=(1,), seeds=3, test_fraction=0.5,
        max_voxels=volumes3d.PROBE_MAX_VOXELS,
    )  # fmt: skip
    table = {m: {r["label"]: round(r["summary"][m]["1"]["mean"], 3) for r in res} for m in feats}
    for m, row in table.items():
        print(f"{m:22s}", " ".join(f"{v:.3f}" for v in row.values()), f"mean {np.mean(list(row.values())):.3f}")
    (run / "dev_table.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
