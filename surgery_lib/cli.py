"""The ``surgery-book`` command line (also ``python -m surgery_lib``).

Subcommands:

- ``zoo``      build or load a preset's model zoo and print its accuracy table
- ``data``     generate or load a preset's task suite and print its data cards
- ``merge``    merge the experts with one method and print per-task accuracy
- ``table``    the papers' main table: every merging method on one preset
- ``surgery``  Surgery or SurgeryV2 on a merged model: accuracy and bias before and after
- ``reproduce`` execute every notebook with papermill for a preset and collect figures and tables
- ``convert``  store task_vectors (read safely) or FusionBench checkpoints as safetensors + manifest
- ``bench``    speed of the official-style surgery loop against this library's
- ``presets``  list the registered presets

Errors caused by input (unknown preset, unwritable cache, ...) print one line naming the problem and
the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import logging
import math
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from surgery_lib.core.errors import OneLineArgumentParser, SurgeryBookError, interval_text, path_argument, run_script
from surgery_lib.core.storage import to_json
from surgery_lib.core.workers import exit_on_sigterm
from surgery_lib.finetuning import FINETUNING_MODES
from surgery_lib.merging import MERGE_METHODS, MERGE_OPTIONS, MergeOptions, get_method
from surgery_lib.merging.options import MAX_SEED, PRECISION
from surgery_lib.presets import PRESETS, Preset, check_preset, get_preset
from surgery_lib.settings import available_settings, build_zoo, get_setting, load_suite


def format_table(table: Any, as_json: bool) -> str:
    """A DataFrame as Markdown with two decimals, or as JSON ``{row: {column: value}}``."""
    if as_json:
        return to_json(table.round(2).to_dict(orient="index"))
    return table.to_markdown(floatfmt=".2f")


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=path_argument,
        default=None,
        help="data and model cache (default: $SURGERY_BOOK_CACHE or ~/.cache/surgery-book)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mini", help="preset name (see 'surgery-book presets'); default: mini")
    _add_cache_dir(parser)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in available_settings():
        get_setting(name).add_arguments(parser)


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    """For the commands that build or read a zoo in this process (zoo, merge, table, surgery, bench)."""
    parser.add_argument(
        "--finetune",
        default=None,
        choices=list(FINETUNING_MODES),
        help="how the zoo's experts are fine-tuned (offline presets; default: the preset's recipe, full)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="rank of every LoRA update with --finetune lora (default 4)"
    )


def _setting_options(args: argparse.Namespace) -> Any:
    """The options of the preset's setting (real CLIP: where checkpoints and data are), from ``args``."""
    return get_setting(get_preset(args.preset).setting).options_from_args(args)


def _zoo_preset(args: argparse.Namespace) -> Preset:
    """The preset named by ``--preset``, its experts' fine-tuning mode replaced by ``--finetune``/``--lora-rank``.

    The changed recipe names another zoo (its own cache folder): experts fine-tuned another way are another zoo.
    """
    preset = get_preset(args.preset)
    mode, rank = getattr(args, "finetune", None), getattr(args, "lora_rank", None)
    if mode is None and rank is None:
        return preset
    if preset.recipe is None:
        raise SurgeryBookError(
            f"--finetune/--lora-rank train experts, and preset {preset.name!r} reads published experts",
            "drop them for this preset, or pass an offline preset (smoke, mini, base)",
        )
    if rank is not None and (mode or preset.recipe.expert_finetune) != "lora":
        raise SurgeryBookError(
            "--lora-rank is given but the experts are not LoRA fine-tunes", "add --finetune lora, or drop --lora-rank"
        )
    recipe = dataclasses.replace(
        preset.recipe,
        expert_finetune=mode or preset.recipe.expert_finetune,
        expert_lora_rank=preset.recipe.expert_lora_rank if rank is None else rank,
    )
    return check_preset(dataclasses.replace(preset, recipe=recipe))


def _build_zoo(args: argparse.Namespace, **extra: Any) -> Any:
    return build_zoo(
        _zoo_preset(args),
        device=getattr(args, "device", None),
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        options=_setting_options(args),
        **extra,
    )


