"""Caches under faults and concurrency: equal tensors give equal files, a rebuilt but identical model
does not cascade, changed data or training code retrains what was trained on it, the zoo command retrains what
another machine trained, concurrent builds take turns, and worker processes never outlive a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from surgery_lib.cli import main
from surgery_lib.core.storage import load_tensors, save_tensors, sha256_file, source_checksum, write_json
from surgery_lib.merging import MergeOptions, cached_merge
from surgery_lib.settings import build_zoo
from surgery_lib.settings.offline import zoo as zoo_module
from surgery_lib.settings.offline.zoo import MANIFEST

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.heavy
def test_equal_tensors_give_byte_identical_files_in_every_process(tmp_path):
    # safetensors writes its metadata in hash-map order, which changes per process: 5 keys agree by chance 1 in 120.
    script = textwrap.dedent("""
        import sys, torch
        from surgery_lib.core.storage import save_tensors
        tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.int64)}
        print(save_tensors(tensors, sys.argv[1], metadata={"model": "m", "task": "t", "key": "k", "config_hash": "c"}))
    """)
    digests = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")],
            env=ONE_THREAD,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for i in range(3)
    }
    assert len(digests) == 1
    assert sha256_file(tmp_path / "0.safetensors") == digests.pop()
    tensors, metadata = load_tensors(tmp_path / "0.safetensors")
    assert metadata == {"model": "m", "task": "t", "key": "k", "config_hash": "c"} and torch.equal(
        tensors["a"], torch.ones(4, dtype=torch.int64)
    )


def test_the_manifest_records_what_decides_the_last_bits(smoke_zoo):
    machine = smoke_zoo.manifest["machine"]
    assert machine["torch_threads"] == torch.get_num_threads() and machine["cpu_count"] == os.cpu_count()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    built_on = {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_capability": machine["cpu_capability"]}
    assert all(
        entry["built_on"] == built_on and len(entry["content"]) == 16 for entry in smoke_zoo.manifest["models"].values()
    )


class Retraining(Exception):
    pass


def _copy_zoo(smoke_zoo, tmp_path):
    """A private copy of the session's smoke cache (data and zoo), and the copied zoo's directory."""
    cache = smoke_zoo.directory.parent.parent
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache", tmp_path / "cache" / "zoo" / smoke_zoo.directory.name


def _forbid(monkeypatch, *names):
    def refuse(*args, **kwargs):
        raise Retraining

    for name in names:
        monkeypatch.setattr(zoo_module, name, refuse)


def test_a_damaged_model_rebuilt_identically_does_not_retrain_what_was_trained_from_it(
    smoke_zoo, tmp_path, monkeypatch, caplog
):
    cache, directory = _copy_zoo(smoke_zoo, tmp_path)
    before = json.loads((directory / MANIFEST).read_text())["models"]
    with open(directory / "pretrained.safetensors", "r+b") as handle:  # truncated, as by a disk error
        handle.truncate(100)
    _forbid(monkeypatch, "fit_probe", "finetune")  # heads, experts and MTL must be reused
    zoo = build_zoo("smoke", cache_dir=cache, progress=False)
    after = zoo.manifest["models"]
    assert "zoo file" in caplog.text and "rebuilding" in caplog.text  # the damaged file was noticed and retrained
    assert after["pretrained"]["content"] == before["pretrained"]["content"]
    assert after["pretrained"]["sha256"] == before["pretrained"]["sha256"]  # byte-identical rebuild
    assert all(after[name]["sha256"] == before[name]["sha256"] for name in before)


def test_changed_data_retrains_the_models_trained_on_it(smoke_zoo, tmp_path, monkeypatch):
    cache, directory = _copy_zoo(smoke_zoo, tmp_path)
    task = smoke_zoo.tasks[0]
    path = next((cache / "data").rglob(f"{task}-*.safetensors"))
    tensors, metadata = load_tensors(path)
    tensors["train_labels"] = tensors["train_labels"].roll(1)  # a generator change that kept the cache key
    save_tensors(tensors, path, metadata)  # a valid file with its own correct checksum: only the content moved
    _forbid(monkeypatch, "pretrain")
    with pytest.raises(Retraining):
        build_zoo("smoke", cache_dir=cache, progress=False)


def test_a_cached_merge_of_since_rebuilt_experts_is_recomputed(smoke_zoo, tmp_path, caplog):
    import dataclasses

    zoo = dataclasses.replace(smoke_zoo, directory=tmp_path)
    first = cached_merge(zoo, "task_arithmetic", MergeOptions(), device="cpu", progress=False)
    task = zoo.tasks[0]
    changed = dict(
        zoo.experts, **{task: {k: v + 0.01 if v.is_floating_point() else v for k, v in zoo.experts[task].items()}}
    )
    manifest = json.loads(json.dumps(zoo.manifest))
    manifest["models"][f"expert/{task}"]["content"] = "0" * 16
    rebuilt = dataclasses.replace(zoo, experts=changed, manifest=manifest)
    again = cached_merge(rebuilt, "task_arithmetic", MergeOptions(), device="cpu", progress=False)
    assert "merged from other weights" in caplog.text
    key = next(k for k in first.state if first.state[k].is_floating_point())
    assert not torch.equal(again.state[key], first.state[key])


def _edit_models(directory, edit):
    manifest = json.loads((directory / MANIFEST).read_text())
    for entry in manifest["models"].values():
        edit(entry)
    write_json(manifest, directory / MANIFEST)


@pytest.mark.parametrize("older", ["other code", "no code recorded"])
def test_a_zoo_trained_by_other_training_code_or_versions_is_retrained_by_every_caller(
    smoke_zoo, tmp_path, monkeypatch, caplog, older
):
    cache, directory = _copy_zoo(smoke_zoo, tmp_path)
    if older == "other code":  # a cache that outlived an edit of the training code, or a torch upgrade
        _edit_models(directory, lambda entry: entry["depends_on"].update(code="0123abcd4567/torch 2.0.0/open_clip 2.0"))
    else:  # a zoo built before the code was recorded
        _edit_models(directory, lambda entry: entry["depends_on"].pop("code"))
    _forbid(monkeypatch, "pretrain")
    with pytest.raises(Retraining):
        build_zoo("smoke", cache_dir=cache, progress=False)
    assert "rebuilding pretrained: it was trained by other training code or under other versions" in caplog.text


def test_the_zoo_command_retrains_what_another_machine_trained_and_other_callers_reuse_it(
    smoke_zoo, tmp_path, monkeypatch, caplog
):
    cache, directory = _copy_zoo(smoke_zoo, tmp_path)
    elsewhere = {"device": "cpu", "torch_threads": 64, "cpu_capability": "AVX2"}  # a cache restored on another machine
    _edit_models(directory, lambda entry: entry.update(built_on=elsewhere))
    _forbid(monkeypatch, "pretrain", "fit_probe", "finetune")
    monkeypatch.setattr(zoo_module, "machine_record", lambda: {"torch_threads": 64})  # a reader elsewhere
    reused = build_zoo("smoke", cache_dir=cache, progress=False)  # notebooks, tests and grid jobs: one thread
    assert reused.weights_fingerprint() == smoke_zoo.weights_fingerprint() and not caplog.text
    assert reused.manifest["machine"] == smoke_zoo.manifest["machine"]  # the build's record, not the reader's
    with pytest.raises(Retraining):
        main(["zoo", "--preset", "smoke", "--cache-dir", str(cache), "--quiet"])
    assert "rebuilding pretrained: it was trained on cpu, 64 threads, AVX2 and this build runs on cpu, " in caplog.text


def test_the_training_code_checksum_covers_every_module_that_trains_the_zoo(smoke_zoo, tmp_path):
    """Every library module that runs while the zoo trains is in the checksum, except those whose result is
    checked otherwise: the data (by content), the preset (by the zoo's config hash) and bookkeeping that
    decides no number (files, locks, progress bars, errors)."""
    import surgery_lib

    package = Path(surgery_lib.__file__).parent
    checked_otherwise = {
        "settings/offline/suite.py",  # data: by content (suite_fingerprint)
        "settings/offline/generators.py",
        "presets.py",  # the preset: by the zoo's config hash
        "core/registry.py",  # the preset looked up by name
        "settings/__init__.py",  # the setting's dispatch
        "settings/offline/__init__.py",
        "settings/base.py",  # the Zoo that is returned
        "core/storage.py",  # files, checksums, locks
        "core/progress.py",
        "core/errors.py",
        "core/workers.py",
        "core/openclip.py",  # imports open_clip, whose version is in the checksum
    }
    ran = set()

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(package)):
            ran.add(Path(frame.f_code.co_filename).relative_to(package).as_posix())

    previous = sys.getprofile()
    sys.setprofile(record)
    try:
        build_zoo("smoke", cache_dir=smoke_zoo.directory.parent.parent, zoo_dir=tmp_path / "zoo", progress=False)
    finally:
        sys.setprofile(previous)
    covered = {path.relative_to(package).as_posix() for path in zoo_module.training_sources()}
    assert {"settings/offline/training.py", "settings/offline/zoo.py", "models.py"} <= ran  # the tracer saw training
    assert ran - checked_otherwise <= covered, f"add to training_sources: {sorted(ran - checked_otherwise - covered)}"


def test_an_edit_of_the_training_code_or_another_torch_changes_the_code_checksum(tmp_path, monkeypatch):
    source = tmp_path / "training.py"
    source.write_text("lr = 1e-3\n")
    monkeypatch.setattr(zoo_module, "training_sources", lambda: [source])
    original = zoo_module._training_code.__wrapped__()
    source.write_text("lr = 2e-3\n")
    edited = zoo_module._training_code.__wrapped__()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    upgraded = zoo_module._training_code.__wrapped__()
    assert len({original, edited, upgraded}) == 3 and "torch 2.99.0" in upgraded


BUILD_COUNTING_TRAINING = textwrap.dedent("""
    import sys, time
    from surgery_lib.settings import build_zoo
    from surgery_lib.settings.offline import zoo

    original = zoo.pretrain
    def slow_pretrain(*args, **kwargs):
        with open(sys.argv[2], "a") as log:
            log.write("pretrain\\n")
        time.sleep(2)  # widen the window in which a second build would start the same work
        return original(*args, **kwargs)
    zoo.pretrain = slow_pretrain
    build_zoo("smoke", cache_dir=sys.argv[1], progress=False)
""")


@pytest.mark.heavy
def test_two_builds_sharing_a_cache_take_turns_and_train_once(tmp_path):
    calls = tmp_path / "calls.txt"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_COUNTING_TRAINING, str(tmp_path / "cache"), str(calls)],
            env=ONE_THREAD,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert calls.read_text().split() == ["pretrain"]  # the second build waited and reused the first one's model
    directory = next((tmp_path / "cache" / "zoo").glob("smoke-*"))
    manifest = json.loads((directory / MANIFEST).read_text())
    assert all(sha256_file(directory / entry["file"]) == entry["sha256"] for entry in manifest["models"].values())


def _children_appear(process: psutil.Process, count: int, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = process.children(recursive=True)
        if len(children) >= count:
            return children
        time.sleep(0.1)
    raise AssertionError(f"the data generation never started {count} workers")


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_data_generation_leaves_no_worker_behind(sig, tmp_path):
    command = [sys.executable, "-m", "surgery_lib", "data", "--preset", "mini", "--cache-dir", str(tmp_path)]
    run = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = _children_appear(psutil.Process(run.pid), 2)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode in (-sig, 128 + sig), stderr
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"{len(alive)} worker(s) still running after {sig.name}"
    if sig == signal.SIGTERM:  # cleaned up on the way out: the message, and no temporary left half-written
        assert "terminated: finished models, merges and grid cells are kept" in stderr
        assert not list(tmp_path.rglob("*.tmp"))


SIGTERM_INSIDE_A_FORK_HOOK = """
import os, signal, time
from surgery_lib.core.workers import exit_on_sigterm

exit_on_sigterm()


def after_fork_in_parent():  # as filelock's hook: the handler runs in here, where Python drops exceptions
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)


