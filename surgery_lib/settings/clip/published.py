"""What the papers published for CLIP ViT-B/32 over their eight tasks: the numbers a benchmark is compared with.

Average test accuracy (%) over SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD, keyed like the
library's table rows, ``(method, version)``: a reference row (``"zero_shot"``, ``"expert"``, ``"mtl"``) or a
registered merging method, and 0 for the merge alone or 1 for + Surgery. Sources: the AdaMerging and Surgery
papers' tables and the official Surgery logs (weight averaging + Surgery ran with the official code's dropped-DTD
defect); ``book/reproduce.md`` has them per task.
"""

from __future__ import annotations

#: ``(method, version) -> average test accuracy (%)``, CLIP ViT-B/32, eight tasks.
VIT_B32_AVERAGES: dict[tuple[str, int], float] = {
    ("zero_shot", 0): 48.0,
    ("expert", 0): 90.5,
    ("mtl", 0): 88.9,
    ("weight_averaging", 0): 65.8,
    ("task_arithmetic", 0): 69.1,
    ("ties", 0): 72.4,
    ("adamerging_task", 0): 71.1,
    ("adamerging_layer", 0): 80.1,
    ("weight_averaging", 1): 80.0,
    ("task_arithmetic", 1): 80.9,
    ("ties", 1): 83.2,
    ("adamerging_layer", 1): 86.1,
}

#: Layer-wise AdaMerging + Surgery *online* (every test image once, batch 1, one pass; official log), ViT-B/32.
VIT_B32_ONLINE_SURGERY: float = 85.3
