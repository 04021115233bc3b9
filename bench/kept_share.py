"""The kept-share proxy: how much of the experts' gain task arithmetic keeps against the number of tasks merged,
for the zoo's own experts and for experts fine-tuned other ways from the same pretrained model and heads.

    python bench/kept_share.py --preset mini --modes full,attention,lora,tangent [--lr-scale 1,3] [--steps 200]

``full`` at lr scale 1 reuses the zoo's experts; every other (mode, lr scale) trains eight experts with the
zoo's recipe and that mode (:mod:`surgery_lib.finetuning`), kept under ``_build/kept-share/<zoo>/`` so a rerun
reuses them. Prints, per recipe and number of tasks merged, the mean kept share, the task vector's share alone
at the same scale, and the disentanglement error (:mod:`surgery_lib.disentanglement`); writes every row to
``_build/kept-share/<zoo>/curve.csv``. Two threads by default (``--threads``); about 25 s per full expert on
2 cores, about 40 s per tangent expert (measured at 5 steps/s), plus about a minute of evaluation per recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery_lib.core.errors import OneLineArgumentParser, number_list, positive_int, run_script  # noqa: E402
from surgery_lib.core.storage import load_tensors, save_tensors  # noqa: E402
from surgery_lib.disentanglement import kept_share_curve, summarize_curve  # noqa: E402
from surgery_lib.models import load_encoder  # noqa: E402
from surgery_lib.presets import get_preset  # noqa: E402
from surgery_lib.settings import build_zoo  # noqa: E402
from surgery_lib.settings.offline.training import derive_seed, finetune  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--modes", default="full,attention,lora,tangent")
    parser.add_argument(
        "--lr-scale",
        type=number_list(float, 0),
        default=(1.0,),
        help="comma-separated multiples of the recipe's expert lr",
    )
    parser.add_argument("--steps", type=int, default=None, help="expert steps (default: the recipe's)")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--sizes", type=number_list(int, 1), default=(2, 3, 4, 6, 8))
    parser.add_argument("--subsets", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    zoo = build_zoo(preset, device="cpu")
    out = ROOT / "_build" / "kept-share" / zoo.directory.name
    out.mkdir(parents=True, exist_ok=True)
    recipe = preset.recipe
    steps = args.steps or recipe.expert_steps
    sizes = [s for s in args.sizes if s <= len(zoo.tasks)]
    load = lambda state: load_encoder(preset.encoder, state)  # noqa: E731
    import pandas as pd

    tables, summaries = [], []
    for mode in args.modes.split(","):
        for lr_scale in args.lr_scale:
            name = f"{mode}-lr{lr_scale:g}-s{steps}" + (f"-r{args.lora_rank}" if mode == "lora" else "")
            if mode == "full" and lr_scale == 1 and steps == recipe.expert_steps:
                experts = dict(zoo.experts)
            else:
                experts = {}
                for task in zoo.tasks:
                    path = out / f"{name}-{task}.safetensors"
                    if path.exists():
                        experts[task] = load_tensors(path)[0]
                        continue
                    _, experts[task] = finetune(
                        load_encoder(preset.encoder, zoo.pretrained),
                        [(zoo.suite[task], zoo.heads[task])],
                        steps=steps,
                        batch_per_task=recipe.batch_size,
                        lr=recipe.expert_lr * lr_scale,
                        weight_decay=recipe.expert_weight_decay,
                        warmup_fraction=recipe.expert_warmup_fraction,
                        translate_px=recipe.translate_px,
                        seed=derive_seed(recipe.seed, "expert", task),
                        device=torch.device("cpu"),
                        desc=f"{name} {task}",
                        mode=mode,
                        lora_rank=args.lora_rank,
                    )
                    save_tensors(experts[task], path)
            rows = kept_share_curve(
                zoo.pretrained,
                experts,
                zoo.heads,
                {t: zoo.suite[t] for t in zoo.tasks},
                load,
                sizes=sizes,
                subsets=args.subsets,
                scale=args.scale,
            )
            rows.insert(0, "recipe", name)
            tables.append(rows)
            summary = summarize_curve(rows)
            gain = rows.groupby("task")[["expert", "pretrained"]].first()
            summary.insert(0, "expert_gain", (gain["expert"] - gain["pretrained"]).mean())
            summary.insert(0, "recipe", name)
            summaries.append(summary.reset_index())
            print(summary.round(3).to_string(), flush=True)
    pd.concat(tables).to_csv(out / "curve.csv", index=False)
    table = pd.concat(summaries)
    table.to_csv(out / "summary.csv", index=False)
    print(table.round(3).to_string(index=False))
    print(f"rows: {out / 'curve.csv'}")


if __name__ == "__main__":
    sys.exit(run_script(main))