os.register_at_fork(after_in_parent=after_fork_in_parent)
if os.fork() == 0:
    os._exit(0)
try:
    for _ in range(200):
        time.sleep(0.05)
finally:
    print("cleaned up", flush=True)
print("finished", flush=True)
"""


def test_a_sigterm_that_lands_in_a_fork_hook_still_ends_the_run():
    """A fresh make test once saw SIGTERM during the data generation's pool start end with exit status 0 after
    the whole build: the handler had run inside filelock's after-fork hook, whose SystemExit Python prints and
    drops. Such a SIGTERM is delivered again and ends the run, through its finally clauses."""
    run = subprocess.run(
        [sys.executable, "-c", SIGTERM_INSIDE_A_FORK_HOOK], env=ONE_THREAD, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stdout == "cleaned up\n"
    assert "Exception ignored" not in run.stderr


def test_the_source_checksum_changes_with_any_edit_and_not_with_order(tmp_path):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 2\n")
    checksum = source_checksum([first, second])
    assert source_checksum([str(second), first]) == checksum
    second.write_text("y = 3\n")
    assert source_checksum([first, second]) != checksum
    second.write_text("y = 2\n")
    second.rename(tmp_path / "c.py")  # the same bytes under another name: another module
    assert source_checksum([first, tmp_path / "c.py"]) != checksum
