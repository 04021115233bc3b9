"""How the library imports open_clip (surgery_lib/core/openclip.py): without transformers, with the imports frozen
out of later garbage collections, and without changing what a process that needs transformers gets. Each case
runs in a fresh interpreter, since both effects concern the first import of the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_open_clip_comes_without_transformers_and_its_imports_are_frozen():
    out = _run(
        """
        import gc, sys
        from surgery_lib.models import build_encoder
        from surgery_lib.presets import get_preset

        encoder = build_encoder(get_preset("smoke").encoder)
        print("transformers imported:", "transformers" in sys.modules)
        print("hf towers see transformers:", sys.modules["open_clip.hf_model"].transformers is not None)
        print("frozen at least 100000:", gc.get_freeze_count() >= 100_000)
        cycle = [encoder]
        cycle.append(cycle)
        del cycle, encoder  # created after the freeze: a later collection still frees it
        print("collected:", gc.collect() > 0)
        import transformers  # hidden only during open_clip's import: importable afterwards

        print("transformers importable:", transformers.__version__ > "")
        """
    )
    assert out.split("\n")[:5] == [
        "transformers imported: False",
        "hf towers see transformers: False",
        "frozen at least 100000: True",
        "collected: True",
        "transformers importable: True",
    ], out


def test_a_process_that_imported_transformers_gets_open_clip_with_it():
    out = _run(
        """
        import sys
        import transformers
        from surgery_lib.core.openclip import import_open_clip

        open_clip = import_open_clip()
        print(open_clip.hf_model.transformers is transformers, import_open_clip() is open_clip)
        """
    )
    assert out.strip() == "True True", out
