"""``ld-ext demo`` (the default, ``--task pretrain``): pre-train LD on the MNI152 template shipped in \
nilearn and score what it learned.

Nothing is downloaded: the MNI152 2009a T1 template and its grey/white-matter probability maps
are files inside the ``nilearn`` wheel; they are read with nibabel. Axial slices that contain
brain are made 128x128 (padded to a square, resized); every 5th slice is held out. The network
is pre-trained on the other slices on the CPU: stages 1-2 by ``ld_ext.train.pretrain`` (a fixed
number of steps), then stage 3, the centre-sensitive landmark term, as ``ld-ext pretrain`` runs it
(``run_stage3``), so that ``OUT/model.pt`` serves every task command. Then two tables on the held-out
slices, each followed by one sentence saying what its numbers mean, the probe table first:

* a linear probe (``ld_ext.tasks.probe``; ``ld_ext.demos.probe_table``) of small structures
  (ventricles, striatum, thalamus, corpus callosum; ``ld_ext.demos.mni.STRUCTURES``): LD's frozen
  embedding against the untrained network, intensity + local means and a position control;
* the normalised mutual information (NMI, arithmetic normalisation) of each method's cluster map
  against tissue labels made from the probability maps (background outside the brain; inside, the
  arg-max of CSF = 1 - GM - WM, GM and WM), for the trained network (arg-max of its K cluster
  logits), the same network untrained and k-means (K clusters) on the raw intensities. On a T1
  template the tissue classes are intensity classes, so NMI favours k-means by construction.

One progress line covers every phase (``ld_ext.demos.progress``); at the end the outputs are listed
(``OUTPUTS``) and the probe folder is named.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from .. import viz
from ..atomic import atomic_write_bytes
from ..checkpoint import LANDMARK_KEY, defer_signals, load_checkpoint, save_checkpoint
from ..data import ImageFolderDataset
from ..models import LDNet
from ..pretrain.outputs import read_jsonl, write_jsonl
from ..tasks import probe
from ..tasks.landmarks import STAGE3_FILE, centre_term_result, train_centre_sensitive
from ..train import TrainConfig, predict, pretrain
from .mni import STRUCTURES, load_mni_slices, tissue_labels
from .common import DemoDefault, demo_threads, plain_defaults
from .probe_table import PROBE_SEEDS, probe_plan, probe_scores, save_probe_figure
from .progress import DemoProgress, Phase, format_seconds

logger = logging.getLogger(__name__)

__all__ = [
    "normalized_mutual_info",
    "kmeans_1d",
    "cluster_map",
    "score_methods",
    "probe_scores",
    "nmi_sentence",
    "add_pretrain_demo_arguments",
    "run_pretrain_demo",
]


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two label maps, arithmetic normalisation: I(a;b) / ((H(a) + H(b)) / 2)."""
    a = a.reshape(-1).long()
    b = b.reshape(-1).long()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError("label maps must be non-empty and of equal size")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    joint = torch.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).double()
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)

    def h(q):
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha, hb = h(pa), h(pb)
    if ha + hb == 0:
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


