"""The Autograd kernel of every operator: it applies the operator's autograd Function
(ld_ext/ops/functions.py) whenever gradients may be needed, and otherwise calls the operator below
autograd. Installed when this module is imported (once, by ld_ext/ops/__init__.py), for every
operator of the registry; an operator without a Function fails the import.

torch.library.register_autograd would be the short way, but the autograd.Function it generates
has no setup_context, and torch.func refuses such a Function ("must override the setup_context
staticmethod", pytorch/pytorch#168393); and with no forward-mode rule, a dual input that does not
require grad took the no-grad path, so forward-mode AD silently gave zero tangents. So each
operator gets its own Function (forward below autograd, setup_context, backward, jvp) and an
Autograd kernel that uses it whenever gradients may be needed: grad mode with an input that
requires grad, a forward-AD level (torch.autograd.forward_ad / torch.func.jvp), or any
torch.func transform. Inside an operator's kernel, Function.apply cannot hand the call to
torch.func (its custom_function_call finds no functorch key left to dispatch on), so the Function
is applied at the current torch.func level, as a C++ autograd kernel would be, with functorch's
single-level switch (the path of the pytorch/pytorch#184974 fix for register_autograd). That
serves one differentiating level (grad, vjp, jvp, and vmap around them: jacrev, jacfwd); nested
differentiation is refused (_check_single_differentiation_level) rather than silently missing
the ops' second derivatives. The Functions derive from autograd's _SingleLevelFunction, as the
ones torch.func itself generates do: from torch 2.14 on, Function.apply (in C++) hands every call
under a transform to custom_function_call, also through super(). Uses private torch APIs
(torch._functorch, torch.autograd.function._SingleLevelFunction, forward_ad._current_level).
"""

from __future__ import annotations

import torch

from . import registry
from .compiled import ops
from .functions import FUNCTIONS, forward_ad_active

_lib = torch.library.Library("ld_ext", "IMPL")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def _function_apply(name, function, *args):
    from torch._functorch.autograd_function import enable_single_level_autograd_function

    if torch._C._are_functorch_transforms_active():
        _check_single_differentiation_level(name, args)
    with enable_single_level_autograd_function():
        return function.apply(*args)


def _base_tensor(t):
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t) or f.is_batchedtensor(t):
        t = f.get_unwrapped(t)
    return t


def _check_single_differentiation_level(name, args) -> None:
    """Under torch.func, the ops' autograd nodes live at one level (the innermost transform's):
    more than one differentiating level (grad/vjp/jvp of grad/vjp/jvp, or torch.autograd over a
    torch.func transform) would silently miss the ops' higher derivatives, so it is refused."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    diff = [i for i in retrieve_all_functorch_interpreters() if i.key() in (TransformType.Grad, TransformType.Jvp)]
    outer = diff and any(isinstance(a, torch.Tensor) and _base_tensor(a).requires_grad for a in args)
    if len(diff) > 1 or outer:
        raise RuntimeError(
            f"ld_ext: {name} under nested differentiation (torch.func grad/vjp/jvp inside another "
            "grad/vjp/jvp, or torch.autograd through a torch.func transform) is not supported: "
            "second derivatives of the fused ops are not implemented; use ld_ext.reference for them, "
            "or detach the inputs if no outer derivative is wanted"
        )


def _unwrap_dead_wrappers(args):
    from torch._functorch.utils import unwrap_dead_wrappers

    return unwrap_dead_wrappers(args)


def _register(name: str, function) -> None:
    op = getattr(ops, name).default

    def autograd_kernel(keyset, *args):
        if (
            (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
            or forward_ad_active()
            or torch._C._are_functorch_transforms_active()
        ):
            # The C++ entry of autograd.Function (what Function.apply calls outside torch.func):
            # Function.apply would hand the call to torch.func's custom_function_call, which cannot
            # run from inside an operator's kernel; here, as for any C++ autograd kernel, torch.func
            # has already wrapped the inputs for its level.
            return _function_apply(name, function, *_unwrap_dead_wrappers(args))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


if set(FUNCTIONS) != set(registry.OPERATORS):  # pragma: no cover - the registry and FUNCTIONS disagree
    raise RuntimeError(
        f"ld_ext.ops: the autograd Functions (ld_ext/ops/functions.py FUNCTIONS) are for {sorted(FUNCTIONS)}, "
        f"the registry (ld_ext/ops/registry.py) lists {sorted(registry.OPERATORS)}"
    )
for _name in registry.OPERATORS:
    _register(_name, FUNCTIONS[_name])
