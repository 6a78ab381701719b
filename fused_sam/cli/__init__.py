"""The ``fused-sam`` command line: ``demo``, ``bench`` and ``info``.

The library never imports this package (``import fused_sam`` does not load it); the console
script ``fused-sam`` and ``python -m fused_sam`` both call :func:`main`.

* :mod:`.parser`: the argument parser; :mod:`.commands`: :func:`main` and the subcommands.
* :mod:`.demo` (SAM under label noise) with :mod:`.data` (its data sets) and :mod:`.models` (the
  CNN it trains, which ``bench --e2e`` times too).
* :mod:`.bench`: the benchmark, one module per job; :mod:`.info`: the environment report.
"""

from __future__ import annotations

from fused_sam.cli.commands import main

__all__ = ["main"]