def kmeans_1d(
    values: torch.Tensor, k: int, iters: int = 50, seed: int = 0, fit_samples: int = 50000
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on scalar values (quantile initialisation, fitted on a random subsample); (labels, centres)."""
    v = values.reshape(-1).double()
    g = torch.Generator().manual_seed(seed)
    fit = v[torch.randperm(v.numel(), generator=g)[:fit_samples]]
    centres = torch.quantile(fit, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        lab = (fit[:, None] - centres[None]).abs().argmin(1)
        counts = torch.bincount(lab, minlength=k).double()
        sums = torch.bincount(lab, weights=fit, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.allclose(new, centres):
            break
        centres = new
    lab = (v[:, None] - centres[None]).abs().argmin(1)
    return lab.reshape(values.shape), centres


@torch.no_grad()
def cluster_map(model, images: torch.Tensor) -> torch.Tensor:
    """Arg-max cluster of the model's clustering logits, (N, S, S)."""
    _, s = predict(model, images)
    if s is None:
        raise ValueError("the model has no clustering branch (stage 1)")
    return s.argmax(1)


def score_methods(
    trained, untrained, images: torch.Tensor, labels: torch.Tensor, k: int, on_step: Callable[[], None] | None = None
) -> tuple[dict, dict]:
    """NMI (all pixels and brain-only) of trained / untrained network clusters and k-means; (scores, maps).
    ``on_step()`` is called after each method."""
    brain = labels > 0
    makers = {
        "LD (trained)": lambda: cluster_map(trained, images),
        "untrained network": lambda: cluster_map(untrained, images),
        f"k-means on intensities (K={k})": lambda: kmeans_1d(images[:, 0], k)[0],
    }
    out, maps = {}, {}
    for name, make in makers.items():
        m = maps[name] = make()
        out[name] = {
            "nmi": normalized_mutual_info(m, labels),
            "nmi_brain": normalized_mutual_info(m[brain], labels[brain]),
        }
        if on_step is not None:
            on_step()
    return out, maps


# The demo's training length is a fixed number of steps (all of them run, whatever the machine's
# load): 4 stage-1 and 12 stage-2 epochs of 5 steps, 80 steps of 5 x 4 images at 128x128, then
# CENTRE_STEPS steps of stage 3 (the centre-sensitive landmark term of `ld-ext pretrain`, shorter
# than its default of 100; README.md gives the wall time). A time budget (--max-minutes) is only
# used when asked for.
EPOCHS1, EPOCHS2, STEPS_PER_EPOCH = 4, 12, 5
CENTRE_STEPS = 25

# Prior seconds per step of each phase of the demo at the defaults on an idle 2-core CPU (the
# progress line scales them by the speed measured on the steps done; they only shape its estimate
# of the time left). Their ratios are those measured on 2026-12-06 (docs/history.md: late training
# steps 5 s, stage-3 steps 1.9 s, probe steps 5.9 s, cluster-score steps 1.6 s on one thread of the
# loaded machine), scaled to about 1.1 s per training step.
PHASE_SECONDS = {
    "reading the data": 5.0,
    "pre-training": 1.1,
    "stage 3": 0.4,
    "cluster scores": 0.4,
    "probe": 1.3,
    "figures": 0.5,
}


def nmi_sentence(scores: dict) -> str:
    """What the NMI table means, from its numbers."""
    names = list(scores)
    ld, unt, km = (scores[k]["nmi"] for k in names[:3])
    return (
        f"NMI scores how well the clusters reproduce four tissue classes that, on this T1 template, are intensity "
        f"classes: k-means on the intensities ({km:.2f}) is near the ceiling by construction, so LD ({ld:.2f}) "
        f"{'above' if ld > km else 'below'} it says little about LD; LD against the untrained network "
        f"({unt:.2f}) shows what the short pre-training learned."
    )


def _table(scores: dict) -> str:
    lines = ["| method | NMI (all pixels) | NMI (brain only) |", "|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['nmi']:.3f} | {s['nmi_brain']:.3f} |")
    return "\n".join(lines)


def add_pretrain_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The pre-training demo's flags (kept separate so other demos can add theirs beside them)."""
    parser.add_argument("--out", default="ld_demo", metavar="DIR", help="output folder (default: ld_demo)")
    parser.add_argument(
        "--size", type=int, default=DemoDefault(128), help="slice size (default 128; --dims 3: the patch edge, 32)"
    )
    parser.add_argument("--epochs1", type=int, default=DemoDefault(EPOCHS1), help="stage-1 epochs")
    parser.add_argument("--epochs2", type=int, default=DemoDefault(EPOCHS2), help="stage-2 epochs")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=DemoDefault(STEPS_PER_EPOCH),
        help=f"steps per epoch (default {STEPS_PER_EPOCH}: {(EPOCHS1 + EPOCHS2) * STEPS_PER_EPOCH} training steps "
        "in all, every one of them run)",
    )
    parser.add_argument(
        "--centre-steps",
        type=int,
        default=DemoDefault(CENTRE_STEPS),
        metavar="N",
        help=f"stage 3: N steps of the centre-sensitive landmark term (default {CENTRE_STEPS}; `ld-ext pretrain` "
        "runs 100), so that OUT/model.pt serves `ld-ext landmark`; 0: off",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DemoDefault(4), help="B pairs per step (5B images; --dims 3: default 2)"
    )
    parser.add_argument("--clusters", type=int, default=16, help="K clusters")
    parser.add_argument("--lr-step", type=int, default=DemoDefault(6), help="halve the learning rate every N epochs")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="optional training time budget in minutes, shared among the epochs of both stages; by "
        "default there is none and every step runs (a budget that cuts stage 1 short on a busy "
        "machine leaves LD's features weaker than the baselines in the final table)",
    )
    parser.add_argument("--loss-impl", choices=("fused", "reference"), default="fused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument(
        "--probe-seeds",
        type=int,
        default=PROBE_SEEDS,
        help=f"seeds of the final linear-probe table (default {PROBE_SEEDS})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line (phases are logged instead)")


