"""Shared fixtures: a private cache per test session and a smoke zoo built once into it."""

from __future__ import annotations

import pytest
from published_formats import published_classes, tiny_visual  # noqa: F401 (fixtures for every test module)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A cache directory private to this test session (never the user's cache)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke_suite(cache_dir):
    from surgery_lib.settings import load_suite

    return load_suite("smoke", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def smoke_zoo(cache_dir):
    from surgery_lib.settings import build_zoo

    return build_zoo("smoke", device="cpu", cache_dir=cache_dir, progress=False)


@pytest.fixture(autouse=True)
def torch_threads_are_left_as_found():
    """Fail a test that changes torch's thread count (and restore it): a worker's later builds, the shared smoke
    zoo's twins among them, would then sum in another order and differ in the last bits from the fixture's."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after}; restore it when it ends")
