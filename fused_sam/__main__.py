"""``python -m fused_sam`` / ``fused-sam``: command-line entry point."""

from __future__ import annotations

import argparse
import sys

from fused_sam.info import format_info


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fused-sam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, available backends and why not the others")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
