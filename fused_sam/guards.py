"""Guards that keep an optimizer's state whole when something is refused or goes wrong.

Small helpers of :class:`fused_sam.FusedSAM`, callable without it: they take the objects they
check or protect as arguments, and say what to do in their error messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.optim import Optimizer

__all__ = ["groups_kept_on_error"]


@contextlib.contextmanager
def groups_kept_on_error(base: Optimizer) -> Iterator[None]:
    """Put ``base``'s param-group dicts back as they were if the body raises.

    Wrapping an optimizer instance writes into its own group dicts (the SAM keys; torch's
    ``add_param_group`` fills defaults and copies the ``params`` list); a wrapper that is then
    refused (a backend that cannot run, a bad per-group value) must not leave them changed, or
    the base optimizer, or the next wrapper built on it, would run on values of the refused one.
    """
    groups = list(base.param_groups)
    saved = [dict(g) for g in groups]
    try:
        yield
    except BaseException:
        for group, before in zip(groups, saved):
            group.clear()
            group.update(before)
        base.param_groups[:] = groups
        raise
