"""The one logger setup of medcl.

Library code reports progress through module loggers (``logging.getLogger(__name__)``, all children of the
``medcl`` logger) and problems the user should see through ``warnings.warn``; it never prints. The ``medcl``
command calls :func:`configure_logging` once: INFO and above of the ``medcl`` loggers go to stderr as plain
lines, and warnings are shown once each. A program that imports medcl as a library configures logging as it
likes (by default it sees only warnings and errors).

Two messages of third-party libraries that every run would otherwise print and that a user cannot act on are
dropped by :func:`quiet_third_party` (called by the trainer factory): Lightning's advertisement for its
``litlogger`` cloud service, and torch's ``LeafSpec`` deprecation warning that Lightning's pytree helper
triggers. Nothing else is filtered.
"""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["configure_logging", "quiet_third_party"]

_HANDLER_NAME = "medcl-cli"


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


_LIGHTNING_TIP = _DropMessages("litlogger")


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at emit time (pytest swaps it per test)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def quiet_third_party() -> None:
    """Drop Lightning's ``litlogger`` tip and torch's pytree ``LeafSpec`` deprecation warning (idempotent)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if _LIGHTNING_TIP not in lg.filters:
            lg.addFilter(_LIGHTNING_TIP)


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the ``medcl`` loggers' records of ``level`` and above to stderr as plain lines (idempotent)."""
    root = logging.getLogger("medcl")
    root.setLevel(level)
    if not any(getattr(h, "name", "") == _HANDLER_NAME for h in root.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    quiet_third_party()
    return root