def _load_demo_slices(size: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, training images, held-out images, held-out tissue labels) of the MNI152 template."""
    data = load_mni_slices(size, structures=STRUCTURES)
    train_imgs = data["images"][data["train"]]
    test_imgs = data["images"][data["test"]]
    test_labels = tissue_labels(data["probs"][data["test"]])
    logger.info(
        "MNI152 2009a: %d training and %d held-out axial slices at %dx%d", len(train_imgs), len(test_imgs), size, size
    )
    return data, train_imgs, test_imgs, test_labels


def _train_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    """The pre-training configuration from the demo's flags (stages 1-2; the demo runs stage 3 itself,
    step by step, and its own progress line replaces the per-epoch bars)."""
    return TrainConfig(
        out=str(out),
        size=args.size,
        channels=1,
        n_clusters=args.clusters,
        batch_size=args.batch_size,
        epochs1=args.epochs1,
        epochs2=args.epochs2,
        steps_per_epoch=args.steps_per_epoch,
        lr_step=args.lr_step,
        seed=args.seed,
        device=args.device,
        loss_impl=args.loss_impl,
        max_minutes=args.max_minutes,
        progress=False,
        overwrite=True,  # the demo's folder: a rerun replaces its run
    )


def run_stage3(model, images: torch.Tensor, out: Path, steps: int, seed: int = 0, on_step=None) -> tuple:
    """Stage 3 of ``ld-ext pretrain`` on the demo's training images, step by step: the centre-sensitive
    term (``train_centre_sensitive``, the function and settings stage 3 of the pipeline uses, on the
    same images in the same order) trained on a copy of ``model``. Writes what the pipeline writes:
    ``stage3.pt``, the ``"centre_term"`` record and the landmark network beside the representation
    in ``model.pt`` (so ``ld-ext landmark`` reads it without a warning), a stage-3 line in
    ``metrics.jsonl``. Returns (landmark network, record); ``on_step()`` after each step."""
    t0 = time.time()
    gray = images[:, 0].float().cpu().numpy()
    tuned, hist = train_centre_sensitive(
        model, gray, steps=steps, seed=seed, progress=False, on_step=(lambda k, net: on_step()) if on_step else None
    )
    rec = centre_term_result(steps, seed, len(gray), hist, time.time() - t0)
    state = {name: v.detach().cpu().clone() for name, v in tuned.state_dict().items()}
    final = load_checkpoint(out / "model.pt")  # the pipeline's model.pt: the stage-2 representation
    final.update({"centre_term": rec, LANDMARK_KEY: state})
    with defer_signals():
        save_checkpoint(out / STAGE3_FILE, {"config": tuned.config, "model": state, "stage": 3, "centre_term": rec})
        save_checkpoint(out / "model.pt", final)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("stage") != 3]
    write_jsonl(out / "metrics.jsonl", records + [{"stage": 3, **rec}])
    logger.info("centre-sensitive term (stage 3): loss %.4f -> %.4f", rec["loss_first"], rec["loss_last"])
    return tuned, rec


def _save_cluster_figure(out: Path, test_imgs, test_labels, maps: dict, vsel, clusters: int) -> tuple[Path, list]:
    """demo_clusters.png: per held-out slice of ``vsel``, the image, its tissue labels and each method's
    clusters, inside the brain only, with a legend and a cluster colour bar; (its path, the column titles)."""
    names = list(maps)
    columns = [
        viz.LabelColumn("image", None),
        viz.LabelColumn("tissue labels", test_labels[vsel], 4, names=(None, "CSF", "grey matter", "white matter")),
        viz.LabelColumn("LD clusters", maps[names[0]][vsel], clusters),
        viz.LabelColumn("untrained network", maps[names[1]][vsel], clusters),
        viz.LabelColumn("k-means (intensity)", maps[names[2]][vsel], clusters),
    ]
    path = viz.save_label_maps(
        out / "demo_clusters.png",
        test_imgs[vsel],
        columns,
        mask=test_labels[vsel] > 0,
        mask_label="outside the brain (not coloured)",
        title="Held-out MNI152 slices: tissue labels and the arg-max cluster of each method (NMI table)",
        row_titles=[f"held-out slice {int(i) + 1}" for i in vsel],
    )
    return path, [c.title for c in columns]


# What the demo writes, in the order of the printed list (a name absent from OUT is left out of it).
OUTPUTS = (
    ("probe/", "the linear-probe table: results.md (printed above), results.json (every seed), overlays.png"),
    ("nmi.md", "the NMI table (printed above)"),
    ("demo_clusters.png", "figure: held-out slices, tissue labels, the clusters of LD, untrained network, k-means"),
    (
        "model.pt",
        "the network: the representation (ld-ext probe/finetune/shape-guided) and the landmark network "
        "of stage 3 (ld-ext landmark)",
    ),
    ("demo_results.json", "every number of this run (scores, probe, stage 3, seconds per phase)"),
    ("metrics.jsonl", "one record per training epoch and one for stage 3"),
    ("losses.png", "the training losses per epoch"),
    ("overlays/", "per epoch: the clusters of 4 held-out slices during training"),
    ("stage1.pt", "the network after stage 1"),
    ("stage2.pt", "the network after stage 2"),
    ("stage3.pt", "the landmark network after stage 3"),
    ("checkpoint.pt", "the training state of the last epoch (the format of ld-ext pretrain --resume)"),
)


def outputs_listing(out: Path) -> str:
    """The printed list of the demo's outputs that exist in ``out``, one per line with what it is."""
    rows = [(str(out / name.rstrip("/")) + ("/" if name.endswith("/") else ""), what) for name, what in OUTPUTS]
    rows = [(p, what) for (p, what), (name, _) in zip(rows, OUTPUTS) if (out / name.rstrip("/")).exists()]
    width = max(len(p) for p, _ in rows) if rows else 0
    return "\n".join([f"Outputs in {out}:"] + [f"  {p:<{width}}  {what}" for p, what in rows])


