"""User-facing errors: every one names the problem and the fix."""

from __future__ import annotations

import argparse
import difflib
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

_T = TypeVar("_T")


class SurgeryBookError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The command line prints it as one line, ``error: <problem> Fix: <fix>``, and exits with status 2.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


#: errno name -> the fix for an operating-system error on a path the user gave (or a cache folder).
_OS_FIXES = {
    "ENAMETOOLONG": "use shorter folder and file names (file systems allow 255 bytes per name)",
    "ELOOP": "remove the symbolic link loop from the path, or pass another path",
    "EACCES": "make the path writable for this user (a shared cache: a group-writable folder with umask 002), or pass another",
    "EPERM": "make the path writable for this user, or pass another",
    "EROFS": "pass a path on a writable file system",
    "ENOTDIR": "a part of the path is a file: pass a folder path",
    "EISDIR": "the path is a folder: pass a file path",
    "EEXIST": "the path exists as a file: pass a folder path, or remove the file",
    "ENOENT": "check that the path exists",
    "ENOSPC": "free disk space, or pass a path on another disk; finished files are kept",
    "EDQUOT": "free space within your disk quota, or pass a path on another disk; finished files are kept",
}


#: The largest seed any merge, surgery run or grid takes (numpy's and torch's generators both take 32-bit seeds).
MAX_SEED = 2**32 - 1


def whole_number(value: Any, what: str, fix: str) -> int:
    """``value`` as an ``int`` where it is a whole number (``3``, ``3.0``, ``numpy.int64(3)``); True and False are
    not numbers here.

    Raises:
        SurgeryBookError: ``"<what> <value> is not a whole number"`` with ``fix`` (a fraction, text, None, NaN).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise SurgeryBookError(f"{what} {value!r} is not a whole number", fix)
    return int(value)


def refuse_text(name: str, value: Any, fix: str) -> None:
    """Refuse one string where a list is expected: it would be read letter by letter (``methods="ties"`` as the
    methods t, i, e and s; ``tasks="mnist"`` as five tasks).

    Raises:
        SurgeryBookError: ``"<name>='...' is a string, not a list"`` with ``fix``.
    """
    if isinstance(value, str):
        raise SurgeryBookError(f"{name}={value!r} is a string, not a list", fix)


def given_or_default(value: Any, kind: type[_T], name: str, example: str) -> _T:
    """``value`` where it is a ``kind`` (a :class:`~surgery_lib.merging.MergeOptions`, a
    :class:`~surgery_lib.surgery.SurgeryConfig`), ``kind()`` for None.

    Raises:
        SurgeryBookError: for another type, with the call that builds one (``options={"keep_fraction": 0.2}``
            failed with an AttributeError inside the merge).
    """
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    call = f"{kind.__name__}(**{value!r})" if isinstance(value, Mapping) else example
    raise SurgeryBookError(
        f"{name} {value!r} is a {type(value).__name__}, not a {kind.__name__}", f"pass {name}={call}"
    )


def interval_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """A valid interval as error messages show it, e.g. ``(0, 1]`` or ``[0, 4294967295]``: whole-number ends in full
    (``%g`` would print a seed bound as ``4.29497e+09``, which no one can type back), ``None`` as an open infinity."""

    def end(value: float | None, infinity: str) -> str:
        if value is None:
            return infinity
        return str(int(value)) if math.isfinite(value) and float(value).is_integer() else f"{value:g}"

    return f"{'(' if low_open else '['}{end(low, '-inf')}, {end(high, 'inf')}{')' if high_open else ']'}"


def from_os_error(exc: OSError) -> SurgeryBookError:
    """An operating-system error (a name too long, a link loop, no permission, a file where a folder belongs)
    as one clear error naming the path and the fix, for the command line to print instead of a traceback."""
    import errno as errno_module

    name = errno_module.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return SurgeryBookError(
        f"{reason}{where}", _OS_FIXES.get(name, "check the path and its permissions, then run the same command again")
    )


def run_script(main: Callable[[], int | None]) -> int:
    """Run the ``main`` of a script under ``bench/`` as the command line runs its commands, and return the exit
    status for ``sys.exit``: a :class:`SurgeryBookError` or an operating-system error on a path is one line on
    stderr (``error: <problem> Fix: <fix>``) and status 2, and a reader that closed the pipe ends it quietly
    (status 141, as the shell reports SIGPIPE). ``SURGERY_BOOK_DEBUG=1`` shows the traceback instead."""
    try:
        return int(main() or 0)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush does not raise
        return 141
    except (SurgeryBookError, OSError) as exc:
        if os.environ.get("SURGERY_BOOK_DEBUG"):
            raise
        error = exc if isinstance(exc, SurgeryBookError) else from_os_error(exc)
        print(f"error: {error}", file=sys.stderr)
        return 2


def did_you_mean(word: str, choices: Iterable[str] | dict[str, str]) -> str:
    """``"did you mean 'x'? "`` for the choice closest to a mistyped ``word`` (difflib's ratio of at least 0.6),
    or ``""`` when none is close: the start of a fix. ``choices`` may map names a user might type (aliases) to
    the choice to suggest."""
    names = choices if isinstance(choices, dict) else {choice: choice for choice in choices}
    close = difflib.get_close_matches(word, list(names), n=1)
    return f"did you mean {names[close[0]]!r}? " if close else ""


def use_one_of(word: str, choices: Iterable[str]) -> str:
    """The fix for an unknown name: ``"use one of: a, b, c"``, led by ``"did you mean 'x'? Else "`` where one
    choice is close to ``word``."""
    listed = list(choices)
    guess = did_you_mean(word, listed)
    return f"{guess}{'Else use' if guess else 'use'} one of: {', '.join(listed)}"


#: What :func:`path_argument` says of an empty path, and how :class:`OneLineArgumentParser` recognises it.
EMPTY_PATH = "an empty path"


def path_argument(text: str) -> str:
    """The argparse ``type`` of a path option: the text as given, refused when empty. ``--out "$OUT"`` with
    ``OUT`` unset passes an empty string, which ``Path`` reads as the current folder: a zoo or a grid would be
    written among the user's own files."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return text


def number_list(kind: Callable[[str], float], minimum: float | None = None) -> Callable[[str], tuple[Any, ...]]:
    """The argparse ``type`` of a comma-separated list of numbers (``--sizes 2,3,4``): a tuple of ``kind``
    (``int`` or ``float``), each finite and at least ``minimum``; anything else is a one-line usage error naming the text,
    where a bare ``int("x")`` inside the script was a traceback, after a zoo was built."""
    what = "whole numbers" if kind is int else "numbers"
    bound = "" if minimum is None else f" of at least {minimum:g}"

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            values = ()
        if not values or not all(map(math.isfinite, values)) or (minimum is not None and min(values) < minimum):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}{bound}")
        return values

    return parse


