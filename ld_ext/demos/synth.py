"""Synthetic "other subjects" with other contrasts: a second held-out set for the probe protocol
that is not the MNI152 T1 image (issue 22 item 5; docs/tasks.md section 4).

In the style of SynthSeg (Billot et al., 2023), each image is drawn from the template's tissue maps,
not from its T1 intensities. Per axial slice at height z (mm; evaluation heights ``PROBE_EVAL_Z``
only, odd development heights are refused), ``size x size``:

1. **Tissue probabilities** of the template at z (``ld_ext.demos.mni``): brain = T1 > 0; GM and WM =
   the shipped probability maps inside the brain; CSF = brain - GM - WM (clipped to [0, 1]);
   background = 1 - brain.
2. **Contrast**: one mean per class drawn uniformly from the ranges of the family (``CONTRASTS``):
   ``"t2"`` (T2-like: CSF 0.80-1.00 > GM 0.45-0.62 > WM 0.25-0.40, the order always holds) or
   ``"pd"`` (proton-density-like: CSF 0.70-0.90, GM 0.62-0.78, WM 0.45-0.58: GM > WM always, CSF
   near GM and usually above it, low contrast); background 0-0.05. Per class a texture sd drawn
   from 0.01-0.03. The image is the probability-weighted mix of the class means plus Gaussian
   noise of the mixed sd per pixel.
3. **Shape**: one random affine + elastic warp per image (``probe_warp``, the one of
   ``probe_data(warped=True)``: rotation +-20 deg, scale 0.85-1.15, shear +-0.05, shift +-8 %,
   elastic 3 %), applied to the image, to the tissue labels (nearest class after warping the
   probabilities) and to the structure masks alike.
4. **Acquisition**, after the warp: a multiplicative bias field exp(b n) with n smooth noise
   (sigma size / 4, peak 1) and b drawn from 0.05-0.30; an anisotropic Gaussian blur (a lower
   resolution) with sd drawn per axis from 0.3-1.5 pixels; Rician noise sqrt((x + n1)^2 + n2^2),
   n1, n2 ~ N(0, s^2), s drawn from 0.005-0.03; then clipped at the image's 0.5th and 99.5th
   percentiles and mapped to [0, 1] (``ld_ext.data.scale_intensity``, as the image readers do).

Every draw comes from ``numpy.random.default_rng([SYNTH_STREAM, seed, round(z) + 1000])``: the same
(seed, z, contrast, size) gives the same image wherever z sits in the list of heights, and the two
families share every draw but the class means' ranges (same warp, texture, bias, blur and noise:
one synthetic subject seen in two contrasts).
"""

from __future__ import annotations

import numpy as np

from ..data import scale_intensity
from ..tasks import common
from .mni import STRUCTURES, axial_slice, mni_slices, mni_volume, structure_slices
from .tasks import PROBE_DEV_Z, PROBE_EVAL_Z, PROBE_MIN_PIXELS, probe_warp

__all__ = ["CONTRASTS", "CLASSES", "SYNTH_STREAM", "synth_slice", "synth_probe_data", "tissue_probabilities"]

CLASSES = ("background", "CSF", "GM", "WM")
# uniform ranges of the class means (background, CSF, GM, WM) per contrast family
CONTRASTS = {
    "t2": ((0.0, 0.05), (0.80, 1.00), (0.45, 0.62), (0.25, 0.40)),
    "pd": ((0.0, 0.05), (0.70, 0.90), (0.62, 0.78), (0.45, 0.58)),
}
TEXTURE_SD = (0.01, 0.03)
BIAS_STRENGTH = (0.05, 0.30)
BLUR_SD_PX = (0.3, 1.5)
NOISE_SD = (0.005, 0.03)
SYNTH_STREAM = 225  # keeps these draws apart from the other seeded streams of the demos


_BRAIN: dict = {}


def _brain_volume() -> np.ndarray:
    """The template's brain (T1 > 0) as a float32 0/1 volume, made once per process."""
    if "brain" not in _BRAIN:
        _BRAIN["brain"] = (mni_volume("t1")[0] > 0).astype(np.float32)
    return _BRAIN["brain"]


def tissue_probabilities(z: float, size: int) -> np.ndarray:
    """(4, size, size) float32 probabilities of background, CSF, GM, WM on the axial slice at z (mm)."""
    _, aff = mni_volume("t1")
    brain = np.clip(axial_slice(_brain_volume(), aff, float(z), size), 0.0, 1.0)
    gm = np.clip(mni_slices("gm", [z], size)[0], 0.0, 1.0) * brain
    wm = np.clip(mni_slices("wm", [z], size)[0], 0.0, 1.0) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    p = np.stack([1.0 - brain, csf, gm, wm]).astype(np.float32)
    return p / np.maximum(p.sum(0, keepdims=True), 1e-6)


