"""User-facing errors: every one names the problem and the fix."""

from __future__ import annotations


class SurgeryBookError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The command line prints it as one line, ``error: <problem> Fix: <fix>``, and exits with status 2.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")
