"""What a training checkpoint holds beyond the weights, and restoring it for ``--resume``.

``validate_resume_state`` checks a loaded ``checkpoint.pt`` (types, ranges) before anything is
built from it; ``load_optimizer`` / ``load_scheduler`` check a state_dict against a fresh one
(torch's own ``load_state_dict`` checks little); ``restore`` turns any failure into a ValueError
naming the file; ``rng_state`` / ``set_rng_state`` / ``seed_all`` cover every global RNG (torch,
CUDA, Python, NumPy); ``load_for_all`` reads a checkpoint on process 0 and broadcasts it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import distributed as dist_utils
from ..checkpoint import check_state_dict, load_checkpoint

__all__ = [
    "validate_resume_state",
    "load_optimizer",
    "load_scheduler",
    "restore",
    "rng_state",
    "set_rng_state",
    "seed_all",
    "load_for_all",
]


def validate_resume_state(state: dict, path: Path) -> dict:
    """Check a training checkpoint's entries (types, ranges) before anything is built from it."""
    where = f"checkpoint {path}"
    for key in ("stage", "epoch", "optimizer", "scheduler", "model"):
        if key not in state:
            raise ValueError(f"{where} is not a training checkpoint (no {key!r}); resume needs OUT/checkpoint.pt")
    stage, epoch = state["stage"], state["epoch"]
    if isinstance(stage, bool) or stage not in (1, 2) or not isinstance(stage, int):
        raise ValueError(f"{where}: 'stage' must be 1 or 2, got {stage!r}"[:300])
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= 10**7:
        raise ValueError(f"{where}: 'epoch' must be an int >= 0, got {epoch!r}"[:300])
    step = state.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 10**9:
        raise ValueError(f"{where}: 'step' must be an int >= 0, got {step!r}"[:300])
    sums = state.get("sums")
    if sums is not None and not (
        isinstance(sums, dict)
        and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in sums.items())
    ):
        raise ValueError(f"{where}: 'sums' must map loss names to numbers")
    for key in ("optimizer", "scheduler"):
        if not isinstance(state[key], dict):
            raise ValueError(f"{where}: {key!r} must be a dict (a state_dict), got {type(state[key]).__name__}")
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{where}: 'optimizer' is not an optimiser state_dict (needs 'state' and 'param_groups')")
    tc = state.get("train_config", {})
    if not isinstance(tc, dict):
        raise ValueError(f"{where}: 'train_config' must be a dict, got {type(tc).__name__}")
    odd = [k for k, v in tc.items() if not isinstance(k, str) or not _plain_setting(v)]
    if odd:
        raise ValueError(f"{where}: 'train_config' entry {str(odd[0])[:80]!r} is not a number, string or list of them")
    ws = state.get("world_size")
    if ws is not None and (isinstance(ws, bool) or not isinstance(ws, int) or not 1 <= ws <= 10**6):
        raise ValueError(f"{where}: 'world_size' must be an int >= 1, got {ws!r}"[:300])
    check_state_dict(state["model"], where, "model")
    rng = state.get("rng")
    if rng is not None:
        ok = (
            isinstance(rng, dict)
            and isinstance(rng.get("torch"), torch.Tensor)
            and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("python"), list)
            and len(rng["python"]) == 626
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rng["python"])
            and isinstance(rng.get("numpy"), torch.Tensor)
            and rng["numpy"].numel() == 624
            and isinstance(rng.get("numpy_pos"), int)
        )
        if not ok:
            raise ValueError(f"{where}: 'rng' is not the RNG state ld_ext writes")
    return state


def _plain_setting(v) -> bool:
    """A value TrainConfig writes into 'train_config': None, a number, a string, or a list of them."""
    scalar = (bool, int, float, str, type(None))
    return isinstance(v, scalar) or (isinstance(v, (list, tuple)) and all(isinstance(x, scalar) for x in v))


