"""The error types of medcl.

Every problem a user can fix (a bad file, a bad config key) is raised as a subclass of
:class:`MedclError` whose message names *what* (the file or the key) and *the problem*, so a
long scan can collect them and the CLI can print them without a traceback.
"""

from __future__ import annotations

from os import PathLike


class MedclError(Exception):
    """Base class of every error medcl raises on purpose."""


class MedclDataError(MedclError):
    """A problem with an input file or dataset.

    Args:
        path: the file, folder or case the problem is about.
        problem: a short human sentence, e.g. ``"label values {3} outside the declared set {0, 1, 2}"``.
    """

    def __init__(self, path: str | PathLike | None, problem: str) -> None:
        self.path = "" if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable, so an error in a worker process reaches the parent as itself
        return (type(self), (self.path or None, self.problem))


class MedclInterrupted(MedclError):
    """A run stopped by a signal after writing a checkpoint at the step it reached (``--resume`` continues it).

    ``exit_code`` is what the ``medcl`` command returns: 128 + the signal number (143 for SIGTERM).
    """

    def __init__(self, signal_name: str, step: int, out: str | PathLike) -> None:
        import signal as _signal

        self.signal_name, self.step, self.out = signal_name, int(step), str(out)
        self.exit_code = 128 + int(getattr(_signal, signal_name, 15))
        super().__init__(f"{self.out}: stopped by {signal_name} at step {self.step}; a checkpoint of that step is in "
                         f"{self.out}/checkpoints (continue with --resume)")

    def __reduce__(self):
        return (type(self), (self.signal_name, self.step, self.out))


class MedclConfigError(MedclError):
    """A problem with a configuration value; ``key`` is the dotted key path (``train.lr``)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}")

    def __reduce__(self):
        return (type(self), (self.key, self.problem))
