"""``ld-ext landmark``: predict landmarks in target images, or evaluate on known warps."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ...checkpoint import load_checkpoint
from .. import common
from .centre_term import train_centre_sensitive
from .evaluation import evaluate_methods, make_eval_targets, table_markdown
from .locator import LandmarkLocator
from .points import load_points
from .report import flag_predictions, plot_targets, predictions_table
from .pretrain_stage import centre_term_record
from .pooling import (
    DEFAULT_EDGE,
    DEFAULT_FRACTIONAL,
    DEFAULT_RADII,
    DEFAULT_SIGMA_FRAC,
    EDGE_MODES,
    FRACTIONAL_MODES,
    POOLING_MODES,
)
from .search import DEFAULT_SUBPIXEL, DEFAULT_WINDOW, SEARCH_MODES, SUBPIXEL_METHODS

logger = logging.getLogger("ld_ext.tasks.landmarks")

# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LD checkpoint (ld-ext pretrain)")
    parser.add_argument("--template", required=True, help="the one annotated template image")
    parser.add_argument("--points", required=True, help="landmarks of the template, JSON (x = column, y = row)")
    parser.add_argument("--targets", default=None, help="folder of target images to annotate")
    parser.add_argument("--out", required=True, help="output JSON (a PNG is written beside it)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize template and targets to SIZE x SIZE first (default: the size the checkpoint was pre-trained "
        "at, when it records it; else their own size); predictions are given in each target's own pixels",
    )
    parser.add_argument("--radii", type=int, nargs="+", default=list(DEFAULT_RADII), help="pooling radii (px)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default="gaussian")
    parser.add_argument(
        "--sigma-frac", type=float, default=DEFAULT_SIGMA_FRAC, help="Gaussian pooling: sigma = F * radius"
    )
    parser.add_argument(
        "--edge",
        choices=EDGE_MODES,
        default=DEFAULT_EDGE,
        help="rim of the pooling discs: soft (anti-aliased, default) or hard",
    )
    parser.add_argument(
        "--fractional",
        choices=FRACTIONAL_MODES,
        default=DEFAULT_FRACTIONAL,
        help="descriptors at fractional positions (landmarks, Gauss-Newton): exact (pooled at the fractional "
        "centre, default) or bilinear (interpolated from the pixel grid)",
    )
    parser.add_argument(
        "--search",
        choices=SEARCH_MODES,
        default="consistent",
        help="consistent (default): one robust affine over all landmarks, then a local search; global: each arg-max",
    )
    parser.add_argument(
        "--window", type=float, default=DEFAULT_WINDOW, help="local search radius (px) around the affine prediction"
    )
    parser.add_argument(
        "--subpixel",
        choices=SUBPIXEL_METHODS,
        default=DEFAULT_SUBPIXEL,
        help="sub-pixel step: gauss-newton (feature-metric, on the descriptors), or a fit to the score map "
        "(quadratic 3x3, bicubic 5x5, parabola per axis)",
    )
    parser.add_argument("--no-rectify", action="store_true", help="skip the second pass in the template frame")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="passes in the template frame, each through the affine refitted to the previous one (default 1)",
    )
    parser.add_argument(
        "--evaluate",
        type=int,
        default=0,
        metavar="N",
        help="instead of (or besides) --targets: warp the template N times with random known "
        "affine+elastic deformations and report radial errors for LD and NCC",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--centre-term-steps",
        type=int,
        default=0,
        metavar="N",
        help="first fine-tune the network N steps with the centre-sensitive training term on random warps "
        "of the template and the target images (no labels; default 0 = off; a network from ld-ext pretrain "
        "with stage 3, --centre-steps, carries the term already)",
    )


def _load_scaled(path, size):
    img = common.scale_intensity(common.load_image(path))
    if size is not None:
        img = common.resize_image(img, size)
    return img


def run(args: argparse.Namespace) -> int:
    _check_task_args(args)
    model, trained = common.load_ld_model_and_size(args.checkpoint, part="landmark")
    common.require_2d_network(model, args.checkpoint, "ld-ext landmark")
    args = argparse.Namespace(**{**vars(args), "size": common.task_size(args.size, trained, args.checkpoint)})
    in_ckpt = centre_term_record(load_checkpoint(args.checkpoint))  # stage 3 of ld-ext pretrain, or None
    template, names, points = _template_and_points(args)
    out = Path(args.out)
    if not args.window > 0:
        raise ValueError(f"--window must be > 0, got {args.window}")
    common.check_positive_int("--passes", args.passes)
    search = dict(
        search=args.search,
        window=args.window,
        subpixel=args.subpixel,
        rectified=not args.no_rectify,
        passes=args.passes,
    )
    result: dict = {
        "template": str(args.template),
        "landmarks": names,
        "pooling": args.pooling,
        "radii": args.radii,
        "edge": args.edge,
        "fractional": args.fractional,
        "search": search,
    }
    if args.centre_term_steps < 0:
        raise ValueError(f"--centre-term-steps must be >= 0, got {args.centre_term_steps}")
    result["checkpoint_centre_term"] = in_ckpt
    if in_ckpt is None and not args.centre_term_steps:
        logger.warning(
            "%s carries no centre-sensitive term (made without stage 3 of ld-ext pretrain, --centre-steps): "
            "localisation is much less accurate; pre-train with it, or give --centre-term-steps N "
            "(minutes per call)",
            args.checkpoint,
        )
    if args.centre_term_steps:
        model = _tune_centre_term(args, model, template, result)
    if args.targets is not None:
        _locate_targets(args, model, template, names, points, search, result, out)
    if args.evaluate:
        _evaluate(args, model, template, points, search, result)
    common.atomic_write_json(out, result)
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if args.targets is not None else ""))
    return 0


def _check_task_args(args: argparse.Namespace) -> None:
    """What to do (--targets and/or --evaluate) and --size, checked before anything is loaded."""
    if args.targets is None and not args.evaluate:
        raise ValueError("give --targets DIR and/or --evaluate N")
    if args.evaluate < 0:
        raise ValueError(f"--evaluate must be >= 0, got {args.evaluate}")
    if args.size is not None:
        common.check_positive_int("--size", args.size, 16)


def _template_and_points(args: argparse.Namespace) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The template (scaled, resized to --size) and its landmarks in its pixels, which must lie inside it."""
    raw = common.load_image(args.template)
    template = _load_scaled(args.template, args.size)
    names, points = load_points(args.points)
    _check_inside(args, names, points, raw.shape)
    if args.size is not None:  # points are given on the template as stored
        sy, sx = template.shape[0] / raw.shape[0], template.shape[1] / raw.shape[1]
        points = np.stack([(points[:, 0] + 0.5) * sx - 0.5, (points[:, 1] + 0.5) * sy - 0.5], 1)
    h, w = template.shape  # a point on the outermost pixel centre may fall just outside after a resize
    points = np.stack([np.clip(points[:, 0], 0, w - 1), np.clip(points[:, 1], 0, h - 1)], 1)
    return template, names, points


