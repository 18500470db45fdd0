"""The linear probe along one `ld-ext pretrain` run, with label-free signals (docs/tasks.md section 4,
"The default recipe, run to the end").

    python protocols/probe_default_run.py probe   --checkpoint CKPT --split dev|eval [--warped] [--baselines]
    python protocols/probe_default_run.py probe   --checkpoint CKPT --set synth-t2|synth-pd [--synth-seed S] \
                                                  [--baselines]
    python protocols/probe_default_run.py signals CKPT [CKPT ...]

``probe``: the probe of ``ld_ext.tasks.probe`` (soft per-pixel logistic regression, threshold chosen on
the training shots, Dice per held-out image containing the structure; 1 and 5 shots, 3 seeds) on the
MNI152 T1 slices of ``ld_ext.demos.tasks.probe_data`` at 128 x 128 (4 structures), development slices
(odd z) or evaluation slices (even z), registered or warped, for two kinds of frozen features:
``zdec`` (unit embedding + decoder features, what ``ld-ext probe`` uses) and ``hyper`` (the same plus
the encoder's levels 1-4 upsampled bilinearly: a hypercolumn). ``--baselines`` adds the random-init
network with both kinds (a new draw per seed), intensity and position. Prints one line per structure
(mean over 1 and 5 shots and the seeds) and the mean.

``--set synth-t2`` / ``--set synth-pd``: the same probe on the second held-out set of
``ld_ext.demos.synth`` instead of the T1 slices: synthetic T2-like / proton-density-like images drawn
from the template's tissue maps at the evaluation heights (even z) only, each with its own affine +
elastic warp, bias field, blur and Rician noise (``--synth-seed``, default 0, picks the draws). It is
a report set: nothing is selected on it, and ``--split dev`` is refused with it.

``signals``: what can be measured without labels on the development slices, per checkpoint: the
effective rank (exp of the entropy of the normalised singular values) of the unit embedding and of
the hypercolumn over foreground pixels (20,000 drawn), and for stage-2 networks the cluster usage
(entropy of the mean assignment / log K), the mean per-pixel assignment entropy / log K and the number
of clusters that win >= 1 % of the pixels.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ld_ext.checkpoint import load_model
from ld_ext.demos.mni import mni_slices
from ld_ext.demos.synth import synth_probe_data
from ld_ext.demos.tasks import PROBE_DEV_Z, PROBE_EVAL_Z, probe_data
from ld_ext.models import LDNet
from ld_ext.normalization import normalize_embeddings
from ld_ext.tasks import common, probe

SIZE = 128


def _input(model, images):
    x = common.model_input(torch.as_tensor(images, dtype=torch.float32))
    return x.expand(-1, model.in_channels, -1, -1) if x.shape[1] != model.in_channels else x


@torch.no_grad()
def features(model, images, kind: str) -> torch.Tensor:
    """(N, C, H, W) frozen features: 'zdec' = unit embedding + decoder; 'hyper' adds encoder levels 1-4."""
    x = _input(model, images)
    model.eval()
    out = []
    for i in range(0, x.shape[0], 8):
        enc = model.encoder(x[i : i + 8])
        h = model.decoder.features(enc)
        parts = [normalize_embeddings(model.decoder.emb_head(h)), h]
        if kind == "hyper":
            parts += [F.interpolate(e, size=x.shape[-2:], mode="bilinear", align_corners=False) for e in enc[1:]]
        out.append(torch.cat(parts, 1).float())
    return torch.cat(out)


def probe_set(args) -> dict:
    """``probe_data``'s layout for the set: MNI152 T1 slices (``--split``, ``--warped``) or synthetic contrasts."""
    if args.set == "mni":
        if args.split is None:
            raise SystemExit("--split: dev or eval is needed with --set mni")
        return probe_data(PROBE_DEV_Z if args.split == "dev" else PROBE_EVAL_Z, SIZE, warped=args.warped)
    if args.split == "dev":
        raise SystemExit(f"--split dev: --set {args.set} is a report set drawn at the evaluation heights only")
    if args.warped:
        raise SystemExit(f"--warped: --set {args.set} is always warped (one warp per image)")
    return synth_probe_data(PROBE_EVAL_Z, SIZE, contrast=args.set.split("-")[1], seed=args.synth_seed)


def run_probe(args) -> None:
    data = probe_set(args)
    model = load_model(args.checkpoint)
    cfg = model.config
    total: dict[str, list[float]] = {}
    for name, (imgs, masks, _) in data.items():
        fs = {f"LD:{k}": features(model, imgs, k) for k in ("zdec", "hyper")}
        if args.baselines:
            for k in ("zdec", "hyper"):
                fs[f"random:{k}"] = lambda seed, k=k: (torch.manual_seed(1000 + seed), features(LDNet(**cfg), imgs, k))[1]
            fs["intensity"] = probe.intensity_features(imgs)
            fs["position"] = probe.position_features(imgs)
        t0 = time.time()
        r = probe.probe_experiment(fs, masks, shots=(1, 5), seeds=3, label=name)
        row = {m: round(sum(r["summary"][m][str(s)]["mean"] for s in (1, 5)) / 2, 3) for m in fs}
        print(name, json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
        for m, v in row.items():
            total.setdefault(m, []).append(v)
    print("MEAN", json.dumps({m: round(sum(v) / len(v), 3) for m, v in total.items()}), flush=True)


def _effective_rank(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals((x - x.mean(0, keepdim=True)).double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def run_signals(args) -> None:
    images = mni_slices("t1", PROBE_DEV_Z, SIZE)
    for path in args.checkpoints:
        model = load_model(path).eval()
        x = _input(model, images)
        enc = model.encoder(x)
        h = model.decoder.features(enc)
        z = normalize_embeddings(model.decoder.emb_head(h))
        hyper = torch.cat([z, h] + [F.interpolate(e, size=x.shape[-2:], mode="bilinear", align_corners=False) for e in enc[1:]], 1)
        fg = (x[:, 0] > x[:, 0].amin() + 0.05).reshape(-1)
        pick = torch.randperm(int(fg.sum()), generator=torch.Generator().manual_seed(0))[:20000]
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[fg][pick]  # noqa: E731
        row = {"checkpoint": str(path), "erank_z": round(_effective_rank(flat(z)), 2),
               "erank_hyper": round(_effective_rank(flat(hyper)), 2)}
        if model.config.get("n_clusters"):
            s = model.decoder(enc)[1]
            a = torch.sigmoid(s) + 1e-9
            a = flat(a / a.sum(1, keepdim=True))
            k = a.shape[1]
            u = a.mean(0)
            row["usage_entropy"] = round(float(-(u * u.log()).sum() / math.log(k)), 3)
            row["pixel_entropy"] = round(float((-(a * a.log()).sum(1)).mean() / math.log(k)), 3)
            row["clusters_winning_1pct"] = int(torch.bincount(a.argmax(1), minlength=k).gt(0.01 * a.shape[0]).sum())
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("probe")
    pp.add_argument("--checkpoint", required=True)
    pp.add_argument("--set", choices=("mni", "synth-t2", "synth-pd"), default="mni")
    pp.add_argument("--split", choices=("dev", "eval"), default=None, help="with --set mni (required there)")
    pp.add_argument("--synth-seed", type=int, default=0, help="the draws of --set synth-* (default 0)")
    pp.add_argument("--warped", action="store_true")
    pp.add_argument("--baselines", action="store_true")
    ps = sub.add_parser("signals")
    ps.add_argument("checkpoints", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    (run_probe if args.cmd == "probe" else run_signals)(args)


if __name__ == "__main__":
    main()
