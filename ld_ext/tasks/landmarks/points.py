"""Landmark points I/O (JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- points I/O


def load_points(path) -> tuple[list[str], np.ndarray]:
    """Landmarks from JSON: ``{"points": [{"name": ..., "x": ..., "y": ...}, ...]}``, a list of such
    objects, a list of ``[x, y]`` pairs, or ``{name: [x, y]}``. Pixel coordinates of the
    template as loaded: x = column, y = row, pixel centres at integers."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"points file not found: {str(path)!r}")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"points file {str(path)!r} is not valid JSON: {exc}") from exc
    if isinstance(obj, dict) and "points" in obj:
        obj = obj["points"]
    names, xy = [], []
    try:
        if isinstance(obj, dict):
            for k, v in obj.items():
                names.append(str(k))
                xy.append([float(v[0]), float(v[1])])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, dict):
                    names.append(str(v.get("name", f"p{i}")))
                    xy.append([float(v["x"]), float(v["y"])])
                else:
                    names.append(f"p{i}")
                    xy.append([float(v[0]), float(v[1])])
        else:
            raise TypeError
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"points file {str(path)!r}: expected {{'points': [{{'name','x','y'}}, ...]}}, a list of [x, y] "
            f"or {{name: [x, y]}}"
        ) from exc
    if not xy:
        raise ValueError(f"points file {str(path)!r} holds no points")
    arr = np.asarray(xy, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"points file {str(path)!r} holds non-finite coordinates")
    return names, arr
