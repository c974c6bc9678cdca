"""One line on stderr, in one write."""

from __future__ import annotations

import sys


def stderr_line(text: str) -> None:
    """Write ``text`` and its newline to stderr in one ``write`` and flush. The ranks of a torchrun job share
    the stream, and ``print(..., file=sys.stderr)`` writes the newline separately, which let two ranks'
    lines run together on one line (seen in CI with the SIGTERM message)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