def positive_int(text: str) -> int:
    """The argparse ``type`` of a count that must be 1 or more (``--threads``): ``torch.set_num_threads(0)``
    and ``range(-1)`` fail late or do nothing."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are one line, as every other error of this project:
    ``error: <command>: <problem>. Fix: <fix>.`` with exit status 2, instead of the whole usage (for a command
    with thirty options, forty lines above the one that matters). The fix names the closest option or choice
    to a mistyped one, and an unknown option is reported by the subcommand it was given to (plain argparse
    reports it at the top level, with the top level's usage). ``--help`` prints the full usage as before."""

    _commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self._command_parser(parsed).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand ``parsed`` names (itself without subcommands), innermost first."""
        if self._commands is None:
            return self
        chosen = self._commands.choices.get(getattr(parsed, self._commands.dest, None))  # type: ignore[union-attr]
        if isinstance(chosen, OneLineArgumentParser):
            return chosen._command_parser(parsed)
        return chosen or self

    def error(self, message: str) -> NoReturn:
        problem = message.rstrip(".")
        print(f"error: {SurgeryBookError(f'{self.prog}: {problem}', self._fix(problem))}", file=sys.stderr)
        raise SystemExit(2)

    def _fix(self, problem: str) -> str:
        listing = f"`{self.prog} --help` lists every option and what it takes"
        if problem.endswith(EMPTY_PATH):  # "argument --out: an empty path"
            option = self._option_string_actions.get(problem.split(":")[0].removeprefix("argument "))
            default = "" if option is None or option.required else ", or leave the option out for its default"
            return f"pass a path{default} (a shell variable that is not set gives an empty one)"
        if problem.startswith("unrecognized arguments:"):
            options = [word.split("=")[0] for word in problem.split(":", 1)[1].split() if word.startswith("-")]
            guesses = [did_you_mean(option, self._option_names()) for option in options]
            return f"{''.join(guesses) or 'drop it; '}{listing}"
        choice = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", problem)
        if choice:  # Python 3.11 quotes the choices, 3.12.8 and later do not
            choices = [name.strip("'") for name in choice.group(2).split(", ")]
            return f"{did_you_mean(choice.group(1), choices)}{listing}"
        return listing

    def _option_names(self) -> dict[str, str]:
        """Every option string, and what a user might type for it: its metavar as an option (``--method`` for
        ``--merge METHOD``), each mapped to the option to suggest."""
        names = {}
        for action in self._actions:
            if action.option_strings and isinstance(action.metavar, str):
                names[f"--{action.metavar.lower().replace('_', '-')}"] = action.option_strings[-1]
        return names | {option: option for option in self._option_string_actions}
