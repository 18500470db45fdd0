"""Bad input is refused with TypeError/ValueError naming the argument; never a crash."""
from __future__ import annotations

import random

import fuzz_ops_worker
import pytest
import torch

import ld_ext
from ld_ext import reference as R
from ld_ext.ops import registry

Z = torch.randn(2, 4, 5, 6)
S = torch.randn(2, 3, 5, 6)
O = torch.ops.ld_ext


def _public_calls_with_temperature():
    """op -> a call of its public function with the temperature given, for every op of the registry
    whose operator takes a temperature. The tensors are those of a valid call of the operator drawn
    by the fuzzer (tests/fuzz_ops_worker.py), made float32 on the CPU, passed in the operator's
    argument order, which the public functions share; nothing here is written per op."""
    calls = {}
    for op in registry.NAMES:
        names = [a.name for a in getattr(O, op).default._schema.arguments]
        if "temperature" not in names:
            continue
        rng = random.Random(0)
        drawn = fuzz_ops_worker.valid_call(rng, op)
        tensors = [fuzz_ops_worker.Spec(drawn[n].shape, torch.float32).build(rng) for n in names
                   if isinstance(drawn[n], fuzz_ops_worker.Spec)]
        calls[op] = lambda tau, f=getattr(ld_ext, op), t=tensors: f(*t, temperature=tau)
    return calls


def test_the_temperature_calls_cover_every_op_with_a_temperature_and_are_valid():
    calls = _public_calls_with_temperature()
    assert len(calls) >= 3  # region_discrimination, pixel_cluster_similarity, patch_discrimination today
    assert set(calls) == {op for op in registry.NAMES if "temperature" in getattr(O, op).default._schema.__str__()}
    for op, call in calls.items():
        out = call(0.2)
        assert torch.isfinite(out).all(), op


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((Z[0, 0], S[0, 0]), {}, ValueError, ["embeddings", "(N, D, *spatial)"]),
        ((Z, S[0, 0]), {}, ValueError, ["assignments", "(N, K, *spatial)"]),
        ((Z, S[:1]), {}, ValueError, ["batch size"]),
        ((Z, S[..., :5]), {}, ValueError, ["spatial size"]),
        ((Z, S.unsqueeze(-1)), {}, ValueError, ["same number of dims"]),
        ((Z.long(), S), {}, TypeError, ["embeddings", "floating-point"]),
        ((Z, S.int()), {}, TypeError, ["assignments", "floating-point"]),
        ((Z, S.double()), {}, TypeError, ["same dtype"]),
        ((Z, S.to("meta")), {}, ValueError, ["same device"]),
        ((Z[:0], S[:0]), {}, ValueError, ["embeddings", "empty"]),
        ((Z[:, :0], S), {}, ValueError, ["embeddings", "empty"]),
        ((Z, S), {"assignment": "soft"}, ValueError, ["assignment", "'probs'"]),
        (([1.0], S), {}, TypeError, ["embeddings", "torch.Tensor"]),
        ((torch.randn(2, 4, 1, 1, 1, 1), torch.randn(2, 3, 1, 1, 1, 1)), {}, ValueError, ["1, 2 or 3 spatial dims"]),
    ],
)
def test_region_features_bad_input(args, kwargs, exc, words):
    calls = (
        lambda: ld_ext.region_features(*args, **kwargs),
        lambda: ld_ext.region_features_and_entropy(*args, **kwargs),
        lambda: ld_ext.RegionDiscriminationLoss(**kwargs)(*args),
    )
    for call in calls:
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("tau, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.2", TypeError), (True, TypeError)])
def test_bad_temperature(tau, exc):
    public = _public_calls_with_temperature().values()
    for call in (
        *(lambda f=f: f(tau) for f in public),
        lambda: ld_ext.RegionDiscriminationLoss(temperature=tau),
        lambda: ld_ext.PatchDiscriminationLoss(temperature=tau),
    ):
        with pytest.raises(exc, match="temperature"):
            call()


def test_loss_module_bad_assignment():
    with pytest.raises(ValueError, match="assignment"):
        ld_ext.RegionDiscriminationLoss(assignment="l1")


def test_region_discrimination_bad_input():
    with pytest.raises(ValueError, match=r"region_feats must have shape \(N, K, D\)"):
        ld_ext.region_discrimination(torch.randn(3, 4))
    with pytest.raises(ValueError, match="region_feats must not be empty"):
        ld_ext.region_discrimination(torch.randn(0, 4, 5))
    with pytest.raises(TypeError, match="region_feats"):
        ld_ext.region_discrimination(torch.ones(2, 3, 4, dtype=torch.int64))


def test_pixel_cluster_similarity_bad_input():
    with pytest.raises(ValueError, match="prototypes must have shape \\(K, D\\) with D=4"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="prototypes must have shape \\(N, K, D\\) with N=2"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="prototypes must have shape"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(4))
    with pytest.raises(TypeError, match="same dtype"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="prototypes must not be empty"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(0, 4))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        ld_ext.pixel_cluster_similarity(torch.randn(4, 5), torch.randn(3, 4))


