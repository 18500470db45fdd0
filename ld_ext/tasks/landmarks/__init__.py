"""Centre-sensitive one-shot landmark localisation (docs/method.md section 8, our concretisation).

From ONE annotated template image each landmark is described by the template's unit pixel
embeddings pooled around it at several radii (radius 0 = the pixel itself). Centre-sensitive
pooling weights pixels with a Gaussian (sigma = ``sigma_frac`` * radius, truncated at the radius);
the ablation pools uniformly over the same discs. Pooled maps are L2-normalised per radius,
concatenated and divided by sqrt(#radii) (unit vectors), so one inner product is the mean cosine
over radii. (Nested radii already weight the centre more than the rim, in both modes.)

Search, per target image, identical for every method (LD centre-sensitive, LD uniform, NCC):
they differ only in their similarity maps (M, H, W), one per template landmark.
1. candidates: the ``top_k`` local maxima of every map;
2. geometric consistency: all landmarks of one target share one warp, so one affine template ->
   target is fitted robustly (RANSAC over triples of candidates, soft inlier count, reflections
   rejected, least-squares refinement on the inliers, then once more on the inliers' sub-pixel
   positions); mirror-image confusions do not fit it;
3. second pass in the template frame: the target is resampled through that affine (rotation,
   scale and shear undone), the maps are recomputed there, and each landmark is the best peak
   within ``window`` px of its template position, mapped back through the affine (optionally
   more passes, each through the affine refitted to the previous one);
4. sub-pixel: Gauss-Newton on the descriptors (feature-metric: the offset that brings the
   target descriptor closest to the landmark's; by default both are pooled exactly at their
   fractional centres, ``fractional_descriptors``, else bilinearly interpolated), or a fit to the score
   map (2-D quadratic on the 3 x 3 neighbourhood, bicubic interpolation at 1/8 px).
With fewer than 3 landmarks or no admissible affine, each map's arg-max is used.

Every LD similarity map goes through the fused ``ld_ext.pixel_cluster_similarity`` op: the
prototypes are the landmark descriptors plus one all-zero prototype at temperature 1, so
``log S_k - log S_zero = <proto_k, x_p>`` is the cosine map exactly (softmax over K cancels).

The baseline is normalised cross-correlation (NCC) of intensity patches around each template
landmark (all landmarks in one convolution); its descriptors for the Gauss-Newton step are the
zero-mean unit-norm patches, whose inner products are the NCC.

CLI (``ld-ext landmark``): predict ``--targets DIR`` from ``--template IMG --points POINTS.json``,
or ``--evaluate N``: warp the template with N random known affine + elastic deformations and
report mean radial error and success rates for LD centre-sensitive, LD uniform and NCC.

Modules: ``pooling`` (descriptors), ``search`` (shared search and sub-pixel steps), ``locator``
(``LandmarkLocator``), ``ncc`` (the baseline), ``centre_term`` (the training term), ``pretrain_stage``
(the term as stage 3 of ``ld-ext pretrain``), ``points``
(points I/O), ``evaluation`` (known-warp evaluation, selected settings, paired differences) and
``cli``; every public name is importable from ``ld_ext.tasks.landmarks``.
"""

from __future__ import annotations

from .centre_term import centre_sensitive_loss, train_centre_sensitive
from .cli import add_arguments, run
from .evaluation import (
    SELECTED_LD,
    SELECTED_NCC,
    evaluate_methods,
    make_eval_targets,
    paired_difference,
    plot_landmarks,
    radial_errors_table,
    table_markdown,
)
from .locator import LandmarkLocator
from .ncc import ncc_locate, ncc_map, ncc_maps, ncc_patch_field, ncc_score_maps
from .points import load_points
from .pretrain_stage import DEFAULT_CENTRE_STEPS, STAGE3_FILE, centre_term_record, centre_term_result, run_centre_stage
from .pooling import (
    DEFAULT_EDGE,
    DEFAULT_FRACTIONAL,
    DEFAULT_JAC_STEP,
    DEFAULT_RADII,
    DEFAULT_SIGMA_FRAC,
    EDGE_MODES,
    FRACTIONAL_MODES,
    POOLING_MODES,
    FractionalSampler,
    sample_bilinear,
    cosine_maps,
    fractional_descriptors,
    pooled_descriptors,
    pooling_kernel,
    sample_descriptors,
)
from .search import (
    DEFAULT_SUBPIXEL,
    DEFAULT_WINDOW,
    MAP_SUBPIXEL_METHODS,
    SEARCH_MODES,
    SUBPIXEL_METHODS,
    apply_affine,
    fit_affine,
    locate_image,
    locate_in_maps,
    peak_candidates,
    rectify,
    refine_gauss_newton,
    robust_affine,
    search_near,
    subpixel_peak,
)

__all__ = [
    "DEFAULT_RADII",
    "pooling_kernel",
    "pooled_descriptors",
    "sample_descriptors",
    "fractional_descriptors",
    "FractionalSampler",
    "cosine_maps",
    "subpixel_peak",
    "refine_gauss_newton",
    "ncc_patch_field",
    "peak_candidates",
    "fit_affine",
    "apply_affine",
    "robust_affine",
    "search_near",
    "locate_in_maps",
    "rectify",
    "locate_image",
    "LandmarkLocator",
    "ncc_map",
    "ncc_maps",
    "ncc_score_maps",
    "ncc_locate",
    "load_points",
    "evaluate_methods",
    "radial_errors_table",
    "paired_difference",
    "add_arguments",
    "run",
    "SELECTED_LD",
    "SELECTED_NCC",
    "make_eval_targets",
    "table_markdown",
    "plot_landmarks",
    "centre_sensitive_loss",
    "train_centre_sensitive",
    "DEFAULT_CENTRE_STEPS",
    "STAGE3_FILE",
    "centre_term_record",
    "centre_term_result",
    "run_centre_stage",
]
