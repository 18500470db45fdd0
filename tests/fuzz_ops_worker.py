"""Seeded random calls of the raw operators torch.ops.ld_ext.* (forward and backward), run in a
subprocess by tests/test_fuzz_ops.py so that a crash fails that test instead of killing pytest.

    python tests/fuzz_ops_worker.py --seed 0 --calls 2000

Each call gets random tensors (shapes, dims, dtypes, devices cpu/meta, strides) and scalars, either
entirely at random or as a valid call with 0-2 mutations. An oracle below (the rules of
csrc/checks.h, written out again) says whether the call is valid:
  * a valid call must succeed; on the CPU its result must have the shapes, dtypes and device that
    the same call on meta tensors (the fake kernels) gives;
  * an invalid call must raise TypeError, ValueError or RuntimeError whose message names one of the
    operator's arguments.
Prints one JSON line of counts last; exits 0 when every call behaved, 1 otherwise (the first
misbehaving calls are listed on stderr). A crash (e.g. SIGSEGV) shows as the process dying; with
--trace every call is written to stderr before it runs, so the last line names the culprit.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys

import torch

import ld_ext  # noqa: F401  (registers torch.ops.ld_ext)
from ld_ext.ops import registry

O = torch.ops.ld_ext
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHER = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]
MIN_T = 1.0 / 3.4028234663852886e38

# Operator -> names of its arguments, as in its schema (csrc/ops.cpp), for every operator of the
# registry (ld_ext/ops/registry.py): each op and its backward.
SCHEMA = {op: [a.name for a in getattr(O, op).default._schema.arguments] for op in registry.OPERATORS}
TEMPERATURES = [0.2, 0.07, 1.0, True, False, 5e-324, 1e-40, 2.9e-39, 3e-39, 1e-30, 0.0, -0.5, math.inf, -math.inf, math.nan]


def out_dtype(dt):
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


# ----------------------------------------------------------------------------- random tensors


class Spec:
    """A tensor to build: shape, dtype, device, and whether to make it non-contiguous."""

    def __init__(self, shape, dtype, device="cpu", strided=False):
        self.shape, self.dtype, self.device, self.strided = list(shape), dtype, device, strided

    def build(self, rng: random.Random) -> torch.Tensor:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        shape = self.shape
        if self.strided and len(shape) >= 2:
            big = list(shape)
            big[-1] = big[-1] * 2
            t = _values(big, gen)[..., ::2]
        else:
            t = _values(shape, gen)
        if self.dtype.is_floating_point or self.dtype.is_complex:
            t = t.to(self.dtype)
        elif self.dtype == torch.bool:
            t = t > 0
        else:
            t = (t * 3).to(self.dtype)
        return t.to(self.device)

    def __repr__(self):
        dt = str(self.dtype).replace("torch.", "")
        return f"T({self.shape},{dt},{self.device}{',strided' if self.strided else ''})"


def _values(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def rand_shape(rng, ndim=None):
    ndim = rng.choice([0, 1, 2, 3, 3, 4, 4, 5, 6]) if ndim is None else ndim
    return [rng.choice([0, 1, 1, 2, 3, 4, 5]) for _ in range(ndim)]


def rand_dtype(rng):
    return rng.choice(FLOATS) if rng.random() < 0.8 else rng.choice(OTHER)


def rand_spec(rng):
    return Spec(rand_shape(rng), rand_dtype(rng), rng.choice(["cpu"] * 4 + ["meta"]), rng.random() < 0.2)


# ----------------------------------------------------------------------------- valid calls


def valid_call(rng, op):
    """(tensor specs + scalars) of a valid call of `op`, as a dict argument name -> value."""
    dt = rng.choice(FLOATS)
    dev = "meta" if rng.random() < 0.15 else "cpu"
    ot = out_dtype(dt)
    strided = rng.random() < 0.2
    n, d, k = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5)
    spatial = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
    temp = rng.choice([0.2, 0.07, 1.0, 0.5])
    if op.startswith("region_features"):
        args = {
            "embeddings": Spec([n, d, *spatial], dt, dev, strided),
            "assignments": Spec([n, k, *spatial], dt, dev, strided),
            "normalize": rng.random() < 0.5,
            "mode": rng.randint(0, 2),
            "entropy": rng.random() < 0.5,
        }
        if op.endswith("backward"):
            args.update(
                grad_feats=Spec([n, k, d], ot, dev),
                grad_entropy=Spec([], ot, dev),
                feats=Spec([n, k, d], ot, dev),
                rnorm=Spec([n, k], ot, dev),
            )
    elif op.startswith("region_discrimination"):
        args = {"feats": Spec([n, k, d], dt, dev, strided), "temperature": temp}
        if op.endswith("backward"):
            args["grad"] = Spec([], ot, dev)
    elif op.startswith("pixel_cluster_similarity"):
        pshape = [k, d] if rng.random() < 0.5 else [n, k, d]
        args = {
            "embeddings": Spec([n, d, *spatial], dt, dev, strided),
            "prototypes": Spec(pshape, dt, dev),
            "temperature": temp,
            "normalize": rng.random() < 0.5,
        }
        if op.endswith("backward"):
            args.update(grad_out=Spec([n, k, *spatial], dt, dev), out=Spec([n, k, *spatial], dt, dev))
    elif op.startswith("patch_discrimination"):
        m = 2 * rng.randint(1, 4)
        args = {"x": Spec([m, d], dt, dev, strided), "temperature": temp}
        if op.endswith("backward"):
            args["grad"] = Spec([], ot, dev)
    else:
        raise KeyError(f"no valid call of {op} written here: add the op to valid_call and is_valid")
    return args


def mutate(rng, args):
    names = list(args)
    name = rng.choice(names)
    v = args[name]
    if v is None:
        args[name] = rand_spec(rng)
    elif isinstance(v, Spec):
        kind = rng.randrange(8)
        if kind == 0 and v.shape:  # one size changed (maybe to 0)
            i = rng.randrange(len(v.shape))
            v.shape[i] = rng.choice([0, v.shape[i] + 1, max(v.shape[i] - 1, 0), 7])
        elif kind == 1:  # a dim added
            v.shape.insert(rng.randrange(len(v.shape) + 1), rng.randint(1, 3))
        elif kind == 2 and v.shape:  # a dim dropped
            v.shape.pop(rng.randrange(len(v.shape)))
        elif kind == 3:
            v.dtype = rng.choice(FLOATS + OTHER)
        elif kind == 4:
            v.device = "meta" if v.device == "cpu" else "cpu"
        elif kind == 5:
            args[name] = rand_spec(rng)
        elif kind == 6:  # None for a tensor (for the only tensor: a call with no tensor at all)
            args[name] = None
        else:
            v.shape = [0] + v.shape[1:] if v.shape else [0]
    elif isinstance(v, bool):
        args[name] = not v
    elif isinstance(v, int):
        args[name] = rng.choice([-1, 0, 1, 2, 3, 100])
    else:
        args[name] = rng.choice(TEMPERATURES)


def random_call(rng, op):
    args = {}
    for name in SCHEMA[op]:
        if name in ("normalize", "entropy"):
            args[name] = rng.random() < 0.5
        elif name == "mode":
            args[name] = rng.choice([-1, 0, 1, 2, 3])
        elif name == "temperature":
            args[name] = rng.choice(TEMPERATURES)
        else:
            args[name] = rand_spec(rng)
    return args


# ----------------------------------------------------------------------------- the oracle


def is_valid(op, a) -> bool:
    if any(v is None for v in a.values()):  # None for a tensor argument
        return False

    def flt(s):
        return s.dtype in FLOATS

    def temp_ok(t):
        return not isinstance(t, bool) and math.isfinite(t) and t > 0 and t >= MIN_T

    def numel(s):
        return math.prod(s.shape)

    def pixel(s):
        return flt(s) and 3 <= len(s.shape) <= 5 and numel(s) > 0

    def saved_ok(ref, s, dtype, shape):
        return flt(s) and s.device == ref.device and s.dtype == dtype and (shape is None or s.shape == shape)

    if op.startswith("region_features"):
        e, s = a["embeddings"], a["assignments"]
        ok = (
            pixel(e) and pixel(s) and e.device == s.device and e.dtype == s.dtype and len(s.shape) == len(e.shape)
            and s.shape[0] == e.shape[0] and s.shape[2:] == e.shape[2:] and a["mode"] in (0, 1, 2)
        )
        if ok and op.endswith("backward"):
            n, d, k, ot = e.shape[0], e.shape[1], s.shape[1], out_dtype(e.dtype)
            ok = (
                saved_ok(e, a["feats"], ot, [n, k, d]) and saved_ok(e, a["grad_feats"], ot, [n, k, d])
                and saved_ok(e, a["rnorm"], ot, [n, k]) and saved_ok(e, a["grad_entropy"], ot, None)
                and numel(a["grad_entropy"]) == 1
            )
        return ok
    if op.startswith("region_discrimination"):
        f = a["feats"]
        ok = flt(f) and len(f.shape) == 3 and numel(f) > 0 and temp_ok(a["temperature"])
        if ok and op.endswith("backward"):
            ok = saved_ok(f, a["grad"], out_dtype(f.dtype), None) and numel(a["grad"]) == 1
        return ok
    if op.startswith("pixel_cluster_similarity"):
        e, p = a["embeddings"], a["prototypes"]
        ok = pixel(e) and flt(p) and p.device == e.device and p.dtype == e.dtype and numel(p) > 0
        ok = ok and temp_ok(a["temperature"])
        if ok:
            if len(p.shape) == 2:
                ok = p.shape[1] == e.shape[1]
            else:
                ok = len(p.shape) == 3 and p.shape[0] == e.shape[0] and p.shape[2] == e.shape[1]
        if ok and op.endswith("backward"):
            shape = [e.shape[0], p.shape[-2], *e.shape[2:]]
            ok = saved_ok(e, a["grad_out"], e.dtype, shape) and saved_ok(e, a["out"], e.dtype, shape)
        return ok
    if op.startswith("patch_discrimination"):
        x = a["x"]
        ok = flt(x) and len(x.shape) == 2 and numel(x) > 0 and x.shape[0] % 2 == 0 and temp_ok(a["temperature"])
        if ok and op.endswith("backward"):
            ok = saved_ok(x, a["grad"], out_dtype(x.dtype), None) and numel(a["grad"]) == 1
        return ok
    raise KeyError(f"no oracle for {op} written here: add the op to valid_call and is_valid")


# ----------------------------------------------------------------------------- running


def build_args(rng, op, a, device=None):
    out = []
    for name in SCHEMA[op]:
        v = a[name]
        if isinstance(v, Spec):
            t = v.build(rng)
            out.append(t.to(device) if device is not None else t)
        else:
            out.append(v)
    return out


def meta_of(result):
    ts = result if isinstance(result, (tuple, list)) else (result,)
    return [(tuple(t.shape), t.dtype) for t in ts]


def run(seed: int, calls: int, trace: bool) -> int:
    rng = random.Random(seed)
    counts = {"calls": 0, "valid_ok": 0, "invalid_refused": 0}
    problems = []
    ops = list(SCHEMA)
    for op in ops:  # every operator of the registry has a valid call and an oracle (else KeyError)
        is_valid(op, valid_call(random.Random(0), op))
    for i in range(calls):
        op = rng.choice(ops)
        r = rng.random()
        if r < 0.4:
            a = random_call(rng, op)
        else:
            a = valid_call(rng, op)
            for _ in range(rng.choice([0, 0, 1, 1, 1, 2])):
                mutate(rng, a)
        valid = is_valid(op, a)
        desc = f"#{i} {op}({', '.join(f'{k}={a[k]!r}' for k in SCHEMA[op])}) valid={valid}"
        if trace:
            print(desc, file=sys.stderr, flush=True)
        args = build_args(rng, op, a)
        counts["calls"] += 1
        try:
            result = getattr(O, op)(*args)
        except (TypeError, ValueError, RuntimeError) as exc:
            msg = str(exc)
            if valid:
                problems.append(f"valid call refused: {desc}: {type(exc).__name__}: {msg[:300]}")
            elif not any(name in msg for name in SCHEMA[op]):
                problems.append(f"error does not name an argument: {desc}: {type(exc).__name__}: {msg[:300]}")
            else:
                counts["invalid_refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception type is a finding
            problems.append(f"unexpected {type(exc).__name__}: {desc}: {str(exc)[:300]}")
            continue
        if not valid:
            problems.append(f"invalid call accepted: {desc}")
            continue
        devices = {t.device.type for t in args if isinstance(t, torch.Tensor)}
        outs = result if isinstance(result, (tuple, list)) else (result,)
        if any(t.device.type not in devices for t in outs):
            problems.append(f"result on another device: {desc}")
            continue
        if devices == {"cpu"}:
            meta_args = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in args]
            expected = meta_of(getattr(O, op)(*meta_args))
            if meta_of(result) != expected:
                problems.append(f"fake kernel disagrees: {desc}: {meta_of(result)} vs {expected}")
                continue
        counts["valid_ok"] += 1
    counts["problems"] = len(problems)
    for p in problems[:20]:
        print(p, file=sys.stderr)
    print(json.dumps(counts))
    return 0 if not problems else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--trace", action="store_true", help="write each call to stderr before running it")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    return run(ns.seed, ns.calls, ns.trace)


if __name__ == "__main__":
    sys.exit(main())
