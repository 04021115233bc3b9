"""pytest hooks for the chapters under nbval: every notebook cell gets the ``notebook`` marker, so ``make test``
selects the mini-zoo acceptance checks and the notebooks together, in one pool of workers, with
``-m "slow or notebook"`` (see the Makefile)."""

import pytest


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.path.suffix == ".ipynb":
        item.add_marker(pytest.mark.notebook)