def test_patch_discrimination_bad_input():
    with pytest.raises(ValueError, match="even number of rows"):
        ld_ext.patch_discrimination(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(M, D\)"):
        ld_ext.patch_discrimination(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="x must not be empty"):
        ld_ext.patch_discrimination(torch.randn(0, 3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ld_ext.patch_discrimination(torch.ones(4, 3, dtype=torch.int32))


def test_double_backward_is_refused():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    s = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid")(z, s)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    x = torch.nn.functional.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    (gx,) = torch.autograd.grad(ld_ext.patch_discrimination(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
    p = torch.randn(3, 3, requires_grad=True)
    out = ld_ext.pixel_cluster_similarity(z, p)
    (gp,) = torch.autograd.grad(out.square().sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gp.sum().backward()


# ----------------------------------------------------------------------------- raw operators
# torch.ops.ld_ext.* are public and check their own arguments (csrc/checks.h), on every device;
# these calls used to crash (SIGSEGV) or return garbage. tests/test_fuzz_ops.py fuzzes the rest.


@pytest.mark.parametrize(
    "call, exc, words",
    [
        # issue 16 item 1: prototypes' dims not checked
        (lambda: O.pixel_cluster_similarity(torch.randn(2, 4, 5), torch.randn(2, 3, 0, 4), 0.2, False),
         ValueError, ["prototypes", "(K, D) or (N, K, D)"]),
        # backward ops: shapes of the gradient and the saved tensors not checked
        (lambda: O.region_features_backward(torch.randn(0, 6, 3), torch.tensor(0.0), torch.randn(1, 3, 1),
                                            torch.randn(1, 1, 1), torch.randn(1, 1, 3), torch.rand(1, 1),
                                            False, 0, True),
         ValueError, ["grad_feats", "shape"]),
        (lambda: O.region_features_backward(torch.randn(1, 1, 3), torch.tensor(0.0), torch.randn(1, 3, 1),
                                            torch.randn(1, 1, 1), torch.randn(1, 1, 3), torch.rand(0, 2),
                                            False, 0, True),
         ValueError, ["rnorm", "shape"]),
        (lambda: O.region_features_backward(torch.randn(1, 1, 3), torch.tensor(0.0), torch.randn(1, 3, 1),
                                            torch.randn(1, 1, 1), torch.randn(0, 1, 2), torch.rand(1, 1),
                                            False, 0, True),
         ValueError, ["feats", "shape"]),
        (lambda: O.pixel_cluster_similarity_backward(torch.randn(2, 0, 2), torch.randn(3, 5, 2),
                                                     torch.randn(3, 1, 5), torch.randn(3, 1, 2), 0.2, False),
         ValueError, ["grad_out", "shape"]),
        (lambda: O.pixel_cluster_similarity_backward(torch.randn(3, 1, 2), torch.randn(3, 5, 2),
                                                     torch.randn(3, 1, 5), torch.randn(0, 1, 2), 0.2, False),
         ValueError, ["out", "shape"]),
        (lambda: O.region_discrimination_backward(torch.ones(2), torch.randn(2, 3, 4), 0.2),
         ValueError, ["grad", "one element"]),
        (lambda: O.patch_discrimination_backward(torch.tensor(1.0, dtype=torch.float64), torch.randn(4, 3), 0.2),
         TypeError, ["grad", "dtype"]),
        (lambda: O.patch_discrimination(torch.randn(3, 2), 0.2), ValueError, ["x", "even number of rows"]),
        (lambda: O.region_features(torch.randn(2, 3, 4), torch.randn(2, 2, 4), False, 3, False),
         ValueError, ["mode"]),
        (lambda: O.region_features(torch.randn(2, 3, 4), torch.randn(2, 2, 4).double(), False, 0, False),
         TypeError, ["assignments", "dtype"]),
        (lambda: O.region_discrimination(torch.ones(2, 3, 4, dtype=torch.int32), 0.2),
         TypeError, ["feats", "floating-point"]),
        # issue 16 item 2: one CPU and one meta input returned a CPU tensor of uninitialised memory
        (lambda: O.pixel_cluster_similarity(torch.randn(4, 1, 64), torch.randn(4, 16, 1, device="meta"), 0.2, False),
         ValueError, ["prototypes", "same device"]),
        (lambda: O.pixel_cluster_similarity(torch.randn(4, 1, 64, device="meta"), torch.randn(4, 16, 1), 0.2, False),
         ValueError, ["prototypes", "same device"]),
        (lambda: O.region_features(torch.randn(2, 3, 4), torch.randn(2, 2, 4, device="meta"), False, 0, False),
         ValueError, ["assignments", "same device"]),
        # meta tensors alone get the same checks as real ones
        (lambda: O.pixel_cluster_similarity(torch.randn(2, 4, 5, device="meta"), torch.randn(2, 3, 0, 4, device="meta"),
                                            0.2, False),
         ValueError, ["prototypes"]),
        (lambda: O.patch_discrimination_backward(torch.ones(2, device="meta"), torch.randn(4, 3, device="meta"), 0.2),
         ValueError, ["grad"]),
    ],
)
def test_raw_op_bad_arguments_are_refused(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), str(info.value)


def test_raw_op_meta_inputs_give_meta_outputs():
    out = O.pixel_cluster_similarity(torch.randn(4, 1, 64, device="meta"), torch.randn(4, 16, 1, device="meta"), 0.2, False)
    assert out.device.type == "meta" and out.shape == (4, 16, 64)


@pytest.mark.parametrize("tau", [5e-324, 1e-40, 2e-39])
def test_temperature_so_small_that_its_inverse_overflows_is_refused(tau):
    """1/temperature must be finite in float32; 5e-324 used to be accepted and give NaN."""
    z, p, r, x = torch.randn(1, 2, 5), torch.randn(3, 2), torch.randn(2, 3, 4), torch.randn(4, 3)
    public = _public_calls_with_temperature().values()
    calls = [
        *(lambda f=f: f(tau) for f in public),
        lambda: ld_ext.PatchDiscriminationLoss(temperature=tau),
        lambda: O.pixel_cluster_similarity(z, p, tau, False),
        lambda: O.region_discrimination(r, tau),
        lambda: O.patch_discrimination(x, tau),
        lambda: O.patch_discrimination_backward(torch.tensor(1.0), x, tau),
        lambda: O.region_discrimination(r.to("meta"), tau),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be >= "):
            call()
    # just above the bound the ops run (float64: the logits, about 1e39, are finite: one-hot rows)
    tau = ld_ext.ops.MIN_TEMPERATURE * 1.0000001
    out = ld_ext.pixel_cluster_similarity(z.double(), p.double(), tau, normalize=True)
    torch.testing.assert_close(out, R.pixel_cluster_similarity(z.double(), p.double(), tau, normalize=True))


@pytest.mark.parametrize("op", registry.OPERATORS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_raw_op_none_for_a_tensor_names_it(op, device):
    """Issue 25: a raw op given None for its only tensor (no tensor at all) raised torch's "There were
    no tensor arguments to this function", naming nothing; with a meta tensor beside it, the fake
    kernel's check binding refused it naming no argument either. Every tensor argument in turn is
    None here, the others those of a valid call."""
    schema = getattr(O, op).default._schema.arguments
    names = [a.name for a in schema]
    drawn = fuzz_ops_worker.valid_call(random.Random(0), op)
    tensor_names = [n for n in names if isinstance(drawn[n], fuzz_ops_worker.Spec)]
    for spec in (drawn[n] for n in tensor_names):
        spec.device = device
    for missing in tensor_names:
        args = [None if n == missing else drawn[n] for n in names]
        args = [a.build(random.Random(1)) if isinstance(a, fuzz_ops_worker.Spec) else a for a in args]
        with pytest.raises(TypeError, match=f"{missing} must be a tensor"):
            getattr(O, op)(*args)
    if len(tensor_names) > 1:  # all of them None
        with pytest.raises(TypeError, match=f"{tensor_names[0]} must be a tensor, got None"):
            getattr(O, op)(*[None if n in tensor_names else drawn[n] for n in names])


def registry_args(op):
    return [a.name for a in getattr(O, op).default._schema.arguments]


@pytest.mark.parametrize("op", [o for o in registry.OPERATORS if "temperature" in registry_args(o)])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("tau", [True, False, 1j])
def test_raw_op_bool_or_complex_temperature_is_refused(op, device, tau):
    """Issue 25: with the schema's `float temperature`, torch turned True into 1.0 before any kernel
    saw it, so a raw op computed a loss at temperature 1; the schema's temperature is a Scalar now and
    every kernel (and fake kernel) refuses bool and complex values. The same call with a real number
    runs (so the refusal is the temperature's, not the other arguments')."""
    names = registry_args(op)
    drawn = fuzz_ops_worker.valid_call(random.Random(0), op)
    for spec in (v for v in drawn.values() if isinstance(v, fuzz_ops_worker.Spec)):
        spec.device = device
    built = {n: (v.build(random.Random(1)) if isinstance(v, fuzz_ops_worker.Spec) else v) for n, v in drawn.items()}
    kind = "bool" if isinstance(tau, bool) else "complex"
    with pytest.raises(TypeError, match=f"ld_ext::{op}: temperature must be a real number, got {kind}"):
        getattr(O, op)(*[tau if n == "temperature" else built[n] for n in names])
    getattr(O, op)(*[0.5 if n == "temperature" else built[n] for n in names])


def test_public_functions_name_a_none_tensor():
    z, p = torch.randn(1, 2, 5), torch.randn(3, 2)
    calls = [
        (lambda: ld_ext.region_features(None, S), "embeddings"),
        (lambda: ld_ext.region_features(Z, None), "assignments"),
        (lambda: ld_ext.region_features_and_entropy(Z, None), "assignments"),
        (lambda: ld_ext.region_discrimination(None), "region_feats"),
        (lambda: ld_ext.pixel_cluster_similarity(None, p), "embeddings"),
        (lambda: ld_ext.pixel_cluster_similarity(z, None), "prototypes"),
        (lambda: ld_ext.patch_discrimination(None), "x"),
    ]
    for call, name in calls:
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got NoneType"):
            call()

