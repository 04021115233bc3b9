"""The papers' seven merges on subsets of a zoo's tasks: at which number of tasks do the merging findings of
the papers hold on this zoo?

    python bench/task_count.py --preset mini --sizes 2,3,4,8 --subsets 2

For every size, ``--subsets`` seeded subsets of the zoo's tasks (:func:`surgery_lib.disentanglement.task_subsets`)
are merged by each method with its default options and evaluated on the merged tasks' test sets. Prints per
size the mean accuracy of every merge next to pretrained + head and the experts, task arithmetic's kept share
of the experts' gain, and whether each merging target of the benchmark issue holds:

- every merge above pretrained + head;
- task arithmetic keeps at least 40 % of the experts' average gain (CLIP ViT-B/32, 8 tasks: about 50 %);
- TIES above task arithmetic;
- layer-wise AdaMerging at least 5 points above task arithmetic and above every data-free merge (CLIP: +11).

Merges go through the zoo's merge cache, so a rerun only evaluates. Writes every row to
``_build/task-count/<zoo>.csv``. AMD EPYC, 2 cores: 6 minutes for ``--sizes 2,3,4 --subsets 3`` on mini (the two
AdaMergings take most of it, and their cost grows with the tasks merged).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery_lib.core.errors import OneLineArgumentParser, number_list, positive_int, run_script  # noqa: E402
from surgery_lib.disentanglement import task_subsets  # noqa: E402
from surgery_lib.merging import MAIN_TABLE, METHODS, cached_merge, evaluate_merge  # noqa: E402
from surgery_lib.presets import get_preset  # noqa: E402
from surgery_lib.settings import build_zoo  # noqa: E402

DATA_FREE = ("weight_averaging", "task_arithmetic", "ties")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--sizes", type=number_list(int, 1), default=(2, 3, 4, 8))
    parser.add_argument("--subsets", type=int, default=2)
    parser.add_argument("--methods", default=",".join(MAIN_TABLE[:7]), help="default: the papers' seven merges")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    zoo = build_zoo(get_preset(args.preset), device="cpu")
    accuracy = zoo.manifest["accuracy"]
    methods = args.methods.split(",")
    rows = []
    for size in args.sizes:
        for subset in task_subsets(zoo.tasks, size, args.subsets):
            pretrained = sum(accuracy["pretrained"][t] for t in subset) / size
            expert = sum(accuracy["expert"][t] for t in subset) / size
            for method in methods:
                result = cached_merge(zoo, method, tasks=subset, device="cpu", progress=False)
                merged = evaluate_merge(zoo, result, "cpu", tasks=subset)
                kept = (
                    sum(
                        (merged[t] - accuracy["pretrained"][t]) / (accuracy["expert"][t] - accuracy["pretrained"][t])
                        for t in subset
                    )
                    / size
                )
                rows.append(
                    {
                        "size": size,
                        "tasks": "+".join(subset),
                        "method": method,
                        "merged": sum(merged.values()) / size,
                        "pretrained": pretrained,
                        "experts": expert,
                        "kept_share": kept,
                    }
                )
                print(f"{size} {'+'.join(subset)} {method}: {rows[-1]['merged']:.1f} (kept {kept:.2f})", flush=True)
    table = pd.DataFrame(rows)
    out = ROOT / "_build" / "task-count" / f"{zoo.directory.name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)

    means = table.groupby(["size", "method"])[["merged", "kept_share"]].mean()
    for size, per_method in means.groupby(level="size"):
        merged = per_method["merged"].droplevel("size")
        kept = per_method["kept_share"].droplevel("size")
        reference = table[table["size"] == size][["pretrained", "experts"]].mean()
        print(f"\n{size} tasks: pretrained + head {reference['pretrained']:.1f}, experts {reference['experts']:.1f}")
        for method in methods:
            print(f"  {METHODS[method]:<28} {merged[method]:5.1f}  kept share {kept[method]:5.2f}")
        checks = {"every merge above pretrained + head": bool((merged > reference["pretrained"]).all())}
        if {"task_arithmetic", "ties", "adamerging_layer"} <= set(methods):
            ta, ada = merged["task_arithmetic"], merged["adamerging_layer"]
            data_free = max(merged[m] for m in methods if m in DATA_FREE or m in ("fisher", "regmean"))
            checks["task arithmetic keeps >= 40 %"] = bool(kept["task_arithmetic"] >= 0.4)
            checks["TIES above task arithmetic"] = bool(merged["ties"] > ta)
            checks["layer-wise AdaMerging >= task arithmetic + 5"] = bool(ada >= ta + 5)
            checks["layer-wise AdaMerging above every data-free merge"] = bool(ada > data_free)
        for name, holds in checks.items():
            print(f"  {'holds' if holds else 'fails'}: {name}")
    print(f"\nrows: {out}")


if __name__ == "__main__":
    sys.exit(run_script(main))
