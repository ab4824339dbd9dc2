"""Validation during training: every --eval-every steps the model is measured on held-out data,
the best weights are kept (--save-best) and training stops after --early-stop validations
without improvement.

An --eval file is either tasks (rows with an `answer`, `tests` or `choices`: greedy accuracy by
bench's verifiers, plus the loss of the reference answers given the prompts) or training rows
(`prompt`/`response`, `text`, conversations: their response-token loss). Several files, each
`FILE[:WEIGHT]`, give one score, their weighted mean — e.g. 70% specialised and 30% general
tasks, as the recipe orstack follows selects checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orstack.errors import BadInput

TASK_FIELDS = ("answer", "tests", "choices")
ROW_FIELDS = ("response", "completion", "text")


def parse_weighted(specs: tuple[str, ...] | list[str], flag: str) -> list[tuple[str, float]]:
    """FILE[:WEIGHT] specs as (file, weight); a colon followed by a path is part of the name."""
    pairs = []
    for spec in specs:
        path, sep, weight = spec.rpartition(":")
        if not sep or not path or "/" in weight:
            path, weight = spec, "1"
        try:
            w = float(weight)
        except ValueError:
            raise BadInput(f"{flag} {spec}: weight {weight!r} is not a number (FILE[:WEIGHT])") from None
        if not w > 0:
            raise BadInput(f"{flag} {spec}: weight must be > 0")
        if not Path(path).is_file():
            raise BadInput(f"{flag} {path}: no such file")
        pairs.append((path, w))
    return pairs


def is_task_row(row: dict[str, Any]) -> bool:
    if any(k in row for k in ROW_FIELDS):
        return False
    if isinstance(row.get("messages"), list) and any(m.get("role") == "assistant" for m in row["messages"]
                                                     if isinstance(m, dict)):
        return False
    return any(k in row for k in TASK_FIELDS)


@dataclass
class EvalSet:
    path: str
    weight: float
    tasks: list[dict[str, Any]] | None  # task files
    rows: list[dict[str, Any]] | None  # training-row files


def read_eval_sets(specs: tuple[str, ...] | list[str]) -> list[EvalSet]:
    """Every --eval file read and checked (file:line errors) before any model loads."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered
    from orstack.tasks.contract import load_tasks
    from orstack.train.data import read_examples

    sets = []
    for path, weight in parse_weighted(specs, "--eval"):
        first = next(iter(read_jsonl_numbered(path)), None)
        if first is None:
            raise BadInput(f"--eval {display_name(path)}: no rows")
        if is_task_row(first[1]):
            sets.append(EvalSet(path, weight, list(load_tasks(path)), None))
        else:
            sets.append(EvalSet(path, weight, None, read_examples(path)))
    return sets


@dataclass
class Check:
    step: int
    figures: dict[str, float]  # per file and the weighted score(s)
    improved: bool