def _same_kind(fresh, loaded) -> bool:
    """Loaded value has the type of the freshly made one (numbers: int/float interchangeable)."""
    num = (int, float)
    if isinstance(fresh, bool) or isinstance(loaded, bool):
        return isinstance(fresh, bool) and isinstance(loaded, bool)
    if isinstance(fresh, num):
        return isinstance(loaded, num) and math.isfinite(loaded)
    if isinstance(fresh, (list, tuple)):
        return (
            isinstance(loaded, (list, tuple))
            and len(loaded) == len(fresh)
            and all(_same_kind(a, b) for a, b in zip(fresh, loaded))
        )
    if fresh is None:
        return loaded is None
    return type(fresh) is type(loaded)


def _check_like(fresh: dict, loaded: dict, what: str) -> None:
    """``loaded`` has exactly the entries of ``fresh``, each of the same kind (a torch state_dict
    of the same optimiser/scheduler); torch's load_state_dict checks little of this itself."""
    extra = [k for k in loaded if k not in fresh]
    missing = [k for k in fresh if k not in loaded]
    if extra or missing:
        raise ValueError(f"{what} has entries {sorted(map(str, extra))[:5]} it should not have and lacks {missing[:5]}")
    for k, v in fresh.items():
        if not _same_kind(v, loaded[k]):
            raise ValueError(f"{what} entry {k!r} is {loaded[k]!r:.80}, expected something like {v!r:.80}")


def load_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    fresh = opt.state_dict()
    groups = sd["param_groups"]
    if len(groups) != len(fresh["param_groups"]) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"{len(groups)} parameter groups, expected {len(fresh['param_groups'])}")
    for fg, g in zip(fresh["param_groups"], groups):
        _check_like(
            {k: v for k, v in fg.items() if k != "params"},
            {k: v for k, v in g.items() if k != "params"},
            "parameter group",
        )
        if not isinstance(g.get("params"), list) or len(g["params"]) != len(fg["params"]):
            raise ValueError("parameter group lists the wrong number of parameters")
    params = [p for grp in opt.param_groups for p in grp["params"]]
    ids = [i for g in groups for i in g["params"]]
    for key, st in sd["state"].items():
        if key not in ids or not isinstance(st, dict):
            raise ValueError(f"state of unknown parameter {key!r}")
        shape = params[ids.index(key)].shape
        for name, t in st.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state {name!r} of parameter {key} is not a tensor")
            if t.dim() > 0 and t.shape != shape:
                raise ValueError(
                    f"state {name!r} of parameter {key} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
    opt.load_state_dict(sd)


def load_scheduler(sched, sd: dict) -> None:
    _check_like(sched.state_dict(), sd, "scheduler state")
    sched.load_state_dict(sd)


def restore(path: Path, what: str, fn) -> None:
    """Load a part of a training checkpoint; any failure becomes a ValueError naming the file."""
    try:
        fn()
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        msg = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise ValueError(f"checkpoint {path}: its {what} cannot be restored ({type(exc).__name__}: {msg})") from exc


def rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((3, tuple(int(v) for v in py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_for_all(path: Path, check: Callable[[dict], None] | None = None, missing: str | None = None) -> dict:
    """A checkpoint read by process 0 only and broadcast; a problem is raised on every process
    (``missing``: the ValueError message for a file that does not exist)."""
    payload: tuple = (None, None, None)
    if dist_utils.rank() == 0:
        try:
            if missing is not None and not path.exists():
                raise ValueError(missing)
            st = load_checkpoint(path, map_location="cpu")
            if check is not None:
                check(st)
            payload = (st, None, None)
        except FileNotFoundError as exc:
            payload = (None, "missing", str(exc))
        except ValueError as exc:
            payload = (None, "invalid", str(exc))
        except (TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:  # a check tripped on an entry
            msg = " ".join(str(exc).split())[:300] or type(exc).__name__
            payload = (None, "invalid", f"checkpoint {path} cannot be used ({type(exc).__name__}: {msg})")
    st, kind, msg = dist_utils.broadcast_object(payload)
    if kind is not None:
        raise (FileNotFoundError if kind == "missing" else ValueError)(msg)
    return st
