"""``fused-sam bench``: the optimizer-side cost of a SAM step against plain SGD and AdamW.

Three modes:

* optimizer side (default): a parameter set (synthesised from a known architecture, custom
  sizes, or a user model given as ``module:factory``) with gradients already filled in; one SAM
  step is ``first_step()`` + ``second_step()``, no forward or backward. Every provider runs in the
  same process, side by side: the per-tensor-loop SAM (the algorithm of the widely used
  community implementation, re-implemented as the baseline :class:`PerTensorSAM`, the "loop
  SAM" row), ``FusedSAM`` on the ``foreach`` backend, and every other backend that
  :func:`fused_sam.available_backends` reports usable on the device, plus plain SGD and AdamW
  steps as the denominators of the SAM/SGD ratio.
* end to end (``e2e``): whole training steps (forward, backward and optimizer) of a small CNN
  with BatchNorm at a given batch size: SGD against SAM and its variants (SAM every 5 steps,
  LookSAM, F-SAM, GSAM, Momentum-SAM), each driven the way its users drive it.
* variants (``variants``): the gradient math of LookSAM, F-SAM and GSAM (their optimizer hooks)
  on a parameter set, per backend and tensor by tensor (:func:`bench_variants`).

Timing: on CUDA each step is timed with CUDA events, on CPU with ``time.perf_counter``; the
median of the repetitions is reported. The copy bandwidth is measured in the same run with a
large ``copy_``; "% of floor" is the time the step's minimum memory traffic would take at that
bandwidth (40 B/param for SAM on SGD with momentum, 48 on AdamW, 20 for SGD alone, 28 for
AdamW alone) divided by the measured time. Beside the times, each optimizer-side row counts the
work of one steady-state step twice: with the profiler (CUDA kernel launches on a GPU, top-level
ATen ops on a CPU) and with a ``TorchDispatchMode`` (every op that reaches the dispatcher, the
fused ops included; :data:`~fused_sam.cli.bench.timing.DISPATCHED_OPS_MEANING`).

One module per job: :mod:`.params` (parameter sets), :mod:`.providers` (the baseline, the
backends and the plain optimizers), :mod:`.timing` (times, bandwidth, op counts), one module
per mode (:mod:`.optimizer_side`, :mod:`.variants`, :mod:`.e2e`) and :mod:`.results` (metadata,
result files, tables). The names below are shared with the pytest-benchmark suites in
``benchmarks/``.
"""

from __future__ import annotations

from fused_sam.cli.bench.e2e import E2E_CYCLE, bench_e2e
from fused_sam.cli.bench.optimizer_side import bench_optimizer
from fused_sam.cli.bench.params import PARAM_SETS, Shape, make_params, param_shapes
from fused_sam.cli.bench.providers import PerTensorSAM, Provider, providers_for
from fused_sam.cli.bench.results import (
    GIT_SHA_ENV,
    Table,
    device_name,
    e2e_table,
    git_sha,
    markdown,
    metadata,
    optimizer_table,
    to_csv,
    variants_table,
    write_results,
)
from fused_sam.cli.bench.timing import (
    DISPATCHED_OPS_MEANING,
    copy_bandwidth,
    count_dispatched_ops,
    count_ops,
    dispatched_ops,
    time_step,
)
from fused_sam.cli.bench.variants import VARIANT_BYTES, bench_variants
from fused_sam.cli.models import e2e_model

__all__ = [
    "DISPATCHED_OPS_MEANING",
    "E2E_CYCLE",
    "GIT_SHA_ENV",
    "PARAM_SETS",
    "VARIANT_BYTES",
    "PerTensorSAM",
    "Provider",
    "Shape",
    "Table",
    "bench_e2e",
    "bench_optimizer",
    "bench_variants",
    "copy_bandwidth",
    "count_dispatched_ops",
    "count_ops",
    "device_name",
    "dispatched_ops",
    "e2e_model",
    "e2e_table",
    "git_sha",
    "make_params",
    "markdown",
    "metadata",
    "optimizer_table",
    "param_shapes",
    "providers_for",
    "time_step",
    "to_csv",
    "variants_table",
    "write_results",
]