def _cmd_presets(args: argparse.Namespace) -> int:
    rows = {name: {"device": p.default_device, "description": p.description} for name, p in PRESETS.items()}
    if args.json:
        print(to_json({name: p.to_dict() for name, p in PRESETS.items()}))
    else:
        for name, row in rows.items():
            print(f"{name:14s} [{row['device']}] {row['description']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    suite = load_suite(args.preset, cache_dir=args.cache_dir, progress=not args.quiet, options=_setting_options(args))
    cards = suite.cards()
    if args.json:
        print(to_json({"cards": cards.to_dict(orient="index"), "files": {k: str(v) for k, v in suite.files.items()}}))
    else:
        print(cards.drop(columns=["source", "licence"]).to_markdown())
        print()
        for task, row in cards.iterrows():
            print(f"- {task}: {row['source']}. Licence: {row['licence']}.")
        print(f"\nsuite ready in {time.perf_counter() - started:.1f} s")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # The command that builds: a cache restored from another machine is retrained into this machine's bits.
    zoo = _build_zoo(args, zoo_dir=args.zoo_dir, rebuild=args.rebuild, exact=True)
    table = zoo.accuracy_table()
    elapsed = time.perf_counter() - started
    if args.json:
        payload = {
            "preset": zoo.preset.name,
            "directory": str(zoo.directory),
            "accuracy": table.round(2).to_dict(orient="index"),
            "train_wall_time_s": zoo.manifest.get("train_wall_time_s"),
            "this_run_wall_time_s": round(elapsed, 2),
        }
        print(to_json(payload))
    else:
        print(f"Test accuracy (%) of the {zoo.preset.name} zoo ({zoo.directory})\n")
        print(format_table(table, as_json=False))
        if "train_wall_time_s" in zoo.manifest:
            print(f"\ntraining time {zoo.manifest['train_wall_time_s']:.0f} s in all; this run {elapsed:.1f} s")
        else:
            print(f"\nthis run {elapsed:.1f} s")
    return 0


def _check_finite(args: argparse.Namespace, *options: str) -> None:
    """One-line errors for NaN or infinite numeric options (argparse's float() accepts 'nan' and 'inf')."""
    for option in options:
        value = getattr(args, option, None)
        if value is not None and not math.isfinite(value):
            flag = "--" + option.replace("_", "-")
            raise SurgeryBookError(f"{flag} {value} is not a finite number", f"pass a finite value to {flag}")


def _check_range(
    args: argparse.Namespace, option: str, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    """A one-line error unless ``args.<option>`` (when given) lies in the interval; never a silent substitute."""
    value = getattr(args, option, None)
    if value is None:
        return
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        flag = "--" + option.replace("_", "-")
        interval = interval_text(low, high, low_open, high_open)
        raise SurgeryBookError(f"{flag} {value} is outside {interval}", f"pass a value in {interval} to {flag}")


def _refuse_unread(args: argparse.Namespace, dests: Iterable[str], why: str, fix: str | None = None) -> None:
    """A one-line error for the first option of ``dests`` given on the command line (not None) that nothing in
    this run reads, instead of a run that ignores it: ``why`` says what lacks a reader, ``fix`` what would read it."""
    for dest in dests:
        if getattr(args, dest, None) is not None:
            flag = "--" + dest.replace("_", "-")
            raise SurgeryBookError(f"{why} to read {flag}", f"{fix}, or drop {flag}" if fix else f"drop {flag}")


def _check_writable(path: str, *, folder: bool) -> None:
    """A one-line error, before any work, when an output ``path`` (a file, or with ``folder`` a directory) cannot be written."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise SurgeryBookError(f"output folder {path} is a file", "pass a folder (it is created if missing)")
    if not folder and target.is_dir():
        raise SurgeryBookError(f"output file {path} is a folder", "pass a file name, e.g. modules.safetensors")
    where = target if folder else target.parent
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise SurgeryBookError(f"cannot write {path} ({exc.strerror or exc})", "pass a writable location") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SurgeryBookError(f"cannot write {path} (no permission in {existing})", "pass a writable location")


def _merge_options(args: argparse.Namespace, method: str | None = None, shared: tuple[str, ...] = ()):
    """The merge options of ``args`` (the flags :func:`_add_merge_options` generated from the registered
    options), every value checked by its declaration. With ``method``, a flag the method does not read is an
    error (it would be ignored silently), except the ``shared`` flags another part of the command reads."""
    given = {option: getattr(args, option.dest) for option in MERGE_OPTIONS.values()}
    given = {option: value for option, value in given.items() if value is not None}
    if method is not None:
        spec = get_method(method)
        for option in given:
            if option.name not in spec.reads and option.dest not in shared:
                reads = ", ".join(o.cli_flag for o in spec.options) or "no option"
                raise SurgeryBookError(f"{method} does not read {option.cli_flag}", f"drop it ({method} reads {reads})")
    return MergeOptions(**{option.name: value for option, value in given.items()})


def _surgery_config(args: argparse.Namespace, rank: int | None):
    from surgery_lib.surgery.v1 import SurgeryConfig

    _check_finite(args, "lr")
    _check_range(args, "lr", 0, math.inf, low_open=True)
    _check_range(args, "rank", 1, math.inf)
    _check_range(args, "surgery_steps", 1, math.inf)
    _check_range(args, "surgery_batch_size", 1, math.inf)
    _check_range(args, "seed", 0, MAX_SEED)
    online = getattr(args, "online", False)
    for flag, given in (("--surgery-steps", args.surgery_steps), ("--surgery-batch-size", args.surgery_batch_size)):
        if online and given is not None:  # the online run reported 1000 steps it never took
            raise SurgeryBookError(
                f"the online variant does not read {flag} (it takes one step per adaptation image, batch 1)",
                f"drop {flag}, or drop --online",
            )
    default = SurgeryConfig()
    return SurgeryConfig(
        rank=rank,
        steps=default.steps if args.surgery_steps is None else args.surgery_steps,
        batch_size=default.batch_size if args.surgery_batch_size is None else args.surgery_batch_size,
        lr=default.lr if args.lr is None else args.lr,
        seed=args.seed or 0,
        eval_every=0,
        online=online,
        adam=default.adam if args.adam is None else args.adam,
        online_order=getattr(args, "online_order", None) or "official",
    )


def _cmd_merge(args: argparse.Namespace) -> int:
    from surgery_lib.benchmark import peak_memory
    from surgery_lib.evaluation import normalized_accuracy, results_table
    from surgery_lib.merging import METHODS, check_method, evaluate_merge, merge

    method = _tuned_method(args.method) if args.tune == "validation" else check_method(args.method)
    options = _merge_options(args, method)  # bad values fail here, before the zoo is loaded
    zoo = _build_zoo(args)
    result = merge(zoo, method, options, device=args.device, progress=not args.quiet)
    memory = peak_memory(args.device or zoo.preset.default_device)
    accuracy = evaluate_merge(zoo, result, args.device)
    experts = zoo.manifest["accuracy"]["expert"]
    table = results_table({METHODS[method]: accuracy, "individual (expert)": experts})
    tuned = result.details.get("tuned")
    normalized = normalized_accuracy(table.iloc[:1], experts).rename(index=lambda n: f"{n} / expert")
    if args.json:
        print(
            to_json(
                {
                    "method": method,
                    **({"tuned": tuned} if tuned else {}),
                    "accuracy": table.round(2).to_dict(orient="index"),
                    "normalized": normalized.round(2).to_dict(orient="index"),
                    "seconds": round(result.seconds, 2),
                    "peak_memory": {k: None if v is None else round(v, 2) for k, v in memory.items()},
                }
            )
        )
    else:
        print(format_table(table, as_json=False))
        print()
        print(format_table(normalized, as_json=False))
        peaks = [f"{memory['rss_mib']:,.0f} MiB resident (whole process)"] if memory["rss_mib"] is not None else []
        peaks += [f"{memory['gpu_gib']:.2f} GiB on the GPU"] if memory["gpu_gib"] is not None else []
        print(f"\nmerged in {result.seconds:.1f} s" + (f"; peak memory {', '.join(peaks)}" if peaks else ""))
        if tuned:
            chosen = ", ".join(f"{name} {value}" for name, value in tuned["chosen"].items())
            print(
                f"chosen on the validation split ({tuned['metric']}): {chosen}; "
                f"{tuned['merges_evaluated']} merges evaluated in {tuned['seconds']:.1f} s"
            )
    return 0


def _tuned_method(method: str) -> str:
    """``--tune validation``: ``method``'s tuned twin, or a clear error when it has none."""
    from surgery_lib.merging import MERGE_METHODS, check_method
    from surgery_lib.merging.tuning import is_tuned, tuned_name

    check_method(method)
    if is_tuned(method):
        return method
    if tuned_name(method) not in MERGE_METHODS:
        searched = ", ".join(name for name in MERGE_METHODS if tuned_name(name) in MERGE_METHODS)
        raise SurgeryBookError(
            f"{method} has no hyper-parameters its official code searches on validation data",
            f"drop --tune, or pick one that has: {searched}",
        )
    return tuned_name(method)


def _cmd_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from surgery_lib.evaluation import write_table
    from surgery_lib.grid import check_seeds, format_grid, parse_methods, parse_versions, surgery_grid
    from surgery_lib.merging import REPAIRED as MAIN_TABLE_REPAIRED
    from surgery_lib.merging import main_table

    started = time.perf_counter()
    versions = parse_versions(args.surgery)
    methods = parse_methods(args.methods, args.tune)
    check_seeds(args.seed or 0, args.seeds)
    if versions == (0,):  # the merge-only table came back, without a word about the options it ignored
        surgery_only = ("surgery_steps", "surgery_batch_size", "rank", "lr", "adam")
        why = f"--surgery {args.surgery} has no surgery rows"
        _refuse_unread(args, surgery_only, why, "add --surgery none,1,2 for the papers' surgery rows")
    options, config = (
        _merge_options(args),
        _surgery_config(args, args.rank),
    )  # bad values fail here, before the zoo is loaded
    if args.out:
        _check_writable(args.out, folder=True)
    zoo = _build_zoo(args)
    if versions == (0,) and args.seeds == 1:
        table, results = main_table(zoo, methods, options=options, device=args.device, progress=not args.quiet)
        payload: dict[str, Any] = {
            "accuracy": table.round(2).to_dict(orient="index"),
            "seconds": {m: round(r.seconds, 2) for m, r in results.items()},
        }
        chosen = {m: r.details["tuned"]["chosen"] for m, r in results.items() if "tuned" in r.details}
        if chosen:  # what each tuned twin's validation search chose
            payload["tuned"] = chosen
        shown = table
    else:
        repaired = (
            MAIN_TABLE_REPAIRED if args.methods == "papers" else None
        )  # any other list: every method gets surgery rows
        grid = surgery_grid(
            zoo,
            methods,
            versions,
            args.seeds,
            first_seed=args.seed or 0,
            options=options,
            config=config,
            repaired=repaired,
            device=args.device,
            progress=not args.quiet,
        )
        table = grid.table
        payload = {
            "accuracy": grid.to_json(),
            "seconds": round(grid.seconds, 1),
            "seeds": args.seeds,
            "adam": config.adam,
            "surgery_steps": config.steps,
        }
        shown = format_grid(table, per_task=True)
    if args.out:
        for path in write_table(table, Path(args.out) / f"main_table_{zoo.preset.name}"):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(to_json({"preset": zoo.preset.name, **payload}))
    else:
        print(f"Test accuracy (%) on the {zoo.preset.name} preset, {len(zoo.tasks)} tasks\n")
        print(shown.to_markdown(floatfmt=".2f"))
        print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from surgery_lib.cluster import GridSpec, SubmitOptions, readable_grid, run_grid
    from surgery_lib.grid import parse_methods, parse_versions

    for flag in (
        "seeds",
        "surgery_steps",
        "deep_surgery_steps",
        "jobs",
        "cells_per_job",
        "threads",
        "timeout_min",
        "array_parallelism",
        "cpus_per_job",
        "mem_gb",
    ):
        _check_range(args, flag, 1, math.inf)
    _check_range(args, "gpus_per_job", 0, math.inf)
    _check_range(args, "seed", 0, MAX_SEED)
    versions = parse_versions(args.surgery)
    _refuse_unread_grid_options(args, versions)
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    settings = {get_preset(p).setting for p in presets}  # unknown presets fail here, naming the known ones
    spec = GridSpec(
        presets=presets,
        methods=parse_methods(args.methods, args.tune),
        versions=versions,
        seeds=args.seeds,
        first_seed=args.seed,
        surgery_steps=GridSpec.surgery_steps if args.surgery_steps is None else args.surgery_steps,
        deep_surgery_steps=args.deep_surgery_steps,
        device=args.device,
        cache_dir=args.cache_dir,
        threads=args.threads,
        adam=GridSpec.adam if args.adam is None else args.adam,
        setting_options={name: get_setting(name).options_from_args(args) for name in settings},
    )
    submit = SubmitOptions(
        executor=args.executor,
        jobs=SubmitOptions.jobs if args.jobs is None else args.jobs,
        cells_per_job=args.cells_per_job,
        timeout_min=args.timeout_min,
        partition=args.partition,
        gpus_per_job=args.gpus_per_job or 0,
        cpus_per_job=args.cpus_per_job,
        mem_gb=args.mem_gb,
        array_parallelism=SubmitOptions.array_parallelism if args.array_parallelism is None else args.array_parallelism,
    )
    _check_writable(args.out, folder=True)
    result = run_grid(spec, args.out, submit, progress=not args.quiet)
    if args.json:
        print(
            to_json(
                {
                    "table": json.loads(result.files[2].read_text()),
                    "computed": result.computed,
                    "seconds": round(result.seconds, 1),
                }
            )
        )
    else:
        print(readable_grid(result.table).reset_index().to_markdown(index=False))
        print(
            f"\n{result.computed} cells computed in {result.seconds:.0f} s; {len(result.cells) - result.computed} reused"
        )
        for path in result.files:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _refuse_unread_grid_options(args: argparse.Namespace, versions: tuple[int, ...]) -> None:
    """A one-line error for a ``grid`` option that no cell or job of this grid reads (``--gpus-per-job 1`` with
    the local executor, ``--deep-surgery-steps`` without SurgeryV2 cells), instead of a grid that ignores it."""
    if args.executor != "slurm":
        slurm = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "array_parallelism")
        _refuse_unread(args, slurm, f"--executor {args.executor} runs no Slurm job", "add --executor slurm")
    if args.executor != "local":  # Slurm runs one job per cell (or --cells-per-job); inline runs in this process
        why = f"--executor {args.executor} starts no local processes"
        _refuse_unread(args, ("jobs",), why, "add --executor local")
    if 2 not in versions:
        why = f"--surgery {args.surgery} has no SurgeryV2 cells"
        _refuse_unread(args, ("deep_surgery_steps",), why, "add 2 to --surgery")
    if not {1, 2} & set(versions):
        why = f"--surgery {args.surgery} has no surgery cells"
        _refuse_unread(args, ("surgery_steps", "adam"), why, "add 1 or 2 to --surgery")


def _cmd_surgery(args: argparse.Namespace) -> int:
    from surgery_lib.merging import METHODS, check_method, merge
    from surgery_lib.surgery.run import check_surgery_request, run_surgery, save_surgery

    # Bad values fail here, before the zoo is loaded; --seed, --data and --precision also drive the surgery itself.
    options = _merge_options(args, check_method(args.merge), shared=("seed", "data", "precision"))
    if args.online_order and not args.online:
        raise SurgeryBookError(
            "--online-order is read only by the online variant", "add --online, or drop --online-order"
        )
    check_surgery_request(args.version, args.data or "test", args.online)
    _surgery_config(args, args.rank)
    if args.save:
        _check_writable(args.save, folder=False)
    zoo = _build_zoo(args)
    config = _surgery_config(args, args.rank).with_rank(zoo.preset.surgery_rank(args.version))
    merged = merge(zoo, args.merge, options, device=args.device, progress=not args.quiet)
    run = run_surgery(
        zoo,
        merged.state,
        version=args.version,
        config=config,
        split=args.data or "test",
        device=args.device,
        precision=args.precision,
        progress=not args.quiet,
    )
    if args.save:
        save_surgery(run, args.save, {"preset": zoo.preset.name, "merge": args.merge})
    table = run.table()
    name = f"{METHODS[args.merge]} + {'Surgery' if args.version == 1 else 'SurgeryV2'}"
    if args.json:
        print(
            to_json(
                {
                    "preset": zoo.preset.name,
                    "merge": args.merge,
                    "version": args.version,
                    "adapt_split": run.split,
                    "rank": config.rank,
                    "steps": None if config.online else config.steps,  # online: one per adaptation image
                    "adam": config.adam,
                    "online": config.online,
                    **({"online_order": config.online_order} if config.online else {}),
                    "parameters_per_task": run.modules.parameters_per_task(),
                    "table": table.round(4).to_dict(orient="index"),
                    "seconds": {k: round(v, 2) for k, v in run.seconds.items()},
                }
            )
        )
    else:
        print(f"{name} on the {zoo.preset.name} preset (adapting on the {run.split} split, {config.adam} Adam)\n")
        print(table.to_markdown(floatfmt=".3f"))
        print(
            f"\n{run.modules.parameters_per_task():,} parameters per task; "
            f"features {run.seconds['features_s']:.1f} s, training {run.seconds['training_s']:.1f} s"
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from surgery_lib.benchmark import run_benchmark
    from surgery_lib.merging import task_arithmetic
    from surgery_lib.models import load_encoder, resolve_device
    from surgery_lib.surgery.schedule import check_adam

    _check_finite(args, "scale", "lr")
    _check_range(args, "scale", 0, math.inf, low_open=True)
    _check_range(args, "iterations", 1, math.inf)
    _check_range(args, "adamerging_steps", 1, math.inf)  # before the zoo, which takes minutes at the paper's sizes
    _refuse_unread_bench_options(args)
    args.scale = 1.0 if args.scale is None else args.scale
    args.versions = "1,2" if args.versions is None else args.versions
    args.adam = "shared" if args.adam is None else args.adam
    device = resolve_device(args.device, "cpu")
    versions = tuple(int(v) for v in args.versions.split(",") if v.strip().isdigit())
    if not versions or len(versions) != len(args.versions.split(",")) or any(v not in (1, 2) for v in versions):
        raise SurgeryBookError(
            f"--versions {args.versions!r} names no surgery version this benchmark times", "use 1, 2 or 1,2"
        )
    adams = tuple(a.strip() for a in args.adam.split(","))
    for adam in adams:  # before the zoo, which takes minutes to build at the paper's sizes
        check_adam(adam)
    zoo, setting = _bench_zoo(args, device)
    if args.pipeline:
        return _bench_pipeline(args, zoo, setting, device)
    merged = load_encoder(zoo.preset.encoder, task_arithmetic(zoo.pretrained, zoo.experts, 0.3))
    experts = {t: zoo.encoder(t) for t in zoo.tasks}
    data = {t: zoo.suite[t] for t in zoo.tasks}
    setting += ", task arithmetic, test splits"
    results = run_benchmark(
        merged,
        experts,
        data,
        versions=versions,
        iterations=args.iterations,
        adams=adams,
        device=device,
        precision=args.precision or "fp32",
        ranks={v: zoo.preset.surgery_rank(v) for v in versions},
    )
    setting += f", {args.precision or 'fp32'}"
    gib = device.type == "cuda"
    rows = [
        {
            "version": f"V{r.version}",
            "adam": r.adam,
            "rank": r.rank,
            "steps per task": r.steps_per_task,
            "official-style loop (s)": round(r.official_s, 1),
            "this library (s)": round(r.ours_s, 1),
            "of which features (s)": round(r.ours_features_s, 1),
            "features (images/s)": round(r.images_per_s),
            "library / features": round(r.of_floor, 2),
            "speed-up": round(r.speedup, 1),
            **(
                {"official peak (GiB)": round(r.official_peak_gib, 2), "library peak (GiB)": round(r.ours_peak_gib, 2)}
                if gib
                else {}
            ),
        }
        for r in results
    ]
    return _print_bench(args, setting, device, "results", rows)


def _print_bench(args: argparse.Namespace, setting: str, device: Any, key: str, rows: list[dict[str, Any]]) -> int:
    if args.json:
        print(to_json({"setting": setting, "device": str(device), key: rows}))
    else:
        import pandas as pd

        print(f"{setting}, on {device}\n")
        print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def _refuse_unread_bench_options(args: argparse.Namespace) -> None:
    """A one-line error for an option the chosen benchmark would ignore (a ``--scale 0.1`` without a synthetic
    tower timed the preset's full zoo, with nothing said)."""
    if not (args.vit_b32 or args.synthetic is not None):
        why = "a benchmark without --vit-b32 or --synthetic has no synthetic test sets"
        _refuse_unread(args, ("scale",), why, "add --vit-b32 or --synthetic PRESET")
    if args.pipeline:
        _refuse_unread(args, ("versions", "adam", "precision"), "--pipeline times its fixed stages, with no stage")
    else:
        _refuse_unread(
            args, ("adamerging_steps",), "a benchmark without --pipeline runs no AdaMerging", "add --pipeline"
        )


def _bench_zoo(args: argparse.Namespace, device: Any) -> tuple[Any, str]:
    """The benchmarks' zoo: ViT-B/32 with random weights at (``--scale`` x) the paper's test-set sizes, or a preset's."""
    if args.vit_b32 and args.synthetic not in (None, "clip-vit-b-32"):
        raise SurgeryBookError(
            f"--vit-b32 and --synthetic {args.synthetic} name two towers",
            "pass one of them (--vit-b32 is clip-vit-b-32)",
        )
    synthetic = "clip-vit-b-32" if args.vit_b32 else args.synthetic
    if synthetic:
        from surgery_lib.benchmark import PAPER_TEST_SIZES, synthetic_clip_zoo

        preset = get_preset(synthetic)
        if preset.setting != "clip":
            raise SurgeryBookError(
                f"--synthetic {synthetic}: random weights stand in for a published CLIP tower only",
                "name a real-CLIP preset (clip-vit-b-32, clip-vit-b-16, clip-vit-l-14), or --preset for an offline zoo",
            )
        sizes = {t: max(16, round(n * args.scale)) for t, n in PAPER_TEST_SIZES.items()}
        size = preset.encoder.image_size
        setting = (
            f"{synthetic} (random weights), random {size}x{size} images: {sum(sizes.values()):,} test images in "
            f"{len(sizes)} tasks"
        )
        return synthetic_clip_zoo(synthetic, sizes), setting

    args.device = device
    zoo = _build_zoo(args)
    return zoo, f"the {zoo.preset.name} zoo ({len(zoo.tasks)} tasks)"


def _bench_pipeline(args: argparse.Namespace, zoo: Any, setting: str, device: Any) -> int:
    from surgery_lib.benchmark import pipeline_benchmark

    stages = pipeline_benchmark(
        zoo,
        device=device,
        adamerging_steps=args.adamerging_steps,
        surgery_steps=args.iterations * 2,
        progress=not args.quiet,
    )
    rows = [
        {
            "stage": s.stage,
            "seconds": round(s.seconds, 1),
            "peak GPU memory (GB)": None if s.peak_memory_gb is None else round(s.peak_memory_gb, 2),
            "images/s": None if s.images_per_s is None else round(s.images_per_s),
        }
        for s in stages
    ]
    return _print_bench(args, setting, device, "stages", rows)


def _literal(text: str) -> Any:
    """A parameter value as papermill's ``-p`` reads it: a number or boolean if it parses as one, else a string."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, bool)) else text


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from surgery_lib.reproduce import reproduce

    only = None if args.notebooks is None else args.notebooks.split(",")  # "": an error, not every notebook
    args.param = [(name, _literal(value)) for name, value in args.param]
    setting = get_setting(get_preset(args.preset).setting)
    with setting.exported(_setting_options(args)):  # the kernels papermill starts read them from their environment
        runs = reproduce(
            args.preset,
            args.out,
            device=args.device,
            seed=args.seed,
            source=args.source,
            only=only,
            kernel=args.kernel,
            parameters=dict(args.param),
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
    if args.json:
        print(
            to_json(
                [
                    {
                        "notebook": r.notebook,
                        "status": r.status,
                        "seconds": round(r.seconds, 1),
                        "artifacts": r.artifacts,
                    }
                    for r in runs
                ]
            )
        )
    else:
        for run in runs:
            reused = "  (reused: finished there by an earlier run)" if run.status == "reused" else ""
            print(f"{run.notebook:40s} {run.seconds:7.1f} s  {len(run.artifacts)} files{reused}")
        print(f"executed notebooks, figures, tables and summary.md in {args.out}")
        if any(run.status == "reused" for run in runs):
            print(
                "the notebooks that an earlier run into this folder finished with the same sources, parameters, "
                "kernel, preset, library code and committed results were reused; pass another --out to run them all "
                "again"
            )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from surgery_lib.settings.clip.checkpoints import (
        TASK_VECTORS_TASKS,
        convert_fusionbench,
        convert_task_vectors,
    )

    tasks = TASK_VECTORS_TASKS
    if args.tasks is not None:  # "" (an unset variable) converted all eight; "MNIST, DTD" looked for " DTD"
        tasks = tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
        if not tasks:
            raise SurgeryBookError(
                f"--tasks {args.tasks!r} names no task",
                "pass task folder names (e.g. --tasks MNIST,DTD), or leave --tasks out for the papers' eight",
            )
    convert = convert_task_vectors if args.family == "task_vectors" else convert_fusionbench
    manifest = convert(args.source, args.model, args.out, tasks, progress=not args.quiet)
    if args.json:
        print(to_json(manifest))
    else:
        arch = manifest["architecture"]
        print(
            f"{args.model}: {arch['layers']} blocks of width {arch['width']}, patch {arch['patch_size']}, "
            f"{len(manifest['tasks'])} experts, {sum(k.startswith('head/') for k in manifest['files'])} heads"
        )
        for key, entry in manifest["files"].items():
            print(f"  {key:20s} -> {args.out}/{args.model}/{entry['file']}")
    return 0


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and one flag per registered merge option, from its declaration (type, choices, help),
    with the methods that read it."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    for option in MERGE_OPTIONS.values():
        readers = [name for name, method in MERGE_METHODS.items() if option.name in method.reads]
        bounds = f"; in {option.interval}" if option.interval else ""
        parser.add_argument(
            option.cli_flag,
            type=option.kind,
            choices=option.choices,
            default=None,
            help=f"{option.help}{bounds}. Read by: {', '.join(readers)}",
        )


def _add_tune(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--tune",
        choices=("none", "validation"),
        default="none",
        help=f"validation: {what}, over the grid its official code searches (task arithmetic, TSV-M, Iso-C/CTS, "
        "consensus merging, DARE); the preset needs a validation split (offline: suite.validation_per_task; real "
        "CLIP: --validation-images). Default none: the fixed values",
    )


def _add_surgery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--surgery-steps", type=int, default=None, help="steps per task (default 1000 = 500 official iterations x 2)"
    )
    parser.add_argument("--surgery-batch-size", type=int, default=None, help="batch size per task (default 16)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    parser.add_argument(
        "--adam",
        choices=("shared", "per-task"),
        default=None,
        help="optimiser semantics: 'shared' = the published runs (one Adam over all tasks, zero-filled "
        "gradients under torch 1.10, so idle modules keep moving; default); 'per-task' = the same code under torch >= 2",
    )


#: The --precision choices (surgery_lib.models.PRECISIONS).
PRECISION_CHOICES = PRECISION.choices


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``surgery-book``."""
    parser = OneLineArgumentParser(prog="surgery-book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list the registered presets")
    presets.add_argument("--json", action="store_true", help="print every preset's full configuration as JSON")
    presets.set_defaults(run=_cmd_presets, keeps_finished_work=False)

    data = sub.add_parser("data", help="generate (once) and describe a preset's offline task suite")
    _add_common(data)
    data.set_defaults(run=_cmd_data)

    zoo = sub.add_parser(
        "zoo",
        help="build or load a preset's model zoo and print its accuracy table",
        description="Build or load a preset's model zoo and print its accuracy table. A finished model is reused "
        "only if the same data, models, training code and torch and open_clip versions trained it on a machine "
        "with this device, thread count and CPU instruction set (builds on others agree only to a tolerance); "
        "otherwise it is trained again, and everything trained from it if its weights changed.",
    )
    _add_common(zoo)
    _add_finetune(zoo)
    zoo.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    zoo.add_argument(
        "--zoo-dir",
        type=path_argument,
        default=None,
        help="explicit zoo directory (default: in the cache, named by config hash)",
    )
    zoo.add_argument(
        "--rebuild",
        action="store_true",
        help="delete the zoo's own files (never a folder without a zoo manifest) and train everything again",
    )
    zoo.set_defaults(run=_cmd_zoo)

    merge = sub.add_parser("merge", help="merge a preset's experts with one method and print per-task accuracy")
    _add_common(merge)
    _add_finetune(merge)
    merge.add_argument(
        "--method",
        required=True,
        metavar="METHOD",
        help="the merging method: " + ", ".join(f"{n} ({m.label})" for n, m in MERGE_METHODS.items()),
    )
    _add_merge_options(merge)
    _add_tune(
        merge, "merge the method's tuned twin (<method>_tuned): its hyper-parameters chosen on the validation split"
    )
    merge.set_defaults(run=_cmd_merge)

    table = sub.add_parser("table", help="the papers' main table (every merging method) for a preset")
    _add_common(table)
    _add_finetune(table)
    _add_merge_options(table)
    table.add_argument(
        "--methods",
        default="papers",
        help="rows: 'papers' (the papers' main table, default), 'all' (every "
        "registered method but the tuned twins: see --tune) or a comma-separated list of --method names",
    )
    table.add_argument(
        "--out", type=path_argument, default=None, help="also write main_table_<preset>.csv and .md into this directory"
    )
    _add_tune(table, "add each method's tuned twin next to it (hyper-parameters chosen on the validation split)")
    table.add_argument(
        "--surgery",
        default="none",
        help="comma-separated rows per merge: none (the merge alone), 1 (+ Surgery), "
        "2 (+ SurgeryV2); default none. 'none,1,2' gives the papers' whole grid (with --methods papers the seven merges "
        "the papers repair get surgery rows; with any other --methods, every method does)",
    )
    table.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds per row, from --seed on: every surgery row and the merges that draw from a seed ("
        + ", ".join(m for m, method in MERGE_METHODS.items() if "seed" in method.reads)
        + "), computed cell by cell as `grid` does; mean and std over them (default 1)",
    )
    table.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of every surgery module (default: the preset's, 16; SurgeryV2 on ViT-L/14: 4, as in the paper)",
    )
    _add_surgery_options(table)
    table.set_defaults(run=_cmd_table)

    grid = sub.add_parser(
        "grid",
        help="presets x methods x {merge, + Surgery, + SurgeryV2} x seeds as jobs (local processes or "
        "Slurm, through submitit); resumable; one table with mean ± std, bias, time and memory per cell",
    )
    grid.add_argument("--presets", default="mini", help="comma-separated presets (default mini)")
    grid.add_argument(
        "--methods",
        default="all",
        help="'all' (every registered method but the tuned twins, default), 'papers' or a comma-separated list",
    )
    grid.add_argument(
        "--surgery",
        default="none,1,2",
        help="comma-separated: none (merge alone), 1 (+ Surgery), 2 (+ SurgeryV2); default all three",
    )
    _add_tune(grid, "add each method's tuned twin next to it (hyper-parameters chosen on the validation split)")
    grid.add_argument("--seeds", type=int, default=3, help="surgery seeds per cell (default 3)")
    grid.add_argument("--seed", type=int, default=0, help="the first surgery seed; the others follow (default 0)")
    grid.add_argument(
        "--surgery-steps", type=int, default=None, help="Surgery steps per task (default 1000, the official)"
    )
    grid.add_argument(
        "--deep-surgery-steps", type=int, default=None, help="SurgeryV2 steps per task (default: --surgery-steps)"
    )
    grid.add_argument(
        "--adam",
        choices=("shared", "per-task"),
        default=None,
        help="optimiser semantics of the surgery cells: 'shared' (the published runs, default) or 'per-task' (torch >= 2)",
    )
    grid.add_argument(
        "--out",
        type=path_argument,
        required=True,
        help="the grid's folder: one JSON per cell, table.csv/.md/.json, job logs",
    )
    grid.add_argument(
        "--executor",
        choices=("local", "slurm", "inline"),
        default="local",
        help="local: subprocesses on this machine; slurm: a job array; inline: this process (default local)",
    )
    grid.add_argument(
        "--jobs", type=int, default=None, help="local: processes at once, each taking a share of the cells (default 1)"
    )
    grid.add_argument(
        "--cells-per-job",
        type=int,
        default=None,
        help="cells each job computes (default: Slurm 1; local: cells / --jobs)",
    )
    grid.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per job (default: torch's; give 1 when --jobs fills the cores)",
    )
    grid.add_argument("--device", default=None, help="cpu or cuda (default: each preset's)")
    grid.add_argument("--partition", default=None, help="Slurm partition")
    grid.add_argument("--gpus-per-job", type=int, default=None, help="Slurm GPUs per job (default 0)")
    grid.add_argument("--cpus-per-job", type=int, default=None, help="Slurm CPUs per job")
    grid.add_argument("--mem-gb", type=int, default=None, help="Slurm memory per job in GB")
    grid.add_argument("--timeout-min", type=int, default=60, help="time limit per job in minutes (default 60)")
    grid.add_argument(
        "--array-parallelism", type=int, default=None, help="Slurm: array jobs running at once (default 64)"
    )
    _add_cache_dir(grid)
    grid.add_argument("--json", action="store_true", help="print the table as JSON")
    grid.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in available_settings():
        get_setting(name).add_arguments(grid)
    grid.set_defaults(run=_cmd_grid)

    surgery = sub.add_parser(
        "surgery", help="train Surgery (V1) or SurgeryV2 on a merged model; accuracy and bias before and after"
    )
    _add_common(surgery)
    _add_finetune(surgery)
    surgery.add_argument(
        "--merge",
        default="task_arithmetic",
        metavar="METHOD",
        help="the merging method to repair (default task_arithmetic; any of --method's)",
    )
    surgery.add_argument(
        "--version",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: Surgery on the final embedding; 2: SurgeryV2 after every block",
    )
    surgery.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of every module (default 16; SurgeryV2 on ViT-L/14: 4, as in the paper)",
    )
    _add_surgery_options(surgery)
    surgery.add_argument("--online", action="store_true", help="online variant: batch 1, every adaptation image once")
    surgery.add_argument(
        "--online-order",
        choices=("official", "interleaved"),
        default=None,
        help="with --online: 'official' (default; each task's whole pass in turn, as the official script) "
        "or 'interleaved' (the tasks take turns between accuracy checkpoints)",
    )
    surgery.add_argument(
        "--save", type=path_argument, default=None, help="save the trained modules to this .safetensors file"
    )
    _add_merge_options(surgery)
    surgery.set_defaults(run=_cmd_surgery)

    reproduce = sub.add_parser(
        "reproduce", help="execute every notebook with papermill for a preset; collect figures and tables"
    )
    _add_common(reproduce)
    reproduce.add_argument(
        "--out",
        type=path_argument,
        required=True,
        help="output directory (executed notebooks, figures, tables, summary)",
    )
    reproduce.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    reproduce.add_argument("--seed", type=int, default=0, help="the notebooks' seed parameter (default 0)")
    reproduce.add_argument(
        "--source",
        type=path_argument,
        default="notebooks",
        help="folder of the NN_*.ipynb notebooks (default: ./notebooks)",
    )
    reproduce.add_argument("--notebooks", default=None, help="comma-separated numbers or names to run (default: all)")
    reproduce.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' own)")
    reproduce.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        type=str,
        help="another notebook parameter, as papermill's -p (e.g. -p surgery_steps 200); repeatable; a name that "
        "no notebook run declares, or a value of another kind than its default, is refused before the first runs",
    )
    reproduce.set_defaults(run=_cmd_reproduce)

    convert = sub.add_parser(
        "convert", help="convert task_vectors (safe unpickling) or FusionBench checkpoints to safetensors + manifest"
    )
    convert.add_argument(
        "--family",
        choices=("task_vectors", "fusionbench"),
        default="task_vectors",
        help="checkpoint family (default task_vectors)",
    )
    convert.add_argument("--model", required=True, help="ViT-B-32, ViT-B-16 or ViT-L-14")
    convert.add_argument(
        "--source",
        type=path_argument,
        required=True,
        help="task_vectors: folder holding <model>/zeroshot.pt, <model>/<Task>/finetuned.pt, "
        "<model>/head_<Task>.pt; fusionbench: 'hub', or a folder of save_pretrained snapshots named like the hub repositories",
    )
    convert.add_argument("--out", type=path_argument, required=True, help="output folder (writes <out>/<model>/...)")
    convert.add_argument("--tasks", default=None, help="comma-separated task folder names (default: the papers' 8)")
    convert.add_argument("--json", action="store_true", help="print the manifest as JSON")
    convert.add_argument("--quiet", action="store_true", help="no progress bars")
    convert.set_defaults(run=_cmd_convert, keeps_finished_work=False)

    bench = sub.add_parser("bench", help="time the official-style surgery loop against this library's (V1 and V2)")
    _add_common(bench)
    _add_finetune(bench)
    bench.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    bench.add_argument(
        "--iterations", type=int, default=500, help="official iterations (x 2 batches per task; default 500)"
    )
    bench.add_argument("--versions", default=None, help="surgery versions to time (default 1,2)")
    bench.add_argument(
        "--adam",
        default=None,
        help="optimiser semantics to time, comma-separated: shared, per-task (default shared)",
    )
    bench.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=None, help="GPU precision (default fp32, the official)"
    )
    bench.add_argument(
        "--vit-b32",
        action="store_true",
        help="ViT-B/32 with random weights and 224x224 inputs at the paper's sizes (GPU)",
    )
    bench.add_argument(
        "--synthetic",
        default=None,
        metavar="PRESET",
        help="a real-CLIP preset's tower with random weights and random images at the paper's sizes, e.g. "
        "clip-vit-l-14 (GPU; --vit-b32 is --synthetic clip-vit-b-32)",
    )
    bench.add_argument(
        "--pipeline",
        action="store_true",
        help="time merge -> layer-wise AdaMerging -> Surgery -> SurgeryV2 end to end, "
        "with peak GPU memory and feature-extraction images/s",
    )
    bench.add_argument(
        "--scale",
        type=float,
        default=None,
        help="with --vit-b32 or --synthetic: fraction of the paper's test-set sizes (default 1)",
    )
    bench.add_argument(
        "--adamerging-steps",
        type=int,
        default=None,
        help="with --pipeline: AdaMerging steps (default: the preset's, 500)",
    )
    bench.set_defaults(run=_cmd_bench, keeps_finished_work=False)
    return parser


