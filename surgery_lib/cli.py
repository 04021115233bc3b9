"""The ``surgery-book`` command line (also ``python -m surgery_lib``).

Subcommands:

- ``zoo``      build or load a preset's model zoo and print its accuracy table
- ``data``     generate or load a preset's task suite and print its data cards
- ``presets``  list the registered presets

Errors caused by input (unknown preset, unwritable cache, ...) print one line naming the problem and
the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from surgery_lib.errors import SurgeryBookError


def format_table(table: Any, as_json: bool) -> str:
    """A DataFrame as Markdown with two decimals, or as JSON ``{row: {column: value}}``."""
    if as_json:
        return json.dumps(table.round(2).to_dict(orient="index"), indent=2)
    return table.to_markdown(floatfmt=".2f")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mini", help="preset name (see 'surgery-book presets'); default: mini")
    parser.add_argument("--cache-dir", default=None, help="data and model cache (default: $SURGERY_BOOK_CACHE or ~/.cache/surgery-book)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_presets(args: argparse.Namespace) -> int:
    from surgery_lib.presets import PRESETS

    rows = {name: {"device": p.default_device, "description": p.description} for name, p in PRESETS.items()}
    if args.json:
        print(json.dumps({name: p.to_dict() for name, p in PRESETS.items()}, indent=2))
    else:
        for name, row in rows.items():
            print(f"{name:8s} [{row['device']}] {row['description']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from surgery_lib.data import load_suite

    started = time.perf_counter()
    suite = load_suite(args.preset, cache_dir=args.cache_dir, progress=not args.quiet)
    cards = suite.cards()
    if args.json:
        print(json.dumps({"cards": cards.to_dict(orient="index"), "files": {k: str(v) for k, v in suite.files.items()}}, indent=2))
    else:
        print(cards.drop(columns=["source", "licence"]).to_markdown())
        print()
        for task, row in cards.iterrows():
            print(f"- {task}: {row['source']}. Licence: {row['licence']}.")
        print(f"\nsuite ready in {time.perf_counter() - started:.1f} s")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from surgery_lib.zoo import build_zoo

    started = time.perf_counter()
    zoo = build_zoo(
        args.preset, device=args.device, cache_dir=args.cache_dir, zoo_dir=args.zoo_dir,
        rebuild=args.rebuild, progress=not args.quiet,
    )  # fmt: skip
    table = zoo.accuracy_table()
    elapsed = time.perf_counter() - started
    if args.json:
        payload = {
            "preset": zoo.preset.name,
            "directory": str(zoo.directory),
            "accuracy": table.round(2).to_dict(orient="index"),
            "train_wall_time_s": zoo.manifest["train_wall_time_s"],
            "this_run_wall_time_s": round(elapsed, 2),
        }
        print(json.dumps(payload, indent=2))
    else:
        print(f"Test accuracy (%) of the {zoo.preset.name} zoo ({zoo.directory})\n")
        print(format_table(table, as_json=False))
        print(f"\ntraining time {zoo.manifest['train_wall_time_s']:.0f} s in all; this run {elapsed:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``surgery-book``."""
    parser = argparse.ArgumentParser(prog="surgery-book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list the registered presets")
    presets.add_argument("--json", action="store_true", help="print every preset's full configuration as JSON")
    presets.set_defaults(run=_cmd_presets)

    data = sub.add_parser("data", help="generate (once) and describe a preset's offline task suite")
    _add_common(data)
    data.set_defaults(run=_cmd_data)

    zoo = sub.add_parser("zoo", help="build or load a preset's model zoo and print its accuracy table")
    _add_common(zoo)
    zoo.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    zoo.add_argument("--zoo-dir", default=None, help="explicit zoo directory (default: in the cache, named by config hash)")
    zoo.add_argument("--rebuild", action="store_true", help="discard the cached zoo and train everything again")
    zoo.set_defaults(run=_cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*IProgress not found.*")
    try:
        return int(args.run(args))
    except SurgeryBookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished models are kept; run the same command again to resume", file=sys.stderr)
        return 130
