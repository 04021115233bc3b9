#!/usr/bin/env python3
"""Time the stages of a long make target and print where the time went.

``make test`` runs each of its stages through this script, so every run ends with a table of seconds
per stage (also written to ``_build/stages-<target>.tsv``), whether it passed or stopped at a failing
stage. Standard library only: the first stage installs the virtual environment.

    python3 bench/stages.py reset test                   # start a new record for target "test"
    python3 bench/stages.py run test unit -- CMD ARGS... # run CMD as stage "unit", record its seconds
    python3 bench/stages.py start test chromium -- CMD   # run CMD in the background as stage "chromium"
    python3 bench/stages.py start test unit --cancel-on-failure -- CMD   # ... stopped if a foreground stage fails
    python3 bench/stages.py wait test chromium           # wait for a background stage (its exit status)
    python3 bench/stages.py report test                  # print the table
    python3 bench/stages.py row test                     # the run as a row of bench/make-test-history.md
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

BUILD = Path(os.environ.get("STAGES_DIR", "_build"))


def _record(target: str) -> Path:
    return BUILD / f"stages-{target}.tsv"


def processor() -> str:
    """The processor as ``lscpu`` names it (model name, family/model, widest vector unit) and the core count.

    This project's 2-core machines include two "AMD EPYC" kinds about 1.8x apart, which the model name
    alone does not tell apart; family/model and AVX-512 do."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    model = fields.get("model name", platform.machine())
    return f"{model} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, {vector}), {os.cpu_count()} cores"


def _append(target: str, stage: str, seconds: float, status: int, note: str = "") -> None:
    with _record(target).open("a") as handle:
        handle.write(f"{stage}\t{seconds:.1f}\t{status}\t{note}\n")


def reset(target: str) -> int:
    BUILD.mkdir(parents=True, exist_ok=True)
    _record(target).write_text(
        f"# {target} on {processor()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n#epoch {time.time():.1f}\n"
    )
    for stale in [*BUILD.glob(f"stages-{target}-*.background"), *BUILD.glob(f"stages-{target}-*.cancel")]:
        stale.unlink()
    return 0


def run(target: str, stage: str, command: list[str]) -> int:
    started = time.perf_counter()
    print(f"==> stage {stage}: {' '.join(command)}", flush=True)
    try:
        status = subprocess.call(command)
    except FileNotFoundError as exc:
        print(f"error: stage {stage}: {exc}", file=sys.stderr)
        status = 127
    except KeyboardInterrupt:
        status = 130
    _append(target, stage, time.perf_counter() - started, status)
    if status != 0:
        print(f"stage {stage} failed with exit status {status}", file=sys.stderr)
        _cancel_background(target)
        report(target)
    return status


def _cancel_background(target: str) -> None:
    """Stop the background stages started with ``--cancel-on-failure`` that are still running (their whole
    process group), so that a failed foreground stage leaves no tests running after make has stopped."""
    for cancel in BUILD.glob(f"stages-{target}-*.cancel"):
        try:
            os.killpg(int(cancel.read_text()), signal.SIGTERM)
            print(f"stopped background stage {cancel.stem.removeprefix(f'stages-{target}-')}", file=sys.stderr)
        except (ProcessLookupError, PermissionError, ValueError):
            pass
        cancel.unlink()


