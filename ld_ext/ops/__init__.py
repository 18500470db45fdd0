"""Python face of the fused ops: input checks, autograd and fake-tensor registrations.

The operators themselves are declared in ``csrc/ops.cpp`` (``torch.ops.ld_ext.*``) and
implemented per device in ``csrc/cpu`` and ``csrc/cuda``. Every public function checks its inputs
(raising ``TypeError``/``ValueError`` that name the argument) and then calls exactly one operator,
so ``torch.compile(fullgraph=True)`` sees a single node per op. The operators check their
arguments again themselves (``csrc/checks.h``, also run by the fake kernels), since
``torch.ops.ld_ext.*`` can be called directly.

Autograd: each operator's Autograd kernel is an ``autograd.Function`` with ``setup_context``, a
backward (the fused backward operator) and a forward-mode rule (``jvp``), so ``torch.autograd``,
``torch.autograd.forward_ad`` and ``torch.func`` (grad, vjp, jvp, jacrev, jacfwd) all work.

Modules, each importing only those above it in this list (and from ld_ext only ``_C`` and
``normalization``):

* ``registry``: the one list of the ops (plain Python, readable without torch);
* ``compiled``: loads ``ld_ext._C``, which registers the operators;
* ``checks``: the public functions' input checks and dtype rules;
* ``api``: the public functions;
* ``fake``: the fake (meta) kernels;
* ``jvp``: the forward-mode math; ``functions``: the autograd Functions;
* ``autograd``: installs the Functions as the operators' Autograd kernels.

Importing this package registers the fake and Autograd kernels, once.
"""

from __future__ import annotations

from ..normalization import ASSIGNMENT_MODES
from . import autograd as _autograd  # noqa: F401  (registers the Autograd kernels)
from . import fake as _fake  # noqa: F401  (registers the fake kernels)
from . import api
from .api import *  # noqa: F403  (the public functions; api.__all__ is their one list)
from .checks import MIN_TEMPERATURE

__all__ = [*api.__all__, "ASSIGNMENT_MODES"]