def _check_heights(zs) -> list[float]:
    zs = [float(z) for z in zs]
    dev = sorted({z for z in zs if z in PROBE_DEV_Z})
    if dev:
        raise ValueError(f"zs: the synthetic set is drawn at evaluation heights only, got development heights {dev}")
    bad = sorted({z for z in zs if z not in PROBE_EVAL_Z})
    if bad:
        raise ValueError(f"zs must be among the evaluation heights {PROBE_EVAL_Z} (mm), got {bad}")
    return zs


def _acquire(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Bias field, anisotropic blur and Rician noise on a warped image; then scaled to [0, 1]."""
    from scipy.ndimage import gaussian_filter  # lazy: slow to import

    size = img.shape[-1]
    b = rng.uniform(*BIAS_STRENGTH)
    img = img * np.exp(b * common.smooth_noise(rng, img.shape, size / 4.0))
    blur = rng.uniform(*BLUR_SD_PX, size=2)
    img = gaussian_filter(img, sigma=blur, mode="nearest")
    s = rng.uniform(*NOISE_SD)
    img = np.sqrt((img + s * rng.standard_normal(img.shape)) ** 2 + (s * rng.standard_normal(img.shape)) ** 2)
    return scale_intensity(img), {"bias": float(b), "blur_sd_px": blur.tolist(), "noise_sd": float(s)}


def synth_slice(z: float, size: int = 128, contrast: str = "t2", seed: int = 0, structures=STRUCTURES) -> dict:
    """One synthetic image at height ``z`` (see the module docstring for what is drawn).

    Returns ``image`` (size, size) float32 in [0, 1], ``probs`` (4, size, size) the warped tissue
    probabilities of ``CLASSES`` (outside the warped field: background), ``labels`` (size, size) int64
    their argmax, ``masks`` {structure: bool (size, size)} warped with the image, and
    ``params`` (the drawn class means, texture sds, bias strength, blur and noise sds).
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {sorted(CONTRASTS)}, got {contrast!r}")
    (z,) = _check_heights([z])
    rng = np.random.default_rng([SYNTH_STREAM, int(seed), int(round(z)) + 1000])
    probs = tissue_probabilities(z, size)
    means = np.array([rng.uniform(lo, hi) for lo, hi in CONTRASTS[contrast]], dtype=np.float32)
    sds = rng.uniform(*TEXTURE_SD, size=len(CLASSES)).astype(np.float32)
    img = np.tensordot(means, probs, axes=1) + np.tensordot(sds, probs, axes=1) * rng.standard_normal(probs.shape[1:])
    warp = probe_warp(size, rng)
    img = common.warp_image(img.astype(np.float32), warp)
    wprobs = np.stack([common.warp_image(p, warp) for p in probs[1:]])
    wprobs = np.concatenate([np.clip(1.0 - wprobs.sum(0, keepdims=True), 0.0, 1.0), wprobs])
    labels = wprobs.argmax(0)
    masks = {
        name: common.warp_image(structure_slices(name, [z], size)[0].astype(np.float32), warp) > 0.5
        for name in structures
    }
    image, acq = _acquire(img, rng)
    params = {"contrast": contrast, "means": means.tolist(), "texture_sd": sds.tolist(), **acq}
    return {
        "image": image.astype(np.float32),
        "probs": wprobs.astype(np.float32),
        "labels": labels.astype(np.int64),
        "masks": masks,
        "params": params,
    }


def synth_probe_data(
    zs=PROBE_EVAL_Z, size: int = 128, contrast: str = "t2", seed: int = 0, structures=STRUCTURES
) -> dict:
    """``probe_data``'s layout on synthetic images: per structure, (images, masks, heights) of the
    slices at ``zs`` (evaluation heights only) whose warped mask has >= ``PROBE_MIN_PIXELS`` pixels."""
    zs = _check_heights(zs)
    items = [synth_slice(z, size, contrast, seed, structures) for z in zs]
    images = np.stack([it["image"] for it in items])
    out = {}
    for name in structures:
        m = np.stack([it["masks"][name] for it in items])
        keep = m.reshape(len(m), -1).sum(1) >= PROBE_MIN_PIXELS
        out[name] = (images[keep], m[keep], [z for z, k in zip(zs, keep) if k])
    return out