def start(target: str, stage: str, command: list[str], cancel_on_failure: bool = False) -> int:
    """Run ``command`` detached, its output to a log file; :func:`wait` collects its status and time. With
    ``cancel_on_failure`` a failing foreground stage stops it."""
    BUILD.mkdir(parents=True, exist_ok=True)
    log = BUILD / f"stages-{target}-{stage}.log"
    child = subprocess.Popen(
        [sys.executable, __file__, "_child", target, stage, "--", *command],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if cancel_on_failure:
        (BUILD / f"stages-{target}-{stage}.cancel").write_text(str(child.pid))
    print(f"==> stage {stage} started in the background (log: {log}): {' '.join(command)}", flush=True)
    return 0


def _child(target: str, stage: str, command: list[str]) -> int:
    """The background half of :func:`start`: run, then leave ``<status> <seconds>`` for :func:`wait`."""
    marker = BUILD / f"stages-{target}-{stage}.background"
    started = time.perf_counter()
    with (BUILD / f"stages-{target}-{stage}.log").open("w") as log:
        try:
            status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.write(f"error: {exc}\n")
            status = 127
    partial = marker.with_suffix(".tmp")
    partial.write_text(f"{status} {time.perf_counter() - started:.1f}\n")
    partial.replace(marker)
    return status


def wait(target: str, stage: str, timeout: float = 1800) -> int:
    marker = BUILD / f"stages-{target}-{stage}.background"
    waited = time.perf_counter()
    while not marker.exists():
        if time.perf_counter() - waited > timeout:
            print(f"error: background stage {stage} did not finish within {timeout:.0f} s", file=sys.stderr)
            return 124
        time.sleep(0.5)
    fields = marker.read_text(errors="replace").split()
    if len(fields) != 2 or not fields[0].lstrip("-").isdigit() or not _is_number(fields[1]):
        print(
            f"error: {marker} is damaged ({' '.join(fields)[:60]!r}). Fix: run the target again from the start "
            f"(make {target}).",
            file=sys.stderr,
        )
        marker.unlink()
        return 2
    status, seconds_text = int(fields[0]), fields[1]
    _append(
        target,
        stage,
        float(seconds_text),
        status,
        f"in the background; waited {time.perf_counter() - waited:.1f} s for it",
    )
    marker.unlink()
    (BUILD / f"stages-{target}-{stage}.cancel").unlink(missing_ok=True)
    lines = (BUILD / f"stages-{target}-{stage}.log").read_text(errors="replace").splitlines()
    if status != 0:
        print(f"background stage {stage} failed with exit status {status}; the end of its log:", file=sys.stderr)
        print("\n".join(lines[-150:]), file=sys.stderr)
        report(target)
    else:
        print(f"==> background stage {stage} finished: {lines[-1] if lines else ''}", flush=True)
    return status


def _read(target: str) -> tuple[list[str], list[list[str]], dict[str, float], float] | None:
    """The record's lines, its stage rows, the seconds a foreground step waited for each background stage, and
    the total those make; None (and a message) where ``target`` has no record."""
    path = _record(target)
    if not path.exists():
        print(f"no stages recorded for {target} (run `bench/stages.py reset {target}` first)", file=sys.stderr)
        return None
    lines = path.read_text(errors="replace").splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    for number, line in enumerate(lines, 1):
        if line and _damaged(line):
            print(
                f"error: {path} is damaged (line {number}: {line[:60]!r}). Fix: start a new record with "
                f"`python3 bench/stages.py reset {target}` (make {target} does) and run the stages again.",
                file=sys.stderr,
            )
            return None
    # A background stage costs the wall clock only the time a foreground step waited for it.
    waited = {r[0]: float(r[3].split("waited ")[1].split(" s")[0]) for r in rows if "waited " in r[3]}
    total = sum(float(r[1]) for r in rows if "background" not in r[3]) + sum(waited.values())
    return lines, rows, waited, total


def _damaged(line: str) -> bool:
    """Whether a line of a record is not one that this script writes (a hand edit, a disk that filled up)."""
    if line.startswith("#epoch "):
        return not _is_number(line.split(" ", 1)[1])
    if line.startswith("#"):
        return False
    fields = line.split("\t")
    if len(fields) != 4 or not _is_number(fields[1]) or not fields[2].lstrip("-").isdigit():
        return True
    return "waited " in fields[3] and not _is_number(fields[3].split("waited ")[1].split(" s")[0])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: The stages of ``make test`` in the columns of bench/make-test-history.md.
HISTORY_STAGES = ("venv", "zoo", "tests", "book", "browser")


def history_row(target: str) -> int:
    """Print the recorded run as a row of bench/make-test-history.md: the commit checked out here, the total in
    seconds (and minutes), then each stage's seconds; the run number and the tests' count are left as ``?``."""
    record = _read(target)
    if record is None:
        return 1
    _, rows, _, total = record
    seconds = {r[0]: float(r[1]) for r in rows}
    failed = [r[0] for r in rows if r[2] != "0"]
    missing = [s for s in HISTORY_STAGES if s not in seconds]
    if failed or missing:
        problem = f"{', '.join(failed)} failed" if failed else f"no stage {', '.join(missing)}"
        print(
            f"error: the recorded run is not a complete passing {target} ({problem}); the history lists those only",
            file=sys.stderr,
        )
        return 1
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    cells = [f"{seconds[s]:.0f}" for s in HISTORY_STAGES]
    print(
        f"| ? | {commit or '?'} | {total:,.0f} ({total / 60:.1f}) | {' | '.join(cells[:3])} | ? | {' | '.join(cells[3:])} |  |"
    )
    return 0


def report(target: str) -> int:
    record = _read(target)
    if record is None:
        return 1
    lines, rows, waited, total = record
    header = lines[0].lstrip("# ") if lines and lines[0].startswith("#") else target
    epochs = [float(line.split()[1]) for line in lines if line.startswith("#epoch ")]
    width = max([len(r[0]) for r in rows] + [5])
    print(f"\nstages of {header}")
    print(f"{'stage':<{width}}  {'seconds':>8}  {'share':>6}  status")
    for stage, seconds, status, note in rows:
        charged = waited.get(stage, 0.0) if "background" in note else float(seconds)
        share = f"{100 * charged / total:5.1f}%" if total else ""
        print(
            f"{stage:<{width}}  {float(seconds):8.1f}  {share:>6}  {'ok' if status == '0' else 'exit ' + status}  {note}"
        )
    print(
        f"{'total':<{width}}  {total:8.1f}  ({total / 60:.1f} min: the foreground stages and the waits for background ones)"
    )
    if epochs:
        wall = time.time() - epochs[0]
        print(
            f"{'wall clock':<{width}}  {wall:8.1f}  ({wall / 60:.1f} min since the start, waits for background stages included)"
        )
    return 0


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    else:
        command = []
    if len(argv) < 2 or argv[0] not in {"reset", "run", "start", "_child", "wait", "report", "row"}:
        print(__doc__, file=sys.stderr)
        return 2
    verb, target, *rest = argv
    cancel_on_failure = "--cancel-on-failure" in rest
    rest = [r for r in rest if r != "--cancel-on-failure"]
    if verb in {"run", "start", "_child"} and (len(rest) != 1 or not command):
        print(f"usage: stages.py {verb} TARGET STAGE -- COMMAND ...", file=sys.stderr)
        return 2
    if verb == "run":
        return run(target, rest[0], command)
    if verb == "start":
        return start(target, rest[0], command, cancel_on_failure)
    if verb == "_child":
        return _child(target, rest[0], command)
    if verb == "wait":
        return wait(target, rest[0]) if rest else 2
    if verb == "row":
        return history_row(target)
    return reset(target) if verb == "reset" else report(target)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(sys.argv[1:]))
