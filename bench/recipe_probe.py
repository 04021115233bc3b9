"""Try a zoo recipe cheaply: pretrain, fit heads, fine-tune eight experts and measure how they merge.

    python bench/recipe_probe.py --name plus12 --pretrained-from PRETRAINED --continue-epochs 12 [--sam-rho 0.05]
        [--merges main|m1,m2] [--mlp-ratio 8] [--probe-shots 2] [--pretrain-domains 1000] [--pretrain-lr 3e-3]

Builds a variant of the ``mini`` recipe outside the zoo cache (``_build/recipe-probe/<name>/``; a rerun reuses
what is there), then prints the pretrained model's, the experts' and the merges' accuracies over all tasks:
weight averaging, task arithmetic at several scales (with the kept share of the experts' gain), and the kept
share against the number of tasks merged (:func:`surgery_lib.disentanglement.kept_share_curve`). Nothing here
changes the committed zoo or its hash; a recipe that works becomes a preset field afterwards.

``--pretrain-domains N`` adds N training images of every task to the pretraining mix, labelled only by the task
they come from (one extra class per task, never the task's own labels): CLIP has seen every domain it is later
fine-tuned on, without the downstream labels, and this gives the encoder features that tell the domains apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery_lib.core.errors import OneLineArgumentParser, number_list, positive_int, run_script  # noqa: E402
from surgery_lib.core.storage import load_tensors, save_tensors, write_json  # noqa: E402
from surgery_lib.core.taskdata import TaskData  # noqa: E402
from surgery_lib.disentanglement import kept_share_curve, summarize_curve  # noqa: E402
from surgery_lib.evaluation import accuracy_from_features, task_accuracy  # noqa: E402
from surgery_lib.merging import MAIN_TABLE, MergeOptions, evaluate_merge, merge  # noqa: E402
from surgery_lib.merging.vectors import add_vectors, task_vectors  # noqa: E402
from surgery_lib.models import StateDict, build_encoder, clone_state, load_encoder, task_features  # noqa: E402
from surgery_lib.presets import get_preset  # noqa: E402
from surgery_lib.settings.base import Zoo  # noqa: E402
from surgery_lib.settings.offline.suite import load_suite  # noqa: E402
from surgery_lib.settings.offline.training import (  # noqa: E402
    _batches,
    derive_seed,
    finetune,
    fit_probe,
    pretrain,
    random_translate,
    warmup_cosine,
)


def finetune_sam(encoder, data: TaskData, head, *, recipe, seed: int, rho: float) -> dict:
    """An expert fine-tuned with sharpness-aware minimisation (Foret et al., 2021), the remedy for merging
    interference of Lee et al. (ICLR 2025): each AdamW step takes the gradient at the worst point of a
    ``rho``-ball around the weights. Same data order, schedule and augmentation as ``finetune``, but in fp32
    (``finetune`` trains under bf16 autocast), so a SAM row also differs from the others by that."""
    torch.manual_seed(seed)
    encoder.train()
    head.requires_grad_(False).eval()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.expert_lr, weight_decay=recipe.expert_weight_decay)
    schedule = warmup_cosine(optimizer, recipe.expert_steps, int(recipe.expert_warmup_fraction * recipe.expert_steps))
    generator = torch.Generator().manual_seed(seed)
    stream = _batches(data, "train", recipe.batch_size, derive_seed(seed, data.name))
    for _ in range(recipe.expert_steps):
        images, labels = next(stream)
        images = random_translate(images, recipe.translate_px, generator)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(encoder(images)), labels).backward()
        grads = [p.grad.clone() for p in params]
        scale = rho / (torch.sqrt(sum((g**2).sum() for g in grads)) + 1e-12)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=scale.item())
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(encoder(images)), labels).backward()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=scale.item())
        optimizer.step()
        schedule.step()
    encoder.eval()
    return clone_state(encoder)


def domain_mix(mix: TaskData, tasks: dict[str, TaskData], per_task: int, seed: int) -> TaskData:
    """``mix`` plus ``per_task`` training images of every task, labelled by task (classes after the mix's)."""
    if per_task <= 0:
        return mix
    generator = torch.Generator().manual_seed(seed)
    images, labels = [mix.images["train"]], [mix.labels["train"]]
    for offset, task in enumerate(tasks.values()):
        index = torch.randperm(len(task.labels["train"]), generator=generator)[:per_task]
        images.append(task.images["train"][index])
        labels.append(torch.full((len(index),), mix.num_classes + offset, dtype=mix.labels["train"].dtype))
    names = mix.class_names + tuple(f"domain:{t}" for t in tasks)
    return dataclasses.replace(
        mix, class_names=names, images={"train": torch.cat(images)}, labels={"train": torch.cat(labels)}
    )


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--pretrain-domains", type=int, default=0)
    parser.add_argument(
        "--pretrained-from", default=None, help="a pretrained.safetensors to start from (skips pretraining)"
    )
    parser.add_argument(
        "--continue-epochs", type=int, default=0, help="pretrain --pretrained-from this many more epochs first"
    )
    parser.add_argument("--continue-lr", type=float, default=5e-4)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--pretrain-lr", type=float, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--mlp-ratio", type=float, default=None)
    parser.add_argument("--output-dim", type=int, default=None)
    parser.add_argument("--expert-steps", type=int, default=None)
    parser.add_argument("--expert-lr", type=float, default=None)
    parser.add_argument("--probe-shots", type=int, default=None)
    parser.add_argument("--finetune", default="full")
    parser.add_argument("--sam-rho", type=float, default=0.0, help="fine-tune experts with SAM at this radius")
    parser.add_argument("--scales", type=number_list(float), default=(0.1, 0.2, 0.3, 0.4, 0.5))
    parser.add_argument("--sizes", type=number_list(int, 1), default=(2, 4, 8))
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--merges", default="", help="also run these registered merges (comma-separated, or 'main')")
    parser.add_argument("--adamerging-steps", type=int, default=None, help="AdaMerging steps (default: the preset's)")
    parser.add_argument("--skip-curve", action="store_true", help="skip the scale sweep and the kept-share curve")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = get_preset("mini")
    encoder_changes = {
        k: v
        for k, v in {
            "width": args.width,
            "layers": args.layers,
            "mlp_ratio": args.mlp_ratio,
            "output_dim": args.output_dim,
        }.items()
        if v is not None
    }
    recipe_changes = {
        k: v
        for k, v in {
            "pretrain_epochs": args.pretrain_epochs,
            "pretrain_lr": args.pretrain_lr,
            "expert_steps": args.expert_steps,
            "expert_lr": args.expert_lr,
            "probe_shots": args.probe_shots,
        }.items()
        if v is not None
    }
    encoder_cfg = dataclasses.replace(preset.encoder, **encoder_changes)
    recipe = dataclasses.replace(preset.recipe, **recipe_changes)
    out = ROOT / "_build" / "recipe-probe" / args.name
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    suite = load_suite(preset)
    tasks = {t: suite[t] for t in suite.task_names}
    timings: dict[str, float] = {}

    def pretrain_for(encoder, epochs: int, lr: float, seed: int) -> StateDict:
        torch.manual_seed(seed)
        pretrain(
            encoder,
            domain_mix(suite.mix, tasks, args.pretrain_domains, seed),
            epochs=epochs,
            lr=lr,
            weight_decay=recipe.pretrain_weight_decay,
            warmup_steps=recipe.pretrain_warmup_steps,
            batch_size=recipe.batch_size,
            translate_px=recipe.translate_px,
            seed=seed,
            device=device,
        )
        return clone_state(encoder)

    started = time.perf_counter()
    pretrained_path = out / "pretrained.safetensors"
    if args.pretrained_from and not pretrained_path.exists():
        start = load_tensors(Path(args.pretrained_from))[0]
        if args.continue_epochs:
            seed = derive_seed(recipe.seed, "pretrained", "continued")
            start = pretrain_for(load_encoder(encoder_cfg, start), args.continue_epochs, args.continue_lr, seed)
        save_tensors(start, pretrained_path)
    if pretrained_path.exists():
        pretrained = load_tensors(pretrained_path)[0]
    else:
        seed = derive_seed(recipe.seed, "pretrained")
        torch.manual_seed(seed)  # the encoder's initialisation, as the zoo seeds it
        pretrained = pretrain_for(build_encoder(encoder_cfg), recipe.pretrain_epochs, recipe.pretrain_lr, seed)
        save_tensors(pretrained, pretrained_path)
    timings["pretraining"] = time.perf_counter() - started

    started = time.perf_counter()
    pretrained_encoder = load_encoder(encoder_cfg, pretrained)
    heads = {}
    for task, data in tasks.items():
        seed = derive_seed(derive_seed(recipe.seed, "heads"), task)
        shots = data.few_shot("train", recipe.probe_shots, seed)
        features = task_features(pretrained_encoder, data, "train", index=shots, device=device)[0]
        heads[task] = fit_probe(
            features,
            data.labels["train"][shots],
            data.num_classes,
            steps=recipe.probe_steps,
            lr=recipe.probe_lr,
            weight_decay=recipe.probe_weight_decay,
            seed=seed,
        )
    timings["heads"] = time.perf_counter() - started

    started = time.perf_counter()
    experts = {}
    for task, data in tasks.items():
        mode = f"sam{args.sam_rho:g}" if args.sam_rho else args.finetune
        path = out / f"expert-{mode}-{recipe.expert_steps}-{recipe.expert_lr:g}-{task}.safetensors"
        if path.exists():
            experts[task] = load_tensors(path)[0]
            continue
        if args.sam_rho:
            experts[task] = finetune_sam(
                load_encoder(encoder_cfg, pretrained),
                data,
                heads[task],
                recipe=recipe,
                seed=derive_seed(recipe.seed, "expert", task),
                rho=args.sam_rho,
            )
            save_tensors(experts[task], path)
            continue
        _, experts[task] = finetune(
            load_encoder(encoder_cfg, pretrained),
            [(data, heads[task])],
            steps=recipe.expert_steps,
            batch_per_task=recipe.batch_size,
            lr=recipe.expert_lr,
            weight_decay=recipe.expert_weight_decay,
            warmup_fraction=recipe.expert_warmup_fraction,
            translate_px=recipe.translate_px,
            seed=derive_seed(recipe.seed, "expert", task),
            device=device,
            desc=f"expert {task}",
            mode=args.finetune,
        )
        save_tensors(experts[task], path)
    timings["experts"] = time.perf_counter() - started

    def accuracies(state) -> dict[str, float]:
        encoder = load_encoder(encoder_cfg, state)
        return {t: task_accuracy(encoder, heads[t], tasks[t], device=device) for t in tasks}

    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    pre = {
        t: accuracy_from_features(
            task_features(pretrained_encoder, d, "test", device=device)[0], heads[t], d.labels["test"]
        )
        for t, d in tasks.items()
    }
    expert = {t: task_accuracy(load_encoder(encoder_cfg, experts[t]), heads[t], tasks[t], device=device) for t in tasks}
    rows = {"pretrained": mean(pre), "experts": mean(expert)}
    if args.merges:
        variant = dataclasses.replace(preset, encoder=encoder_cfg, recipe=recipe)
        manifest = {"accuracy": {"pretrained": pre, "experts": expert}}
        zoo = Zoo(variant, out, manifest, pretrained, heads, experts, None, suite)
        names = MAIN_TABLE if args.merges == "main" else args.merges.split(",")
        for method in names:
            options = MergeOptions(steps=args.adamerging_steps)
            result = merge(zoo, method, options, device="cpu", progress=False)
            rows[method] = mean(evaluate_merge(zoo, result, "cpu"))
            gain = rows["experts"] - rows["pretrained"]
            print(f"{method:24s} {rows[method]:6.2f}   kept share {(rows[method] - rows['pretrained']) / gain:+.2f}")
    if args.skip_curve:
        write_json(rows, out / f"merges-{len(rows) - 2}-{args.adamerging_steps}.json")
        return
    vectors = task_vectors(pretrained, experts)
    average = add_vectors(pretrained, list(vectors.values()), [1 / len(vectors)] * len(vectors))
    rows["weight averaging"] = mean(accuracies(average))
    for scale in args.scales:
        merged = add_vectors(pretrained, list(vectors.values()), [scale] * len(vectors))
        rows[f"task arithmetic {scale:g}"] = mean(accuracies(merged))
    gain = rows["experts"] - rows["pretrained"]
    print(f"\n== {args.name}: {json.dumps({k: round(v, 1) for k, v in timings.items()})} s")
    for key, value in rows.items():
        share = (value - rows["pretrained"]) / gain if gain else float("nan")
        print(f"{key:24s} {value:6.2f}   kept share {share:+.2f}")
    curve = kept_share_curve(
        pretrained,
        experts,
        heads,
        tasks,
        lambda s: load_encoder(encoder_cfg, s),
        sizes=list(args.sizes),
        subsets=args.subsets,
        scale=0.3,
    )
    print(summarize_curve(curve).round(3).to_string())
    write_json(
        {"args": vars(args), "timings": timings, "rows": rows, "per_task": {"pre": pre, "expert": expert}},
        out / "result.json",
    )


if __name__ == "__main__":
    sys.exit(run_script(main))
