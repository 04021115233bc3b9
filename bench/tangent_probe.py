"""Merging in tangent space: do tangent-space experts, evaluated linearised as Ortiz-Jimenez et al. evaluate them,
merge on the mini zoo as CLIP's experts merge?

    python bench/kept_share.py --modes tangent --lr-scale 1,3   # trains the tangent experts (once)
    python bench/tangent_probe.py --lr-scale 1,3

A linearised model is ``f(x; theta_0) + J(x) . tau``, linear in ``tau``: a merge of task vectors
``sum_t lambda_t tau_t`` gives ``f0(x) + sum_t lambda_t J(x) tau_t``. So one Jacobian-vector product per (task
images, task vector) pair gives every merge of those vectors at once, at any coefficients: task arithmetic at
every scale, every subset of tasks, weight averaging, and task-wise AdaMerging (its entropy objective on the
adaptation images is a function of eight coefficients over precomputed outputs). TIES adds one product per task
(of the disjoint sum of the trimmed vectors). Prints the pretrained model, the experts and the merges (test
accuracy, %, averaged over the eight tasks), task arithmetic's kept share against the number of tasks merged,
and the scales where accuracy peaks and entropy is lowest. Writes the rows to
``_build/kept-share/<zoo>/tangent-probe.csv``. AMD EPYC, 2 cores: about 3 minutes per recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery_lib.core.errors import OneLineArgumentParser, number_list, positive_int, run_script  # noqa: E402
from surgery_lib.core.storage import load_tensors  # noqa: E402
from surgery_lib.disentanglement import task_subsets  # noqa: E402
from surgery_lib.finetuning import LinearizedEncoder  # noqa: E402
from surgery_lib.merging.adamerging import prediction_entropy  # noqa: E402
from surgery_lib.merging.ties import ties_vectors  # noqa: E402
from surgery_lib.merging.vectors import task_vectors  # noqa: E402
from surgery_lib.models import load_encoder  # noqa: E402
from surgery_lib.presets import get_preset  # noqa: E402
from surgery_lib.settings import build_zoo  # noqa: E402

SPLITS = ("test", "adapt")


@torch.no_grad()
def outputs(base, data, split: str, vector=None, batch: int = 500) -> torch.Tensor:
    """``f0(x)`` (vector None) or ``J(x) . vector`` for ``data``'s ``split``: (N, D)."""
    parts = []
    model = None if vector is None else LinearizedEncoder(base, vector).eval()
    for start in range(0, len(data.labels[split]), batch):
        images = data.normalized(split, slice(start, start + batch))
        f0 = base(images)
        parts.append(f0 if model is None else model(images) - f0)
    return torch.cat(parts)


