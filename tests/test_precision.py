"""The --precision setting of the GPU paths: fp32 by default on real CLIP, a notice (not a crash) without bf16."""

from __future__ import annotations

import logging

import pytest
import torch

from surgery_lib import models
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.presets import get_preset


def test_cpu_always_runs_fp32_and_unknown_precisions_are_refused():
    assert models.resolve_precision("bf16", "cpu") == "fp32"
    with pytest.raises(SurgeryBookError, match="unknown precision 'fp8'"):
        models.resolve_precision("fp8", "cpu")


def test_a_gpu_without_native_bf16_falls_back_to_fp16_with_one_notice(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(models, "_BF16_NOTICE_GIVEN", set())
    with caplog.at_level(logging.WARNING, logger="surgery_lib.models"):
        assert models.resolve_precision("bf16", "cuda") == "fp16"
        assert models.resolve_precision("bf16", "cuda") == "fp16"
        assert models.resolve_precision("fp32", "cuda") == "fp32"
    notices = [r.getMessage() for r in caplog.records]
    assert notices == ["Tesla T4 has no native bf16: running in fp16 instead"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert models.resolve_precision("bf16", "cuda") == "bf16"


def test_tf32_is_switched_on_only_inside_the_block(monkeypatch):
    monkeypatch.setattr(models, "resolve_precision", lambda precision, device: precision)
    before = torch.get_float32_matmul_precision()
    with models.autocast(torch.device("cuda"), "tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_real_clip_presets_default_to_the_official_fp32():
    assert all(get_preset(name).precision == "fp32" for name in ("clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"))
    assert get_preset("mini").precision == "fp32"
