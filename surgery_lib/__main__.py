"""``python -m surgery_lib`` is the same as the ``surgery-book`` command."""

from surgery_lib.cli import main

raise SystemExit(main())
