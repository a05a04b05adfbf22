"""``python -m casa_executors doctor``: what can run here (also the ``casa-executors`` command)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = {"doctor": "list every backend and facility engine: available or not, why, and how to get it"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="casa-executors", description="casa_executors' command line")
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, text in COMMANDS.items()))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage and the choices, exits 2
        return 2
    from casa_executors import doctor

    return doctor.main(argv[1:], prog=f"casa-executors {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
