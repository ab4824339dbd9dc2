"""The merge stage: `run(models, output, config, runtime)` checks, (searches,) gates and writes.

Order: options, outputs and every input's config, headers and tokenizer are checked before a
weight is read; with a fitness (--tasks or --heldout) each input and the merge are scored in
one resident model, --evolve searches the recipe, and the merge must beat the best single
input (GateFailed, exit 3, nothing written unless --force); then the merged tensors stream
into the output one name at a time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack import console
from orstack.errors import BadInput
from orstack.merge.config import MergeConfig, Recipe
from orstack.merge.engine import Plan, adapter_factors, adapter_rank, build_plan, full_weights
from orstack.merge.sources import ADAPTER_PREFIX, TOKENIZER_FILES

if TYPE_CHECKING:
    from orstack.runtime import Runtime

WEIGHTS_FILE = "model.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class MergeResult:
    output: Path
    kind: str  # "checkpoint" or "adapter"
    metrics: dict[str, Any]
    recipe: dict[str, Any]  # the numbers applied (the evolved ones with --evolve)
    scores: dict[str, float] = field(default_factory=dict)  # fitness of each input and of the merge
    gate_failure: str | None = None  # set only when written with force


def run(models: list[str], output: str | Path, config: MergeConfig, runtime: Runtime,
        report: Callable[[dict[str, Any]], None] | None = None) -> MergeResult:
    """Merge `models` into `output` as `config` says. `report(scores)` is called once the inputs
    and the merge are scored (with a fitness), before the gate decides."""
    from orstack.io.jsonl import check_input_file
    from orstack.io.output import Output, check_outputs

    started = time.perf_counter()
    config = replace(config, models=[str(m) for m in models])
    config.check()
    inputs = [*config.models, config.base, config.tasks, *(config.heldout or [])]
    check_outputs([Output(output, "dir"), Output(config.log, "file", "--log")], inputs)
    output = Path(output)
    tasks = texts = None
    if config.tasks is not None:
        from orstack.tasks.contract import load_tasks

        check_input_file(config.tasks, "--tasks")
        tasks = list(load_tasks(config.tasks))
    if config.heldout:
        from orstack.io.text import check_text_files, read_texts

        check_text_files(config.heldout, "--heldout")
        texts = list(read_texts(config.heldout))
    plan = build_plan(config)
    device = runtime.torch_device() if tasks is not None or texts is not None else "cpu"
    runtime.apply_threads()

    recipe = config.recipe(plan.n_layers)
    if config.evolve and recipe.method == "slerp" and len(recipe.t) == 1:
        recipe = replace(recipe, t=recipe.t * plan.n_layers)  # search one factor per decoder layer
    scores: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    gate_failure = None
    if tasks is not None or texts is not None:
        recipe, scores, metrics = _score_and_search(plan, config, recipe, tasks, texts, device)
        if report is not None:
            report(scores)
        verdict = _gate(scores, config)
        metrics["gate"] = verdict.record()
        gate_failure = verdict.message() if verdict.forced else None
    kind, extra = _write(plan, config, recipe, output, metrics, started)
    from orstack.merge.evolve import describe

    return MergeResult(output, kind, extra, describe(recipe), scores, gate_failure)


# "Beat" is strict: a merge that only ties its best input is not worth a new checkpoint. Fitness
# values are accuracies (multiples of 1/tasks) or perplexities, so any real gain clears this.
MIN_GAIN = 1e-9


def _gate(scores: dict[str, float], config: MergeConfig) -> Any:  # noqa: ANN401 - orstack.gates.Verdict
    """The merge's fitness against the best single input's; GateTripped (exit 3) unless it is higher."""
    from orstack.gates import Gate, decide

    best_name, best_single = max(((k, v) for k, v in scores.items() if k != "merge"), key=lambda kv: kv[1])
    gate = Gate("fitness_gain_over_best_input", MIN_GAIN, "min", "the merge gate (beat every input)")
    check = gate.check(scores["merge"] - best_single, before=best_single, after=scores["merge"], on=best_name)
    return decide("merge", [check], config.force)


def _score_and_search(plan: Plan, config: MergeConfig, recipe: Recipe, tasks: list[dict] | None,
                      texts: list[str] | None, device: str) -> tuple[Recipe, dict[str, float], dict[str, Any]]:
    from orstack.io.jsonl import write_jsonl
    from orstack.merge.evolve import describe, evolve

    fitness = Fitness(plan, tasks, texts, config, device)
    scores: dict[str, float] = {}
    n = len(plan.inputs)
    for i, label in enumerate(plan.parents()):
        single = replace(recipe, method="linear", weights=[1.0 if j == i else 0.0 for j in range(n)])
        scores[label] = fitness(single)
    if plan.base is not None:  # the base is an input too: a merge no better than it is no merge
        base_label = config.base or f"{plan.base.label} (base)"
        scores.setdefault(base_label, fitness(replace(recipe, method="task-arithmetic", lam=0.0)))
    metrics: dict[str, Any] = {"fitness": fitness.kind, "inputs_fitness": dict(scores)}
    if config.evolve:
        rows: list[dict[str, Any]] = []
        best, seen = evolve(recipe, fitness, generations=config.generations, population=config.population,
                            sigma=config.sigma, seed=config.seed, log=rows.append)
        if config.log is not None:
            write_jsonl(rows, config.log)
        metrics["evolve"] = {"candidates": len(seen), "fixed_recipe_fitness": seen[0].fitness,
                             "best_fitness": best.fitness, "best_generation": best.generation,
                             "start": describe(recipe)}
        recipe = best.recipe
        scores["merge"] = best.fitness
    else:
        scores["merge"] = fitness(recipe)
    metrics["merge_fitness"] = scores["merge"]
    return recipe, scores, metrics


class Fitness:
    """Scores a recipe: merges it into one resident model (loaded once) and runs bench's
    verifiers on the tasks (mean score), or the negative perplexity on held-out text."""

    def __init__(self, plan: Plan, tasks: list[dict] | None, texts: list[str] | None, config: MergeConfig,
                 device: str) -> None:
        from orstack.io.checkpoint import load_model, load_tokenizer

        self.plan, self.tasks, self.texts, self.config = plan, tasks, texts, config
        self.kind = "tasks accuracy" if tasks is not None else "negative perplexity"
        self.model, _ = load_model(str(plan.template.path), device=device, with_tokenizer=False)
        self.tokenizer = load_tokenizer(str(plan.tokenizer))
        self.params = self.model.state_dict()
        unknown = [n for n in plan.names if n not in self.params]
        if unknown:
            raise BadInput(f"{plan.template.label}: tensor '{unknown[0]}' is not a parameter of the loaded "
                           f"{type(self.model).__name__}; it cannot be scored in memory")

    def __call__(self, recipe: Recipe) -> float:
        import torch

        with torch.no_grad():
            for name, tensor in full_weights(self.plan, recipe):
                self.params[name].copy_(tensor)
        if self.tasks is not None:
            from orstack.gates import measure_tasks

            return measure_tasks(self.model, self.tokenizer, self.tasks, max_new_tokens=self.config.max_new_tokens,
                                 name="merge candidate", source="--tasks").accuracy
        from orstack.backends.perplexity import perplexity

        return -perplexity(self.model, self.tokenizer, self.texts, max_length=self.config.max_length).ppl


def _write(plan: Plan, config: MergeConfig, recipe: Recipe, output: Path, metrics: dict[str, Any],
           started: float) -> tuple[str, dict[str, Any]]:
    from orstack.io.atomic import atomic_path
    from orstack.io.manifest import build_manifest, read_manifest, write_manifest
    from orstack.merge.evolve import describe

    final = config.with_recipe(recipe) if config.evolve else config
    with atomic_path(output, directory=True) as tmp:
        if plan.adapters is None:
            kind = "checkpoint"
            metrics["bytes"] = _write_checkpoint(plan, config, recipe, tmp)
        else:
            kind = "adapter"
            metrics.update(_write_adapter(plan, config, recipe, tmp))
        _copy_tokenizer(plan.tokenizer, tmp)
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        parents = plan.parents() + ([config.base] if config.base is not None else [])
        extra: dict[str, Any] = {"parents": _parent_entries(parents), "recipe": {**describe(recipe),
                                 "args": _args(final)}}
        if kind == "adapter":
            assert plan.base is not None
            extra.update({"base": str(plan.base.path), "weights_format": "lora-adapter"})
        manifest = build_manifest("merge", config, parent=plan.parents()[0], metrics=metrics, extra=extra)
        manifest["lineage"] = _lineage(parents, read_manifest)
        write_manifest(tmp, manifest)
    return kind, metrics


def _args(config: MergeConfig) -> dict[str, Any]:
    from orstack.io.manifest import as_args

    return as_args(config)


def _write_checkpoint(plan: Plan, config: MergeConfig, recipe: Recipe, tmp: Path) -> int:
    import json

    from orstack.merge.writer import write_streamed

    specs = []
    for name, info in plan.template.tensors.items():
        dtype = info.dtype if config.dtype is None or info.dtype not in ("F32", "F16", "BF16") else \
            {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[config.dtype]
        specs.append((name, dtype, info.shape))
    with console.progress() as bar:
        job = bar.add_task("merge", total=len(specs), unit="tensors")

        def stream():  # noqa: ANN202
            for item in full_weights(plan, recipe, config.dtype):
                yield item
                bar.advance(job)

        size = write_streamed(tmp / WEIGHTS_FILE, specs, stream())
    model_config = dict(plan.template.config)
    if config.dtype is not None:
        model_config["dtype"] = config.dtype
        model_config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
    generation = plan.template.path / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, tmp / generation.name)
    return size


def _write_adapter(plan: Plan, config: MergeConfig, recipe: Recipe, tmp: Path) -> dict[str, Any]:
    import json

    from orstack.merge.writer import write_streamed

    assert plan.adapters is not None and plan.base is not None
    rank = adapter_rank(plan, config)
    specs, factors, errors = [], [], []
    for weight, a, b, error in adapter_factors(plan, recipe, rank):
        module = ADAPTER_PREFIX + weight.removesuffix(".weight")
        # Adapters are small (rank x width per module): the factors are kept until written.
        factors += [(f"{module}.lora_A.weight", a.contiguous()), (f"{module}.lora_B.weight", b.contiguous())]
        errors.append(error)
    factors.sort(key=lambda item: item[0])
    specs = [(name, "F32", list(t.shape)) for name, t in factors]
    size = write_streamed(tmp / ADAPTER_WEIGHTS_FILE, specs, iter(factors))
    first = plan.adapters[0].config
    targets = {a.config.get("target_modules") if not isinstance(a.config.get("target_modules"), list)
               else tuple(sorted(a.config["target_modules"])) for a in plan.adapters}
    target_modules = first.get("target_modules") if len(targets) == 1 else sorted(
        {w.removesuffix(".weight").rsplit(".", 1)[-1] for w in plan.adapted})
    adapter_config = {**first, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": target_modules,
                      "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(plan.base.path)}
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return {"bytes": size, "rank": rank, "svd_relative_error_max": round(max(errors, default=0.0), 6),
            "exact": all(e == 0.0 for e in errors) and recipe.method in ("linear", "task-arithmetic")}


def _copy_tokenizer(directory: Path, tmp: Path) -> None:
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, tmp / name)


def _parent_entries(parents: list[str]) -> list[dict[str, Any]]:
    from orstack.io.manifest import weights_digest

    return [{"path": p, "sha256": weights_digest(p)} for p in parents]


def _lineage(parents: list[str], read_manifest: Callable) -> list[dict[str, Any]]:
    """Every parent's history, then every parent: the whole tree a merge came from, each model once."""
    lineage: list[dict[str, Any]] = []
    seen: set[tuple] = set()

    def add(entry: dict[str, Any]) -> None:
        key = (entry.get("stage"), entry.get("path"))
        if key not in seen:
            seen.add(key)
            lineage.append(entry)

    for parent in parents:
        manifest = read_manifest(parent) or {}
        for entry in manifest.get("lineage", []):
            add(entry)
        add({"stage": manifest.get("stage"), "path": str(parent), "args": manifest.get("args", {}),
             "metrics": manifest.get("metrics", {})})
    return lineage