def _check_inside(args: argparse.Namespace, names: list[str], given: np.ndarray, shape: tuple[int, int]) -> None:
    """Every landmark of --points within the template as stored (pixel centres 0..W-1, 0..H-1)."""
    h, w = shape
    x, y = given[:, 0], given[:, 1]
    bad = np.flatnonzero((x < 0) | (x > w - 1) | (y < 0) | (y > h - 1))
    if len(bad):
        which = ", ".join(f"#{i} {names[i]!r} at ({x[i]:g}, {y[i]:g})" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"--points {args.points}: {len(bad)} landmark(s) outside the template {args.template} ({w}x{h} px, "
            f"x in 0..{w - 1}, y in 0..{h - 1}): {which}{more}"
        )


def _tune_centre_term(args: argparse.Namespace, model, template: np.ndarray, result: dict):
    """--centre-term-steps: fine-tune on warps of the template and the targets of its size."""
    pool = [template]
    if args.targets is not None:
        pool += [
            img
            for img in (
                _load_scaled(f, args.size)
                for f in common.list_images(args.targets, "targets", exclude=[Path(args.out).with_suffix(".png")])
            )
            if img.shape == template.shape
        ]
    model, hist = train_centre_sensitive(model, np.stack(pool), steps=args.centre_term_steps, seed=args.seed)
    result["centre_term"] = {"steps": args.centre_term_steps, "loss_first": hist[0], "loss_last": hist[-1]}
    return model


