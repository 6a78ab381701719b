"""``python -m fused_sam``: the ``fused-sam`` command line (:mod:`fused_sam.cli`)."""

from __future__ import annotations

import sys

from fused_sam.cli import main

if __name__ == "__main__":
    sys.exit(main())
