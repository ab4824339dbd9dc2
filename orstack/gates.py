"""Quality gates: every stage that changes a model compares it with its parent on held-out data
and refuses the output (exit 3, nothing written) when it falls outside the gate, unless --force.

The shape, shared by every stage:
- a `Gate` names one measure, its limit and direction, the option that sets it and where the
  default comes from (README, "Gates");
- a stage measures parent and child (perplexity on --heldout, accuracy on --eval tasks, or its
  own measure, e.g. gguf's greedy agreement), turns each into a `Check` with `Gate.check`;
- `decide(stage, checks, force)` returns the `Verdict` and raises `GateTripped` (a GateFailed:
  exit 3) unless it passed or `force` is set. The stage calls it while its output is still a
  temporary sibling (orstack/io/atomic.py), so a trip leaves nothing behind;
- `Verdict.record()` goes into the manifest under "gate": every gate, its measurement and the
  verdict, and `forced: true` when --force wrote an output that failed.

The measurements shared by several stages live here too: perplexity retention
(`ppl_checks`) and task accuracy of a model in memory (`measure_tasks`, `accuracy_checks`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.errors import GateFailed

if TYPE_CHECKING:
    from orstack.backends.perplexity import PerplexityResult

# The defaults and their origins (the seeds of issue 16; README "Gates" quotes this table).
MIN_RETENTION = 0.97  # prune, awq: keep >= 97% of the parent's quality (the seed's AWQ gate)
VOCAB_TRIM_MAX_PPL_RISE = 0.03  # the seed's vocab-trim rollback at +3% perplexity
MAX_ACCURACY_DROP = 2.0  # distill train, rl: general accuracy may fall at most 2 points (the seed)
MAX_CLUSTER_DROP = 0.0  # distill train: the targeted clusters must not get worse


@dataclass(frozen=True)
class Gate:
    """One limit on one measure. `direction` "max": the value must be <= limit; "min": >= limit."""

    measure: str  # e.g. "ppl_rise", "accuracy_retention", "agreement"
    limit: float
    direction: str
    option: str  # the flag that sets the limit, for messages
    unit: str = ""  # "%" (a fraction shown as a percentage), "pts" (accuracy points) or ""

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise ValueError(f"gate direction {self.direction!r}: expected 'max' or 'min'")

    def check(self, value: float | None, *, before: float | None = None, after: float | None = None,
              on: str = "") -> Check:
        """The measured `value` against this gate (a non-finite value fails: a model that
        became NaN did not pass anything)."""
        ok = value is not None and math.isfinite(value) and (
            value <= self.limit if self.direction == "max" else value >= self.limit)
        return Check(self, value, bool(ok), before=before, after=after, on=on)

    def show(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:+.2%}" if self.measure.endswith(("rise", "rose", "change")) else f"{value:.2%}"
        if self.unit == "pts":
            return f"{value:+.2f} pts" if self.measure.endswith("change") else f"{value:.2f} pts"
        return f"{value:.4g}"


@dataclass
class Check:
    """One gate applied to one measurement."""

    gate: Gate
    value: float | None
    passed: bool
    before: float | None = None  # the parent's figure the value came from (shown, recorded)
    after: float | None = None
    on: str = ""  # what it was measured on (e.g. "heldout.txt", "tasks.jsonl")

    def describe(self) -> str:
        value = "not finite" if self.value is None or not math.isfinite(self.value) else self.gate.show(self.value)
        sign = "<=" if self.gate.direction == "max" else ">="
        figures = (f" ({_num(self.before)} -> {_num(self.after)})"
                   if self.before is not None and self.after is not None else "")
        return (f"{self.gate.measure} {value}{figures}, gate {sign} {self.gate.show(self.gate.limit)} "
                f"({self.gate.option})")

    def record(self) -> dict[str, Any]:
        return {"measure": self.gate.measure, "value": _finite(self.value), "limit": self.gate.limit,
                "direction": self.gate.direction, "option": self.gate.option, "before": _finite(self.before),
                "after": _finite(self.after), "on": self.on or None, "passed": self.passed}


@dataclass
class Verdict:
    """Every check one stage ran on its output, and what became of it."""

    stage: str
    checks: list[Check] = field(default_factory=list)
    forced: bool = False  # failed, and written anyway because of --force

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def message(self) -> str:
        failed = self.failures or self.checks
        return f"{self.stage}: quality gate failed: " + "; ".join(c.describe() for c in failed)

    def summary(self) -> str:
        """One line for a person: every check, passed or not."""
        if not self.checks:
            return f"{self.stage}: no quality gate measured (give held-out data: --heldout / --eval)"
        state = "passed" if self.passed else ("FAILED, written anyway (--force)" if self.forced else "FAILED")
        return f"{self.stage} gate {state}: " + "; ".join(c.describe() for c in self.checks)

    def record(self) -> dict[str, Any]:
        """The manifest's "gate" entry."""
        return {"passed": self.passed, "forced": self.forced, "measured": bool(self.checks),
                "checks": [c.record() for c in self.checks]}


