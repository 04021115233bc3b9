"""Figures render, and are written as PNG and PDF."""

from __future__ import annotations

import pandas as pd
import torch

from surgery_lib import plots


def test_every_figure_renders_and_saves(tmp_path):
    table = pd.DataFrame({"mnist": [0.9, 0.4], "shapes": [1.1, 0.5]}, index=["merged", "merged + surgery"])
    generator = torch.Generator().manual_seed(0)
    expert = torch.randn(60, 8, generator=generator)
    figures = {
        "bars": plots.bias_bars(table),
        "blocks": plots.block_bias_curves({"merged": [0.3, 0.5, 0.8], "merged + SurgeryV2": [0.1, 0.1, 0.2]}),
        "tsne": plots.tsne_embeddings(expert, expert + 1, expert + 0.1, title="mnist"),
        "curve": plots.learning_curve({"TA + Surgery": pd.Series([43.0, 60.0, 64.0], index=[0, 500, 1000])}),
    }
    for name, figure in figures.items():
        png, pdf = plots.save_figure(figure, tmp_path / name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    # t-SNE draws one scatter per set (expert, merged, surgery), in the paper's colours.
    colours = [c.get_facecolor()[0][:3] for c in figures["tsne"].axes[0].collections]
    assert len(colours) == 3