def _locate_targets(
    args: argparse.Namespace,
    model,
    template: np.ndarray,
    names: list[str],
    points: np.ndarray,
    search: dict,
    result: dict,
    out: Path,
) -> None:
    """--targets: the landmarks of every target image in its own pixels, with a score and the
    plausibility flags of each (``report``); a table printed, warnings for flagged ones, and a PNG
    of every target."""
    t_emb, _ = common.embed(model, template[None])
    loc = LandmarkLocator(
        args.radii, args.pooling, args.sigma_frac, edge=args.edge, fractional=args.fractional, **search
    ).fit(t_emb.double(), points)
    files = common.list_images(args.targets, "targets", exclude=[out.with_suffix(".png")])  # its own figure
    from tqdm import tqdm

    preds, scores, flags, sizes, rows, panels = {}, {}, {}, {}, [], []
    for f in tqdm(files, desc="landmarks"):
        img = _load_scaled(f, args.size)
        p, info = loc.locate_image(model, img, return_info=True)
        own = common.load_image(f).shape if args.size is not None else img.shape
        # back to the target's own pixels (pixel centres map onto pixel centres)
        sy, sx = own[0] / img.shape[0], own[1] / img.shape[1]
        xy = np.stack([(p[:, 0] + 0.5) * sx - 0.5, (p[:, 1] + 0.5) * sy - 0.5], 1)
        why = flag_predictions(p, img.shape, points, template.shape)
        preds[f.name] = {n: [float(x), float(y)] for n, (x, y) in zip(names, xy)}
        scores[f.name] = {n: round(float(v), 4) for n, v in zip(names, info["scores"])}
        if any(why):
            flags[f.name] = {n: w for n, w in zip(names, why) if w}
        sizes[f.name] = [int(own[1]), int(own[0])]
        rows += [
            dict(file=f.name, index=i, name=n, x=xy[i, 0], y=xy[i, 1], score=float(info["scores"][i]), flags=why[i])
            for i, n in enumerate(names)
        ]
        panels.append((f.name, img, p, why))
    result.update(predictions=preds, scores=scores, flags=flags)
    result["frame"] = (
        "predictions are [x, y] = [column, row] in each target's own pixels (the file as stored, "
        "before any --size resize; 0 = the first pixel's centre); target_sizes gives [width, height]; "
        "scores: cosine similarity of the landmark's descriptor at the prediction (1 = identical); "
        "flags: implausible predictions (outside the image, on its border, or far from the template's position)"
    )
    result["target_sizes"] = sizes
    print(predictions_table(rows))
    _warn_flags(rows, sizes)
    plot_targets(out.with_suffix(".png"), template, points, names, panels, Path(args.template).name)


def _warn_flags(rows: list[dict], sizes: dict) -> None:
    """One warning per flagged prediction (the first 20; then one line with the count)."""
    bad = [r for r in rows if r["flags"]]
    for r in bad[:20]:
        w, h = sizes[r["file"]]
        logger.warning(
            "target %s, landmark #%d %r at (%.1f, %.1f) in its %dx%d px: %s",
            r["file"],
            r["index"],
            r["name"],
            r["x"],
            r["y"],
            w,
            h,
            "; ".join(r["flags"]),
        )
    if len(bad) > 20:
        logger.warning("%d more implausible predictions: see 'flags' in the output JSON", len(bad) - 20)


def _evaluate(
    args: argparse.Namespace, model, template: np.ndarray, points: np.ndarray, search: dict, result: dict
) -> None:
    """--evaluate N: radial errors of LD and NCC on N known random warps of the template (printed)."""
    targets, gts = make_eval_targets(template, points, args.evaluate, seed=args.seed)
    pool = dict(radii=args.radii, edge=args.edge, fractional=args.fractional, **search)
    ld_methods = {
        "centre-sensitive": dict(mode="gaussian", sigma_frac=args.sigma_frac, **pool),
        "uniform pooling": dict(mode="uniform", **pool),
    }
    ev = evaluate_methods(model, template, points, targets, gts, args.radii, search=search, ld_methods=ld_methods)
    result["evaluation"] = {"n_targets": args.evaluate, "rows": ev["rows"]}
    print(table_markdown(ev["rows"]))