@dataclass
class Validator:
    """Measures a model in training on the --eval sets and keeps the best weights."""

    sets: list[EvalSet]
    tokenizer: Any
    metric: str  # what "better" means: accuracy (higher) or loss (lower)
    patience: int = 0
    keep_best: bool = False
    max_length: int = 512
    chat_template: str | None = None
    max_new_tokens: int = 32
    checks: list[Check] = field(default_factory=list)
    best: Check | None = None
    _best_state: dict[str, Any] | None = None
    _encoded: dict[int, list[Any]] = field(default_factory=dict)
    _since_best: int = 0

    def measure(self, model: Any) -> dict[str, float]:
        """Accuracy (task files) and loss (every file) per file, and their weighted means."""
        figures: dict[str, float] = {}
        totals = {"accuracy": [0.0, 0.0], "loss": [0.0, 0.0]}
        was_training = model.training
        model.eval()
        try:
            for n, s in enumerate(self.sets):
                name = Path(s.path).stem
                loss = self._loss(model, n, s)
                figures[f"{name}/loss"] = loss
                totals["loss"][0] += s.weight * loss
                totals["loss"][1] += s.weight
                if s.tasks is not None:
                    acc = self._accuracy(model, s.tasks)
                    figures[f"{name}/accuracy"] = acc
                    totals["accuracy"][0] += s.weight * acc
                    totals["accuracy"][1] += s.weight
        finally:
            model.train(was_training)
        for key, (num, den) in totals.items():
            if den:
                figures[key] = num / den
        return figures

    def check(self, step: int, model: Any) -> bool:
        """Validate at `step`; returns True when training should stop (patience used up)."""
        figures = self.measure(model)
        value = figures[self.metric]
        improved = self.best is None or (value > self.best.figures[self.metric] if self.metric == "accuracy"
                                         else value < self.best.figures[self.metric])
        record = Check(step, {k: round(v, 6) for k, v in figures.items()}, improved)
        self.checks.append(record)
        if improved:
            self.best, self._since_best = record, 0
            if self.keep_best:
                self._best_state = {k: p.detach().to("cpu", copy=True) for k, p in _trainable(model)}
        else:
            self._since_best += 1
        return bool(self.patience) and self._since_best >= self.patience

    def restore_best(self, model: Any) -> None:
        """Put the best validation's weights back (with --save-best)."""
        import torch

        if self._best_state is None:
            return
        with torch.no_grad():
            for name, p in _trainable(model):
                p.copy_(self._best_state[name].to(p.device))

    def summary(self) -> dict[str, Any]:
        if not self.checks:
            return {}
        last = self.checks[-1]
        out: dict[str, Any] = {"eval_metric": self.metric, "eval_checks": len(self.checks),
                               "eval_best_step": self.best.step if self.best else None,
                               f"eval_best_{self.metric}": self.best.figures[self.metric] if self.best else None,
                               "eval_last_step": last.step, f"eval_last_{self.metric}": last.figures[self.metric],
                               "eval_history": [{"step": c.step, **c.figures} for c in self.checks]}
        if self.keep_best:
            out["selected_step"] = self.best.step if self.best else last.step
        return out

    def _loss(self, model: Any, n: int, s: EvalSet) -> float:
        from orstack.train.data import encode_rows
        from orstack.train.sft import example_losses

        if n not in self._encoded:
            rows = s.rows if s.rows is not None else [answer_row(t) for t in s.tasks or []]
            self._encoded[n] = encode_rows(self.tokenizer, rows, self.max_length, s.path,
                                           chat_template=self.chat_template)
        losses = example_losses(model, self.tokenizer, self._encoded[n])
        return sum(losses) / len(losses)

    def _accuracy(self, model: Any, tasks: list[dict[str, Any]]) -> float:
        from orstack.backends.hf import HFBackend
        from orstack.tasks.results import run_tasks

        backend = HFBackend.from_model(model, self.tokenizer, name="validation", chat_template=self.chat_template)
        rows = run_tasks(backend, tasks, max_new_tokens=self.max_new_tokens)
        scored = [r["correct"] for r in rows if r.get("correct") is not None]
        return sum(scored) / len(scored) if scored else 0.0


def answer_row(task: dict[str, Any]) -> dict[str, Any]:
    """A task as a training row whose response is its reference answer (for the validation loss)."""
    answer = task.get("answer")
    if task.get("kind") == "choice" and isinstance(answer, int) and task.get("choices"):
        answer = task["choices"][answer]
    response = "" if answer is None else str(answer)
    if task.get("messages") is not None:
        return {"messages": [*task["messages"], {"role": "assistant", "content": response}]}
    return {"prompt": task["prompt"], "response": response}


def _trainable(model: Any) -> list[tuple[str, Any]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def make_validator(config: Any, tokenizer: Any, chat_template: str | None = None,
                   sets: list[EvalSet] | None = None) -> Validator | None:
    """The validator a TrainConfig asks for (None without --eval); the metric is --save-best's,
    else accuracy when every file has tasks, else loss."""
    if not config.eval_data:
        return None
    sets = sets if sets is not None else read_eval_sets(config.eval_data)
    all_tasks = all(s.tasks is not None for s in sets)
    metric = config.save_best or ("accuracy" if all_tasks else "loss")
    if metric == "accuracy" and not all_tasks:
        rows = next(s.path for s in sets if s.tasks is None)
        raise BadInput(f"--save-best accuracy: --eval {rows} has training rows, not tasks with answers; use "
                       "--save-best loss or task files")
    return Validator(sets, tokenizer, metric, patience=config.early_stop, keep_best=config.save_best is not None,
                     max_length=config.max_length, chat_template=chat_template)