def probe(name: str, zoo, base, f0, folder: Path, adamerging_steps: int) -> list[dict]:
    """Every merge of the ``name`` recipe's tangent experts, evaluated linearised: one row per merge."""
    tasks = list(zoo.tasks)
    heads = {t: zoo.heads[t].eval() for t in tasks}
    labels = {t: zoo.suite[t].labels["test"] for t in tasks}
    rows: list[dict] = []
    experts = {t: load_tensors(folder / f"{name}-{t}.safetensors")[0] for t in tasks}
    vectors = task_vectors(zoo.pretrained, experts)
    jv = {(t, s, v): outputs(base, zoo.suite[t], s, vectors[v]) for t in tasks for s in SPLITS for v in tasks}
    disjoint = ties_vectors([vectors[v] for v in tasks], 0.2)
    ties_sum = {k: sum(d[k] for d in disjoint) for k in disjoint[0]}
    jties = {t: outputs(base, zoo.suite[t], "test", ties_sum) for t in tasks}

    def logits(task: str, coefficients: dict[str, float], split: str = "test") -> torch.Tensor:
        z = f0[(task, split)] + sum(c * jv[(task, split, v)] for v, c in coefficients.items())
        return heads[task](z)

    def accuracy(task: str, coefficients: dict[str, float]) -> float:
        return 100.0 * (logits(task, coefficients).argmax(-1) == labels[task]).float().mean().item()

    pre = {t: accuracy(t, {}) for t in tasks}
    expert = {t: accuracy(t, {t: 1.0}) for t in tasks}
    gain = {t: expert[t] - pre[t] for t in tasks}

    def kept(accuracies: dict[str, float]) -> float:
        return sum((accuracies[t] - pre[t]) / gain[t] for t in accuracies) / len(accuracies)

    def record(method: str, accuracies: dict[str, float], **extra) -> None:
        rows.append(
            {
                "recipe": name,
                "method": method,
                **accuracies,
                "average": sum(accuracies.values()) / len(accuracies),
                "kept_share": kept(accuracies),
                **extra,
            }
        )

    record("pretrained", pre)
    record("expert", expert)
    record("weight averaging", {t: accuracy(t, dict.fromkeys(tasks, 1 / len(tasks))) for t in tasks})
    sweep = {}
    for scale in [round(0.05 * i, 2) for i in range(1, 21)]:
        acc = {t: accuracy(t, dict.fromkeys(tasks, scale)) for t in tasks}
        entropy = sum(prediction_entropy(logits(t, dict.fromkeys(tasks, scale))).mean().item() for t in tasks) / len(
            tasks
        )
        sweep[scale] = (sum(acc.values()) / len(acc), entropy)
        if scale == 0.3:
            record("task arithmetic (0.3)", acc)
    best = max(sweep, key=lambda s: sweep[s][0])
    lowest = min(sweep, key=lambda s: sweep[s][1])
    record(
        f"task arithmetic (best scale {best:g}, on test)",
        {t: accuracy(t, dict.fromkeys(tasks, best)) for t in tasks},
    )
    ties = {
        t: 100.0 * (heads[t](f0[(t, "test")] + 0.3 * jties[t]).argmax(-1) == labels[t]).float().mean().item()
        for t in tasks
    }
    record("TIES (0.3)", ties)
    # Task-wise AdaMerging in tangent space: entropy on the adaptation images, batches of 16 per task, Adam 1e-3.
    coefficients = torch.full((len(tasks),), 0.3, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(adamerging_steps):
        loss = 0.0
        for task in tasks:
            index = torch.randint(0, len(f0[(task, "adapt")]), (16,), generator=generator)
            z = f0[(task, "adapt")][index] + sum(
                coefficients[i] * jv[(task, "adapt", v)][index] for i, v in enumerate(tasks)
            )
            loss = loss + prediction_entropy(heads[task](z)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.clamp_(0, 1)
    learned = dict(zip(tasks, coefficients.detach().tolist()))
    record(
        "task-wise AdaMerging",
        {t: accuracy(t, learned) for t in tasks},
        coefficients=str({k: round(v, 3) for k, v in learned.items()}),
    )
    for size in (2, 3, 4, 6, 8):
        shares = []
        for subset in task_subsets(tasks, size, 4):
            acc = {t: accuracy(t, dict.fromkeys(subset, 0.3)) for t in subset}
            shares.append(kept(acc))
        rows.append(
            {"recipe": name, "method": f"kept share, {size} tasks (0.3)", "kept_share": sum(shares) / len(shares)}
        )
    print(
        f"{name}: accuracy peaks at scale {best:g} ({sweep[best][0]:.1f}), entropy is lowest at {lowest:g} ({sweep[lowest][0]:.1f})",
        flush=True,
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--lr-scale", type=number_list(float, 0), default=(1.0,))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--adamerging-steps", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    preset = get_preset(args.preset)
    zoo = build_zoo(preset, device="cpu", progress=False)
    folder = ROOT / "_build" / "kept-share" / zoo.directory.name
    tasks = list(zoo.tasks)
    base = load_encoder(preset.encoder, zoo.pretrained).eval()
    f0 = {(t, s): outputs(base, zoo.suite[t], s) for t in tasks for s in SPLITS}
    rows = []
    for lr_scale in args.lr_scale:
        rows += probe(f"tangent-lr{lr_scale:g}-s{args.steps}", zoo, base, f0, folder, args.adamerging_steps)
    table = pd.DataFrame(rows)
    table.to_csv(folder / "tangent-probe.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.drop(columns=[c for c in ("coefficients",) if c in table]).round(3).to_string(index=False))
    print(table.loc[table["method"] == "task-wise AdaMerging", ["recipe", "coefficients"]].to_string(index=False))


if __name__ == "__main__":
    sys.exit(run_script(main))
