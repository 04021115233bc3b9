"""Building blocks of the training loops."""

from __future__ import annotations

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.storage import config_hash
from surgery_lib.presets import get_preset
from surgery_lib.settings.offline.training import (
    derive_seed,
    fit_probe,
    random_translate,
    warmup_cosine,
)


def test_random_translate_shifts_each_image_with_zero_fill():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    shifted = random_translate(images, 2, torch.Generator().manual_seed(0))
    for original, moved in zip(images, shifted):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(original)
                src = original[:, max(0, -dy) : 6 - max(0, dy), max(0, -dx) : 6 - max(0, dx)]
                expected[:, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
                matches.append(torch.equal(moved, expected))
        assert sum(matches) == 1
    assert torch.equal(random_translate(images, 0, torch.Generator()), images)


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_fit_probe_separates_separable_classes():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(400) % 4
    features = centres[labels] + torch.randn(400, 16, generator=generator) * 0.3
    head = fit_probe(features, labels, 4, steps=200, lr=1e-2, weight_decay=0.0, seed=0)
    assert (head(features).argmax(1) == labels).float().mean() > 0.98
    assert not any(p.requires_grad for p in head.parameters())


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "expert", "mnist") == derive_seed(0, "expert", "mnist")
    assert len({derive_seed(0, "expert", t) for t in ("mnist", "shapes", "signs")}) == 3
    assert derive_seed(0, "a") != derive_seed(1, "a")


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(
        SurgeryBookError,
        match=r"unknown preset 'huge'.*use one of: smoke, mini, base, clip-vit-b-32, clip-vit-b-16, clip-vit-l-14",
    ):
        get_preset("huge")


def test_config_hash_tracks_content():
    mini = get_preset("mini")
    assert config_hash(mini.encoder) == config_hash(get_preset("mini").encoder)
    assert config_hash(mini.encoder) != config_hash(get_preset("base").encoder)
