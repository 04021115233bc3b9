"""open_clip, imported once per process the way this library uses it.

Every process of this project that builds a model imports open_clip (the notebooks' kernels, the grid's jobs, the
CLI), so its import cost is paid dozens of times per test run. Two parts of it buy nothing here (measured on the
project's 2-core machine: a process that builds the mini encoder took 4.7 s, 3.2 s with both avoided):

- open_clip's Hugging Face text towers import ``transformers`` (0.7 s). This library builds only open_clip's own
  towers and reads FusionBench's transformers checkpoints without transformers, so the import is skipped: the
  process's ``open_clip.hf_model`` then sees no transformers and refuses ``hf-hub`` text towers, as when
  transformers is not installed; during that import (once, about 3 s), ``import transformers`` fails in every
  thread of the process. Where transformers is already imported, open_clip gets it as usual.
- torch, torchvision (which imports ``torch._dynamo`` and sympy) and open_clip leave about 400,000 Python objects
  that live as long as the process, and Python's full garbage collections and its exit walk all of them (0.9 s
  per process at exit). After one collection (so no garbage is kept), :func:`gc.freeze` moves them to the
  permanent generation, which later collections skip. Objects created afterwards are collected as usual, and a
  frozen object is still freed when its last reference goes; only a reference cycle among frozen objects stays.
"""

from __future__ import annotations

import gc
import sys
import threading
from types import ModuleType

#: Held for the first import, so that a second caller waits for the whole module (``sys.modules`` holds it
#: half-imported while the first caller imports it).
_FIRST_IMPORT = threading.Lock()


def import_open_clip() -> ModuleType:
    """``open_clip``, imported on the first call (without ``transformers`` unless it is imported already), with the
    objects alive at that moment frozen out of later garbage collections; later calls return the module."""
    with _FIRST_IMPORT:
        if "open_clip" in sys.modules:
            return sys.modules["open_clip"]
        hide_transformers = "transformers" not in sys.modules
        if hide_transformers:
            sys.modules["transformers"] = None  # type: ignore[assignment]  # `import transformers` fails
        try:
            import open_clip
        finally:
            if hide_transformers:
                del sys.modules["transformers"]  # a later `import transformers` imports it normally
        gc.collect()
        gc.freeze()
        return open_clip
