"""Triton multi-tensor kernels for the SAM ops (CUDA, or CPU under the Triton interpreter).

Each op is one launch over every tensor of its ``(device, dtype)`` bucket, driven by a cached
int64 pointer table (:mod:`._table`), everything included: the norm's total (written by the
launch's last program), the skip decision and the returned flag of the restore ops, Adam's
step counters. So a SAM step is at most four launches per bucket and reads nothing back.
Hyperparameters are runtime float64 arguments, so changing ``lr`` or ``rho``
never recompiles; only block sizes and feature flags (ASAM, mask, momentum, ...) are
compile-time constants.

The package, by job:

* :mod:`._availability`: whether the kernels can run here (imports without triton);
* :mod:`._table`: pointer tables, launch geometry and the device helpers of every kernel;
* kernel families: :mod:`.norm`, :mod:`.perturb`, :mod:`.step` and the variant ops
  (``dot_partials``, ``axpby_``) in :mod:`.combine`;
* :mod:`._launch`: launch plumbing (traced or tabled launches, placeholders);
* :mod:`._bodies`: the op bodies, one launch each;
* :mod:`._registration`: the ``torch.library.triton_op`` registration in the
  ``fused_sam_triton`` namespace, so ``torch.compile`` traces into the ops (eager calls go
  straight to the bodies). Under tracing (fake or functional tensors) there are no addresses
  to put in a table, so each tensor gets a launch of its own with tensor arguments
  (``DIRECT``), through ``torch.library.wrap_triton``: the same kernels and the same math,
  with the mutations visible to the compiler;
* :mod:`.ops`: the backend interface below, and :func:`unsupported`, which tells
  :mod:`fused_sam.functional` which calls the kernels cannot take (functional decides where
  those run).

On CPU tensors the kernels run in the Triton interpreter, which needs ``TRITON_INTERPRET=1``
in the environment before this package is imported; that is how CI checks them.
"""

from __future__ import annotations

from fused_sam.backends.triton._availability import unavailable_reason
from fused_sam.backends.triton.ops import (
    FLAT,
    axpby_,
    dot_partials,
    norm_sq_partials,
    perturb_,
    restore_,
    restore_adam_step_,
    restore_sgd_step_,
    unsupported,
)

__all__ = [
    "FLAT",
    "axpby_",
    "dot_partials",
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
    "unavailable_reason",
    "unsupported",
]