#: ASCII stand-ins for the non-ASCII characters the tables print, for a terminal that cannot encode them.
ASCII_FALLBACK = {
    "±": "+/-",
    "→": "->",
    "×": "x",
    "—": "-",
    "–": "-",
    "…": "...",
    "≥": ">=",
    "≤": "<=",
    "λ": "lambda",
    "τ": "tau",
    "θ": "theta",
    "·": "*",
    "°": " deg",
}


def _ascii_fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    return "".join(ASCII_FALLBACK.get(c, "?") for c in text), error.end


codecs.register_error("surgery_book_ascii", _ascii_fallback)


def _prepare_streams() -> None:
    """Print what a terminal cannot encode (a Latin-1 or ASCII locale) as ASCII ("74.2 +/- 0.4") instead of
    failing on "±" after the whole grid ran."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surgery_book_ascii")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the process exit status."""
    if sys.stdout is None:  # started with stdout closed (`surgery-book grid >&-`): every result would be lost silently
        print(
            "error: standard output is closed, so the result would be lost. Fix: redirect it to a file or a pipe.",
            file=sys.stderr,
        )
        return 2
    _prepare_streams()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*IProgress not found.*")
    exit_on_sigterm()  # timeout, Slurm and docker stop send SIGTERM: clean up as on Ctrl-C
    try:
        # One-line errors, a closed pipe and path errors as every script of the project reports them.
        return run_script(lambda: args.run(args))
    except KeyboardInterrupt:
        print(f"interrupted: {_what_is_kept(args)}", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print(f"terminated: {_what_is_kept(args)}", file=sys.stderr)
        raise


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: the finished models, merges and cells of a command that caches them,
    nothing of one that writes its result only at the end (``bench``, ``convert``, ``presets``)."""
    if getattr(args, "keeps_finished_work", True):
        kept = (
            "finished models, merges and grid cells are kept, and a zoo model in training up to its last "
            "checkpoint (saved every minute)"
        )
        if getattr(args, "rebuild", False):  # again with --rebuild would delete what this run finished
            return f"{kept}; run the command again without --rebuild to resume"
        return f"{kept}; run the same command again to resume"
    return "nothing half-written is left (this command writes its result only when it ends); run it again"
