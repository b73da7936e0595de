"""cli/: what every command line shares: bad input is one line on stderr and exit status 2.

:class:`Parser` is ``argparse.ArgumentParser`` whose errors (an unknown flag, a value of the wrong
type, a missing required flag) print ``error: MESSAGE`` on one line, with no usage dump, and exit 2;
:func:`fail` does the same for a value the command itself refuses. ``python -m fraqat_jax.train``,
``eval``, ``export``, ``plan``, ``compare`` and ``pretrain`` use them. It imports nothing of the package.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["Parser", "error_line", "fail"]


def error_line(message) -> str:
    """``error: MESSAGE`` on one line (newlines and runs of spaces in the message folded)."""
    return "error: " + " ".join(str(message).split())


def fail(message) -> NoReturn:
    """Prints :func:`error_line` of ``message`` on stderr and exits with status 2."""
    print(error_line(message), file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message) -> NoReturn:
        self.exit(2, error_line(message) + "\n")
