"""Benchmark-suite settings.

``FUSED_SAM_BENCH_THREADS=N`` pins torch's CPU threads for the whole run. On a small or shared
machine one thread gives steadier numbers: with several, every ATen op above the parallel grain
size waits for all its threads, and one descheduled thread stalls the op.
"""

from __future__ import annotations

import os

import torch

if "FUSED_SAM_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["FUSED_SAM_BENCH_THREADS"]))
