"""Measurement for ``fused-sam bench``: step times, the copy bandwidth, and the work a step does.

Timing: on CUDA each step is timed with CUDA events, on CPU with ``time.perf_counter``. Work per
step is counted two ways: :func:`count_ops` with the profiler (CUDA kernel launches on a GPU,
top-level ATen ops on a CPU), and :func:`count_dispatched_ops` with a ``TorchDispatchMode``
(every op that reaches the dispatcher, the fused ops included).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "DISPATCHED_OPS_MEANING",
    "copy_bandwidth",
    "count_dispatched_ops",
    "count_ops",
    "dispatched_ops",
    "time_step",
]

#: What :func:`count_dispatched_ops` counts; stored with the results and printed under the table.
DISPATCHED_OPS_MEANING = (
    "dispatched ops: every op that reaches the dispatcher during one steady-state step "
    "(after warm-up), counted by a TorchDispatchMode below autograd: ATen and fused_sam ops "
    "alike, a composite op as the ops it decomposes into, host reads (.item()) included, "
    "record_function markers excluded; the native backend's direct C++ calls (its eager "
    "shortcut past the dispatcher on the CPU) are declined inside the mode, so its ops are "
    "counted on the registered-op path they stand for"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Callable[[], None], device: torch.device, repeat: int, warmup: int
) -> list[float]:
    """Seconds per call of ``step``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device | str, numel: int, repeat: int = 10) -> float:
    """Copy bandwidth in GB/s (read + write) of ``dst.copy_(src)`` over ``numel`` fp32 values."""
    device = torch.device(device)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(time_step(lambda: dst.copy_(src), device, repeat, warmup=2))
    return 2 * 4 * numel / t / 1e9


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the block.

    The profiler's C++ side logs a start/stop line per session straight to fd 2, which would
    interleave with the results table; Python-level redirection cannot catch it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_ops(step: Callable[[], None], device: torch.device) -> int:
    """Work items one ``step`` dispatches: CUDA kernels on a GPU, top-level ATen ops on a CPU.

    On a GPU this is the number of kernel launches. On a CPU there are no launches; the number
    of top-level ATen operator calls is the closest analogue (a ``_foreach_*`` op over many
    tensors counts once, a per-tensor loop counts once per tensor).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()  # warm caches so the profile shows a steady-state step
    _sync(device)
    with _quiet_stderr(), profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


class _OpCounter(TorchDispatchMode):
    """Counts every op that reaches the Python dispatch mode, by name, and runs it unchanged.

    Inside ``__torch_dispatch__`` the mode is off, so the ops an op's own kernel calls are not
    counted again: one count per op the step itself dispatched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        # record_function's enter/exit markers are ops too, but annotate rather than work.
        if func.namespace != "profiler":
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(
    step: Callable[[], None], device: torch.device | str, warmup: int = 1
) -> Counter[str]:
    """The ops one steady-state call of ``step`` dispatches, by name (see
    :data:`DISPATCHED_OPS_MEANING`).

    ``warmup`` untimed calls run first, outside the mode, so that the count excludes what only a
    first step does (state creation, table builds, lazy imports).

    The native backend skips the dispatcher on the CPU under ``no_grad`` (``_C.direct_*``); any
    active dispatch mode turns that shortcut off (``fused_sam.backends.native._direct``), so the
    fused ops show up here as the registered ``fused_sam::`` ops they are, one count per call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        step()
    _sync(device)
    with _OpCounter() as counter:
        step()
    _sync(device)
    return counter.ops


def count_dispatched_ops(
    step: Callable[[], None], device: torch.device | str, warmup: int = 1
) -> int:
    """The number of ops one steady-state call of ``step`` dispatches (:func:`dispatched_ops`)."""
    return sum(dispatched_ops(step, device, warmup).values())