def _print_report(args: argparse.Namespace, out: Path, probe_md: str | None, scores: dict, summary: dict) -> None:
    """The probe table (or that there is none), the NMI table, a note if the time budget cut training."""
    if probe_md is not None:
        print("Linear probe: which features make small structures of held-out slices linearly readable?\n", flush=True)
        print(probe_md, flush=True)
    else:
        print("probe: no structure has enough slices at this size; no probe table")
    print("Clusters against tissue labels (normalised mutual information, held-out slices):\n")
    print(_table(scores) + "\n\n" + nmi_sentence(scores) + "\n")
    if summary["stopped_early"]:
        print(
            f"note: the time budget (--max-minutes {args.max_minutes:g}) stopped training after "
            f"{len(summary['records'])} of {args.epochs1 + args.epochs2} epochs; these tables describe a shorter "
            "pre-training than the demo's\n"
        )


def _phases(args: argparse.Namespace, n_probe: int) -> list[Phase]:
    steps = {
        "reading the data": 1,
        "pre-training": (args.epochs1 + args.epochs2) * args.steps_per_epoch,
        "stage 3": args.centre_steps,
        "cluster scores": 3,
        "probe": n_probe,
        "figures": 2,
    }
    return [Phase(name, n, PHASE_SECONDS[name]) for name, n in steps.items()]