class GateTripped(GateFailed):
    """A stage's output failed its quality gate; nothing was written. Exit 3."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        super().__init__(verdict.message() + "; nothing written (use --force to write anyway)")


def decide(stage: str, checks: Sequence[Check], force: bool = False) -> Verdict:
    """The verdict on `checks`; raises GateTripped when one failed and `force` is not set.
    Call it before the output is moved into place."""
    from orstack import console

    verdict = Verdict(stage, list(checks))
    if verdict.passed:
        if verdict.checks:
            console.info(verdict.summary())
        return verdict
    if not force:
        raise GateTripped(verdict)
    verdict.forced = True
    console.warn(verdict.message() + "; written anyway (--force), and marked so in the manifest")
    return verdict


def check_limits(**limits: float | None) -> None:
    """Gate options that make sense alone: BadInput naming the option otherwise. Keys are
    option names with '_' for '-' (min_retention -> --min-retention)."""
    from orstack.errors import BadInput

    for name, value in limits.items():
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if not math.isfinite(value) or value < 0:
            raise BadInput(f"{option} {value}: expected a finite number >= 0")
        if name in ("min_retention", "min_agreement") and value > 1:
            raise BadInput(f"{option} {value}: a fraction in [0, 1] (e.g. 0.97)")


# ---------------------------------------------------------------------------- perplexity


def ppl_rise_limit(max_ppl_rise: float | None, min_retention: float | None) -> float | None:
    """The perplexity limit of prune and awq: --max-ppl-rise when given, else the retention read
    on perplexity (keeping 97% of the parent's quality = ppl_parent / ppl_child >= 0.97)."""
    if max_ppl_rise is not None:
        return max_ppl_rise
    if min_retention is None or min_retention <= 0:
        return None
    return 1 / min_retention - 1


def ppl_check(before: float, after: float, limit: float, *, option: str = "--max-ppl-rise",
              on: str = "heldout") -> Check:
    """Perplexity rise of the child over the parent on the same text."""
    rise = after / before - 1 if before > 0 and math.isfinite(after) else math.inf
    return Gate("ppl_rise", limit, "max", option, "%").check(rise, before=before, after=after, on=on)


def ppl_in_parent_tokens(parent: PerplexityResult, child: PerplexityResult) -> tuple[float, float]:
    """(parent ppl, child ppl) per parent token: the child's total log-loss on the same text over
    the parent's token count, so that a tokenizer change (vocab-trim splits some words into more
    tokens) cannot lower the figure by spreading the same loss over more tokens. With an
    unchanged tokenization it is the plain perplexity."""
    n = max(parent.n_tokens, 1)
    return math.exp(parent.nll / n), math.exp(child.nll / n)


# ---------------------------------------------------------------------------- tasks


@dataclass
class TaskScore:
    """Accuracy of one model on the --eval tasks, overall and per cluster."""

    accuracy: float
    n: int
    by_cluster: dict[str, float] = field(default_factory=dict)
    cluster_sizes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "tasks": self.n, "by_cluster": self.by_cluster,
                "cluster_sizes": self.cluster_sizes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskScore:
        return cls(d["accuracy"], d["tasks"], dict(d.get("by_cluster", {})), dict(d.get("cluster_sizes", {})))


def load_eval_tasks(path: str) -> list[dict[str, Any]]:
    """The --eval tasks, checked before any model is loaded."""
    from orstack.tasks.contract import load_tasks

    return load_tasks(path)


def measure_tasks(model: Any, tokenizer: Any, tasks: Sequence[dict[str, Any]], *, max_new_tokens: int = 32,
                  batch_size: int = 16, name: str = "model", source: str = "--eval",
                  chat_template: str | None = None) -> TaskScore:
    """Greedy accuracy of `model` on `tasks` (the bench's scoring, orstack/tasks). A streamed
    model that fits in memory is held there for the measure (`resident_while`): generation runs
    the whole model once per token, which would otherwise read every layer again each time."""
    from contextlib import nullcontext

    import torch

    from orstack.backends.hf import HFBackend
    from orstack.layerwise import resident_while
    from orstack.tasks.results import fit_prompts, run_tasks

    was_training = getattr(model, "training", False)
    model.eval()
    backend = HFBackend.from_model(model, tokenizer, name=name, batch_size=batch_size, chat_template=chat_template)
    sandbox_cm = nullcontext()
    if any(t.get("kind") == "code" for t in tasks):
        from orstack.tasks.sandbox import Sandbox

        sandbox_cm = Sandbox()
    try:
        with sandbox_cm as sandbox, torch.no_grad(), resident_while(model):
            asked, _ = fit_prompts(backend, tasks, max_new_tokens=max_new_tokens, source=source)
            rows = run_tasks(backend, asked, max_new_tokens=max_new_tokens, batch_size=batch_size, sandbox=sandbox)
    finally:
        if was_training:
            model.train()
    scored = [r for r in rows if r.get("correct") is not None]
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in scored:
        if r.get("cluster") is not None:
            groups[str(r["cluster"])].append(bool(r["correct"]))
    accuracy = sum(bool(r["correct"]) for r in scored) / len(scored) if scored else 0.0
    return TaskScore(accuracy, len(scored), {k: sum(v) / len(v) for k, v in sorted(groups.items())},
                     {k: len(v) for k, v in sorted(groups.items())})


def retention_check(before: TaskScore, after: TaskScore, limit: float, *, option: str = "--min-retention",
                    on: str = "eval") -> Check:
    """Accuracy retention (child / parent); a parent at 0% retains everything the child keeps."""
    value = after.accuracy / before.accuracy if before.accuracy > 0 else 1.0
    return Gate("accuracy_retention", limit, "min", option, "%").check(value, before=before.accuracy,
                                                                      after=after.accuracy, on=on)


def accuracy_drop_check(before: TaskScore, after: TaskScore, limit: float, *, option: str = "--max-accuracy-drop",
                        on: str = "eval") -> Check:
    """Fall in accuracy from parent to child, in percentage points (a rise is a negative drop)."""
    drop = 100 * (before.accuracy - after.accuracy)
    return Gate("accuracy_drop", limit, "max", option, "pts").check(drop, before=before.accuracy,
                                                                   after=after.accuracy, on=on)


def cluster_checks(before: TaskScore, after: TaskScore, clusters: Sequence[str], limit: float, *,
                   option: str = "--max-cluster-drop", on: str = "eval") -> list[Check]:
    """Each targeted cluster present in the --eval tasks may fall at most `limit` points."""
    checks = []
    for cluster in sorted({str(c) for c in clusters} & set(before.by_cluster) & set(after.by_cluster)):
        drop = 100 * (before.by_cluster[cluster] - after.by_cluster[cluster])
        checks.append(Gate(f"cluster {cluster} accuracy_drop", limit, "max", option, "pts").check(
            drop, before=before.by_cluster[cluster], after=after.by_cluster[cluster], on=on))
    return checks


def retention_checks(*, min_retention: float, max_ppl_rise: float | None, ppl: tuple[float, float] | None = None,
                     tasks: tuple[TaskScore, TaskScore] | None = None, heldout: str = "heldout",
                     eval_on: str = "eval") -> list[Check]:
    """prune's and awq's gate: perplexity (parent, child) on held-out text and accuracy (parent,
    child) on --eval tasks, each when measured, against the retention (default 97%)."""
    checks = []
    limit = ppl_rise_limit(max_ppl_rise, min_retention)
    if ppl is not None and limit is not None:
        option = "--max-ppl-rise" if max_ppl_rise is not None else "--min-retention"
        checks.append(ppl_check(ppl[0], ppl[1], limit, option=option, on=heldout))
    if tasks is not None:
        checks.append(retention_check(tasks[0], tasks[1], min_retention, on=eval_on))
    return checks


def eval_set_tasks(eval_sets: Sequence[Any] | None) -> list[dict[str, Any]]:
    """The tasks of the --eval files of distill train and rl (orstack/train/validate.py's
    EvalSet); files of training rows have no accuracy to gate on."""
    return [t for s in eval_sets or [] if getattr(s, "tasks", None) for t in s.tasks]


def training_checks(before: TaskScore, after: TaskScore, *, max_accuracy_drop: float,
                    max_cluster_drop: float | None = None, clusters: Sequence[str] = (),
                    on: str = "eval") -> list[Check]:
    """distill train's and rl's gate: general accuracy may fall at most `max_accuracy_drop`
    points; each targeted cluster (when `max_cluster_drop` is given) at most that many."""
    checks = [accuracy_drop_check(before, after, max_accuracy_drop, on=on)]
    if max_cluster_drop is not None:
        checks += cluster_checks(before, after, clusters, max_cluster_drop, on=on)
    return checks


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