def _check_demo_args(args: argparse.Namespace) -> None:
    plain_defaults(args)
    for name in ("size", "epochs2", "steps_per_epoch", "batch_size", "clusters", "probe_seeds"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("epochs1", "centre_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def run_pretrain_demo(args: argparse.Namespace) -> dict:
    """Pre-train on the template (stages 1-3) and score; returns the results dict (also written to OUT)."""
    t0 = time.time()
    _check_demo_args(args)
    threads, why = demo_threads(getattr(args, "threads", None))
    torch.set_num_threads(threads)
    logger.info("torch CPU threads: %d (%s)", threads, why)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    with DemoProgress(_phases(args, 4 * len(probe.FEATURE_SETS)), enabled=not args.no_progress) as bar:
        t = time.time()
        bar.start("reading the data")
        data, train_imgs, test_imgs, test_labels = _load_demo_slices(args.size)
        bar.set_steps("probe", len(probe_plan(data, args.probe_seeds)) * len(probe.FEATURE_SETS))
        bar.step()
        seconds["reading the data"] = round(time.time() - t, 1)
        trained, summary, stage3 = _train(args, out, bar, train_imgs, test_imgs, seconds)
        t = time.time()
        bar.start("cluster scores")
        torch.manual_seed(args.seed)
        untrained = LDNet(1, trained.emb_dim, args.clusters).eval()
        scores, maps = score_methods(trained, untrained, test_imgs, test_labels, args.clusters, on_step=bar.step)
        seconds["cluster scores"], t = round(time.time() - t, 1), time.time()
        bar.start("probe")
        probe_res = probe_scores(trained, data, seeds=args.probe_seeds, on_step=bar.step)
        seconds["probe"], t = round(time.time() - t, 1), time.time()
        bar.start("figures")
        vsel = torch.linspace(0, len(test_imgs) - 1, 4).round().long()
        overlay, columns = _save_cluster_figure(out, test_imgs, test_labels, maps, vsel, args.clusters)
        bar.step()
        probe_md = _write_probe(out, probe_res, args.probe_seeds)
        bar.step()
        seconds["figures"] = round(time.time() - t, 1)
    recs = summary["records"]
    results = {
        "seconds_total": round(time.time() - t0, 1),
        "seconds_training": round(summary["seconds"], 1),
        "seconds_per_phase": seconds,
        "threads": threads,
        "train_slices": len(train_imgs),
        "heldout_slices": len(test_imgs),
        "stopped_early": summary["stopped_early"],
        "first_epoch": recs[0] if recs else None,
        "last_epoch": next((r for r in reversed(recs) if r.get("stage") in (1, 2)), None),
        "stage3": stage3,
        "scores": scores,
        "probe": [{k: v for k, v in r.items() if not k.startswith("_")} for r in probe_res],
        "seconds_probe": seconds["probe"],
        "overlay": str(overlay),
        "overlay_columns": columns,
        "probe_dir": str(out / "probe"),
        "model": summary["model"],
        "metrics": summary["metrics"],
    }
    atomic_write_bytes(out / "demo_results.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out / "nmi.md", (_table(scores) + "\n\n" + nmi_sentence(scores) + "\n").encode())
    _print_report(args, out, probe_md, scores, summary)
    print(outputs_listing(out) + "\n")
    where = f"the probe table and figure are in {out / 'probe'}" if probe_md else f"results in {out}"
    print(f"done in {format_seconds(results['seconds_total'])}; {where}", flush=True)
    return results


def _train(args, out: Path, bar: DemoProgress, train_imgs, test_imgs, seconds: dict):
    """Stages 1-2 (``ld_ext.train.pretrain``) and stage 3, counted on ``bar``; (network, summary, stage-3 record)."""
    t = time.time()
    bar.start("pre-training")
    vsel = torch.linspace(0, len(test_imgs) - 1, 4).round().long()
    summary = pretrain(
        _train_config(args, out),
        dataset=ImageFolderDataset.from_tensor(train_imgs),
        val_images=test_imgs[vsel],
        on_step_end=lambda rec: bar.step(),
    )
    trained = summary["final_model"].cpu().eval()
    if trained.n_clusters is None:
        raise RuntimeError("the time budget (--max-minutes) ended before stage 2 started; raise it or leave it out")
    seconds["pre-training"], t = round(time.time() - t, 1), time.time()
    stage3 = None
    if args.centre_steps:
        bar.start("stage 3")
        _, stage3 = run_stage3(trained, train_imgs, out, args.centre_steps, args.seed, on_step=bar.step)
        seconds["stage 3"] = round(time.time() - t, 1)
    return trained, summary, stage3


def _write_probe(out: Path, probe_res: list, seeds: int) -> str | None:
    """OUT/probe: results.md, results.json and the figure overlays.png; the table's markdown (None: no probe)."""
    if not probe_res:
        return None
    plain = [{k: v for k, v in r.items() if k not in ("_preds", "_thresholds")} for r in probe_res]
    md = probe.write_results(out / "probe", plain, None, {"seeds": seeds})  # without _preds: no figure there
    save_probe_figure(out / "probe" / "overlays.png", probe_res)
    return md
