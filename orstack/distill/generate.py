"""Failure-targeted training data: ask tiered teachers about what the student got wrong.

For every failure cluster the teachers answer (a) the failures themselves and (b) with
`per_cluster` > 0, new problems made from the cluster's representatives. Tiers are tried
cheapest first; a task moves to the next tier only when the verifier (bench's
`score_outputs`: numeric / exact / choice answers, code tests in the sandbox) rejects the
response, or the teacher failed to answer. Teachers never see `answer` or `tests`.

New problems: a teacher is shown a representative (problem and answer) and asked for a
different problem of the same kind in the same format, with its answer. The proposed
answer is then checked like any other: the problem is solved through the tiers and kept
only when a solver's answer agrees with it (`check: "agreement"`); otherwise the request
goes to the next tier.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.tasks.contract import as_task, infer_kind, is_verifiable, validate_messages
from orstack.teachers.base import TeacherOptions
from orstack.teachers.judge import JudgeConfig

if TYPE_CHECKING:
    from orstack.runtime import Runtime
    from orstack.teachers.judge import Judge

HIDDEN_FIELDS = {"answer", "tests"}  # what the verifier knows and the teacher must not see

VARIANT_TEMPLATE = (
    "A student model gets problems like these wrong{label}.\n"
    "{others}"
    "Here is one of them and its answer.\n"
    "Problem: {prompt}\n"
    "Answer: {answer}\n"
    "Write one new, different problem of the same kind and difficulty, in exactly the same format, "
    "and its answer, as two lines:\nProblem: ...\nAnswer: ...\n"
)
SHOWN_FAILURES = 3  # representative failures of the cluster shown beside the example
VARIANT_REPLY = re.compile(r"Problem:[ \t]*(?P<prompt>.*?)\s*\n\s*Answer:[ \t]*(?P<answer>[^\n]*)", re.S | re.I)


@dataclass
class GenerateConfig:
    failures: str  # annotated failures JSONL ('-': standard input)
    teachers: list[str]  # teacher SPECs, cheapest tier first
    per_cluster: int | str = 0  # new problems per cluster, or "auto": `budget` shared by failure count
    budget: int | None = None  # with per_cluster "auto": new problems in all, split by clusters' failures
    representatives: int = 20  # failures per cluster used as examples for new problems
    dedup_threshold: float = 0.9  # word-trigram Jaccard above which two long prompts are near-duplicates
    teacher: TeacherOptions = field(default_factory=TeacherOptions)  # how every tier is asked
    judge: JudgeConfig | None = None  # grades `text` responses; kept at judge.min_score or above
    shard: str | None = None  # "I/N": only the I-th of N contiguous blocks of the clusters (orstack/tasks/shard.py)
    exclude: list[str] = field(default_factory=list)  # task files no new problem may repeat (decontamination)
    seed: int = 0

    def check(self) -> None:
        if isinstance(self.per_cluster, str) and self.per_cluster != "auto":
            raise BadInput(f"--per-cluster {self.per_cluster}: expected a whole number or auto")
        if self.per_cluster == "auto" and not self.budget:
            raise BadInput("--per-cluster auto shares a total: give --budget N (new problems in all)")
        if self.budget is not None and self.per_cluster != "auto":
            raise BadInput("--budget is the total that --per-cluster auto shares out: give --per-cluster auto")


def cluster_quotas(failures: dict[Any, list[dict[str, Any]]], config: GenerateConfig) -> dict[Any, int]:
    """New problems per cluster: `per_cluster` each, or (auto) the budget in proportion to each
    cluster's failure count, by largest remainder so the quotas sum to the budget exactly."""
    if config.per_cluster != "auto":
        return {c: int(config.per_cluster) for c in failures}
    total = sum(len(rows) for rows in failures.values())
    budget = int(config.budget or 0)
    exact = {c: budget * len(rows) / total for c, rows in failures.items()}
    quotas = {c: int(v) for c, v in exact.items()}
    leftover = budget - sum(quotas.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - quotas[c]), str(c)))[:leftover]:
        quotas[c] += 1
    return quotas


@dataclass
class TierStats:
    asked: int = 0
    accepted: int = 0
    escalated: int = 0
    rejected: int = 0  # rejected by the last tier: no example
    errors: int = 0  # teacher gave no answer (network, process, parse)


@dataclass
class GenerateReport:
    tiers: list[str]
    stats: dict[tuple[Any, int, str], TierStats] = field(default_factory=lambda: defaultdict(TierStats))
    duplicates: int = 0
    contaminated: int = 0  # new problems rejected because an --exclude file has them
    examples: int = 0

    def add(self, cluster: Any, tier: int, what: str, **counts: int) -> None:
        st = self.stats[(cluster, tier, what)]
        for name, n in counts.items():
            setattr(st, name, getattr(st, name) + n)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (cluster, tier, what): what is `solve-failure`, `variant` (asking for new
        problems) or `solve-new` (solving them)."""
        out = []
        for (cluster, tier, what), st in sorted(self.stats.items(), key=lambda kv: (str(kv[0][0]), kv[0][1:])):
            out.append({"cluster": cluster, "tier": tier + 1, "teacher": self.tiers[tier], "what": what,
                        **st.__dict__})
        return out


def teacher_view(task: dict[str, Any]) -> dict[str, Any]:
    """What a teacher is asked: the task without its ground truth, with bench's stop sequences for
    its kind unless it names its own (so a teacher answers the way bench runs the task)."""
    from orstack.tasks.stops import DEFAULT_STOP

    view = {k: v for k, v in task.items() if k not in HIDDEN_FIELDS and not k.startswith("_")}
    if "stop" not in view and task["kind"] in DEFAULT_STOP:
        view["stop"] = list(DEFAULT_STOP[task["kind"]])
    return view


def load_failures(rows: list[tuple[int, dict[str, Any]]], where: str) -> dict[Any, list[dict[str, Any]]]:
    """Failures grouped by cluster (rows with correct=true are skipped; no cluster -> cluster None)."""
    clusters: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for lineno, row in rows:
        if row.get("correct") is True:
            continue
        if row.get("messages") is not None:
            validate_messages(row["messages"], f"{where}:{lineno}")
            if row.get("prompt") is not None:
                raise BadInput(f"{where}:{lineno}: fields 'prompt' and 'messages': give exactly one of them")
            clusters[row.get("cluster")].append(as_task(row))
            continue
        if row.get("prompt") is None:
            raise BadInput(f"{where}:{lineno}: missing required field 'prompt' (or 'messages')")
        if not isinstance(row["prompt"], str):
            raise BadInput(f"{where}:{lineno}: field 'prompt': expected a string, got {type(row['prompt']).__name__}")
        clusters[row.get("cluster")].append(as_task(row))
    if not clusters:
        raise BadInput(f"{where}: no failures (no rows with correct=false)")
    return dict(clusters)


# -- near-duplicates --------------------------------------------------------------------------
def normalize_prompt(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


class Deduper:
    """Exact duplicates after normalisation; near-duplicates (trigram Jaccard >= threshold) among
    prompts of 8+ words. Short prompts like `12+345=` differ in one character and are distinct problems."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.seen: set[str] = set()
        self.long: list[set[tuple[str, ...]]] = []

    def is_new(self, prompt: str, add: bool = True) -> bool:
        """Whether `prompt` is new; `add` records it (so later near-copies are not)."""
        key = normalize_prompt(prompt)
        if key in self.seen:
            return False
        grams = _trigrams(key) if len(key.split()) >= 8 else None
        if grams:
            for other in self.long:
                if len(grams & other) / len(grams | other) >= self.threshold:
                    return False
        if add:
            self.seen.add(key)
            if grams:
                self.long.append(grams)
        return True

    def copy(self) -> Deduper:
        other = Deduper(self.threshold)
        other.seen, other.long = set(self.seen), list(self.long)
        return other


# -- the tiered loop --------------------------------------------------------------------------
def solve_through_tiers(teachers: list[Any], tasks: list[dict[str, Any]], report: GenerateReport,
                        judge: Judge | None = None) -> list[tuple[dict[str, Any], str, int, str] | None]:
    """For each task: (task, response, tier, check) from the first tier whose response the
    verifier accepts; None when every tier failed. Unverifiable tasks take the first answer, or
    with a judge the first answer it scores at its minimum or above (the score lands in the task
    as `judge_score`)."""
    from orstack.tasks.verify import score_outputs

    results: list[tuple[dict[str, Any], str, int, str] | None] = [None] * len(tasks)
    pending = list(range(len(tasks)))
    for tier, teacher in enumerate(teachers):
        if not pending:
            break
        last = tier == len(teachers) - 1
        responses = teacher.answer([teacher_view(tasks[i]) for i in pending])
        scored_idx = [j for j, r in enumerate(responses) if r is not None and is_verifiable(tasks[pending[j]])]
        scores = score_outputs([tasks[pending[j]] for j in scored_idx], [responses[j] for j in scored_idx])
        verdict = dict(zip(scored_idx, (ok for ok, _ in scores)))
        judged_idx = [j for j, r in enumerate(responses) if r is not None and judge is not None
                      and not is_verifiable(tasks[pending[j]])]
        judged = dict(zip(judged_idx, judge.score([tasks[pending[j]] for j in judged_idx],
                                                  [responses[j] for j in judged_idx], "failures")
                          if judged_idx else []))
        still = []
        for j, i in enumerate(pending):
            cluster = tasks[i].get("cluster")
            what = "solve-new" if tasks[i].get("origin") == "variant" else "solve-failure"
            report.add(cluster, tier, what, asked=1)
            response = responses[j]
            if response is None:
                ok, check = False, None
                report.add(cluster, tier, what, errors=1)
            elif is_verifiable(tasks[i]):
                ok, check = bool(verdict[j]), tasks[i].get("_check", "tests" if tasks[i]["kind"] == "code"
                                                           else "answer")
            elif j in judged:
                ok, check = judged[j] >= judge.config.min_score, "judge"
                tasks[i] = {**tasks[i], "judge_score": judged[j]}
            else:
                ok, check = True, "none"
            if ok:
                results[i] = (tasks[i], response, tier, check)
                report.add(cluster, tier, what, accepted=1)
            elif last:
                report.add(cluster, tier, what, rejected=1)
            else:
                report.add(cluster, tier, what, escalated=1)
                still.append(i)
        pending = still
    return results


def _question(task: dict[str, Any]) -> str | None:
    """The problem text a new problem is modelled on: the prompt, or a conversation's last user
    turn when the conversation ends with it (a final assistant prefill, as in code tasks, is not
    something a teacher's one-line problem can stand in for)."""
    if isinstance(task.get("prompt"), str):
        return task["prompt"]
    messages = task.get("messages") or []
    if messages and messages[-1].get("role") == "user":
        return messages[-1]["content"]
    return None


def _posed(frame: list[dict[str, Any]] | None, question: str) -> dict[str, Any]:
    """A new problem as a task field: a prompt, or the representative's conversation with its
    last user turn replaced (so a system prompt or earlier turns stay as they were)."""
    if frame is None:
        return {"prompt": question}
    return {"prompt": None, "messages": [*frame[:-1], {**frame[-1], "content": question}]}


def variant_requests(cluster: Any, failures: list[dict[str, Any]], config: GenerateConfig,
                     quota: int | None = None) -> list[dict[str, Any]]:
    """`quota` (default `per_cluster`) requests for new problems, round-robin over the cluster's
    representatives; each names the cluster's label and shows a few of its other failures.
    A conversation's new problem replaces its last user turn."""
    reps = [f for f in failures if f.get("answer") is not None and _question(f) is not None
            ][:config.representatives]
    count = int(config.per_cluster) if quota is None else quota
    requests = []
    for n in range(count if reps else 0):
        rep = reps[n % len(reps)]
        others = [r for r in reps if r is not rep][:SHOWN_FAILURES - 1]
        label = rep.get("cluster_label")
        shown = "".join(f"- {_question(o)}\n" for o in others)
        question = _question(rep)
        requests.append({
            "id": f"variant-{cluster}-{n:04d}", "request": "variant", "kind": rep["kind"],
            "prompt": VARIANT_TEMPLATE.format(prompt=question, answer=rep["answer"],
                                              label=f" (the capability gap '{label}')" if label else "",
                                              others=f"Some of them:\n{shown}" if shown else ""),
            "example": {"prompt": question, "answer": rep["answer"]}, "n": n,
            "_frame": None if isinstance(rep.get("prompt"), str) else rep["messages"],
            **{k: rep[k] for k in ("family", "level", "domain", "cluster_label") if k in rep}, "cluster": cluster,
        })
    return requests


def parse_variant(reply: str) -> tuple[str, str] | None:
    match = VARIANT_REPLY.search(reply)
    if not match or not match.group("prompt").strip() or not match.group("answer").strip():
        return None
    return match.group("prompt").strip(), match.group("answer").strip()


def new_problems(teachers: list[Any], requests: list[dict[str, Any]], report: GenerateReport,
                 dedup: dict[Any, Deduper], judge: Judge | None = None, exclude: Deduper | None = None,
                 ) -> list[tuple[dict[str, Any], str, int, str] | None]:
    """Ask the tiers for new problems. A tier's problem is kept only when solving it through the
    tiers agrees with the proposed answer; an unparsable, repeated (`dedup[cluster]`: every
    failure and the cluster's new problems so far), excluded (`exclude`: the held-out tasks it
    must not leak into training) or disagreeing proposal sends the request to the next tier.
    Returns solved (task, response, tier, check) items."""
    solved: list[tuple[dict[str, Any], str, int, str] | None] = []
    pending = list(requests)
    for tier, teacher in enumerate(teachers):
        if not pending:
            break
        last = tier == len(teachers) - 1
        replies = teacher.answer(pending)
        candidates: list[tuple[dict[str, Any], dict[str, Any]]] = []
        rejected: list[dict[str, Any]] = []
        for req, reply in zip(pending, replies):
            if reply is None:
                report.add(req.get("cluster"), tier, "variant", errors=1)
            parsed = parse_variant(reply) if reply is not None else None
            if parsed and exclude is not None and not exclude.is_new(parsed[0], add=False):
                report.contaminated += 1
                parsed = None
            if parsed and dedup[req.get("cluster")].is_new(parsed[0], add=False):
                prompt, answer = parsed
                task = {k: v for k, v in req.items() if k not in ("request", "example", "n", "prompt", "_frame")}
                task.update({"id": req["id"].replace("variant-", "new-"), **_posed(req.get("_frame"), prompt),
                             "answer": answer,
                             "kind": infer_kind({"answer": answer, "kind": req.get("kind")}),
                             "origin": "variant", "generator": f"tier{tier + 1}:{teacher.spec}",
                             "_check": "agreement"})
                candidates.append((req, task))
            else:
                rejected.append(req)
        results = solve_through_tiers(teachers, [task for _, task in candidates], report,
                                      judge) if candidates else []
        for (req, task), item in zip(candidates, results):
            if item is not None and dedup[req.get("cluster")].is_new(_question(task) or ""):
                solved.append(item)
                report.add(req.get("cluster"), tier, "variant", accepted=1)
            else:
                rejected.append(req)
        for req in pending:
            report.add(req.get("cluster"), tier, "variant", asked=1)
        for req in rejected:
            report.add(req.get("cluster"), tier, "variant", **({"rejected": 1} if last else {"escalated": 1}))
        pending = [] if last else rejected
    return solved


def generate(failures: dict[Any, list[dict[str, Any]]], teachers: list[Any], config: GenerateConfig,
             judge: Judge | None = None) -> tuple[list[dict[str, Any]], GenerateReport]:
    """Training Example rows (docs/design.md) for every failure cluster (with `config.shard`, the
    shard's clusters), cluster by cluster in file order, and the per-cluster/per-tier report.

    Nothing a cluster gets depends on another cluster's answers (duplicates are judged against
    every failure, new problems against the failures and their own cluster's), so the shards'
    outputs concatenated are the unsharded output."""
    from orstack.tasks.shard import take_shard

    report = GenerateReport(tiers=[t.spec for t in teachers])
    order = list(failures)
    mine = set(take_shard(order, config.shard))
    dedup = Deduper(config.dedup_threshold)
    tasks: list[dict[str, Any]] = []
    for cluster, rows in failures.items():
        for task in rows:
            if dedup.is_new(_dedup_text(task)):
                if cluster in mine:
                    tasks.append({**task, "cluster": cluster, "origin": "failure"})
            elif cluster in mine:
                report.duplicates += 1
    solved = solve_through_tiers(teachers, tasks, report, judge)
    quotas = cluster_quotas(failures, config)
    if any(quotas[c] for c in mine):
        requests = [r for cluster, rows in failures.items() if cluster in mine
                    for r in variant_requests(cluster, rows, config, quotas[cluster])]
        solved += new_problems(teachers, requests, report, {c: dedup.copy() for c in mine}, judge,
                               excluded_problems(config))
    rank = {c: i for i, c in enumerate(order)}
    solved.sort(key=lambda item: rank[item[0].get("cluster")] if item is not None else -1)
    examples = []
    counters: dict[Any, int] = defaultdict(int)
    for item in solved:
        if item is None:
            continue
        task, response, tier, check = item
        cluster = task.get("cluster")
        counters[cluster] += 1
        example = {k: v for k, v in task.items() if not k.startswith("_")}
        # a conversation's example is the conversation with the teacher's answer as its last
        # assistant turn (distill train's loss is on assistant turns only)
        asked = ({"messages": _answered(task["messages"], response)} if task.get("messages") is not None
                 else {"prompt": task["prompt"], "response": response})
        example.update({
            "id": f"gen-{cluster}-{counters[cluster]:04d}", "task_id": task.get("id"), **asked,
            "cluster": cluster, "source": f"tier{tier + 1}:{teachers[tier].spec}",
            "verified": check not in ("none", None), "check": check,
        })
        examples.append(example)
    report.examples = len(examples)
    return examples, report


def excluded_problems(config: GenerateConfig) -> Deduper | None:
    """Every problem of the --exclude task files (prompts and user turns), as a Deduper that
    judges a new problem a copy of one by the same rule as duplicates."""
    if not config.exclude:
        return None
    from orstack.io.jsonl import read_jsonl_numbered

    seen = Deduper(config.dedup_threshold)
    for path in config.exclude:
        for _, row in read_jsonl_numbered(path):
            if isinstance(row.get("prompt"), str):
                seen.is_new(row["prompt"])
            for m in row.get("messages") or []:
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                    seen.is_new(m["content"])
    return seen


def _dedup_text(task: dict[str, Any]) -> str:
    messages = task.get("messages")
    return task["prompt"] if messages is None else "\n".join(m["content"] for m in messages)


def _answered(messages: list[dict[str, Any]], response: str) -> list[dict[str, Any]]:
    """The conversation answered: a final assistant prefill is completed by the response."""
    if messages[-1]["role"] == "assistant":
        return [*messages[:-1], {"role": "assistant", "content": messages[-1]["content"] + response}]
    return [*messages, {"role": "assistant", "content": response}]


@dataclass
class GenerateResult:
    """What `distill generate` reports."""

    examples: int
    clusters: int
    report: GenerateReport
    notes: list[str]  # per-teacher failure counts, for warnings
    output: Path | None  # None: the rows went to standard output


def run_generate(output: str | Path | None, config: GenerateConfig, runtime: Runtime, *,
                 report: str | Path | None = None) -> GenerateResult:
    """`distill generate`: check the inputs and outputs, ask the tiers, write the Training Example
    rows to `output` (standard output when None or '-') and, with `report`, the report as JSON."""
    from orstack.backends.openai import APIS
    from orstack.io.jsonl import STDIO, display_name, read_jsonl_numbered, write_json, write_jsonl
    from orstack.io.output import Output, check_outputs
    from orstack.teachers import open_teacher

    if config.failures != STDIO and not Path(config.failures).is_file():
        raise BadInput(f"{config.failures}: no such file")
    if not config.teachers:
        raise BadInput("give at least one --teacher")
    config.check()
    if config.judge is not None:
        from orstack.teachers.judge import check_judge

        check_judge(config.judge)
    if config.teacher.api not in APIS:
        raise BadInput(f"--teacher-api: expected chat or completions, got '{config.teacher.api}'")
    from orstack.backends.chat import template_file_text

    template_file_text(config.teacher.chat_template)  # an unusable --chat-template FILE: before any teacher
    from orstack.tasks.shard import parse_shard, take_shard

    parse_shard(config.shard)
    for path in config.exclude:
        if not Path(path).is_file():
            raise BadInput(f"--exclude {path}: no such file")
    check_outputs([Output(output, "file", "-o"), Output(report, "file", "--report")],
                  inputs=[config.failures, *config.exclude])
    teachers = [open_teacher(spec, runtime, config.teacher) for spec in config.teachers]
    clusters = load_failures(list(read_jsonl_numbered(config.failures)), display_name(config.failures))
    if not take_shard(list(clusters), config.shard):
        raise BadInput(f"--shard {config.shard}: no clusters in this shard ({len(clusters)} clusters in all); "
                       "nothing written")
    judge = None
    if config.judge is not None:
        from orstack.teachers.judge import Judge

        judge = Judge(config.judge, runtime, config.teacher)
    for t in teachers + ([judge] if judge else []):
        t.check()
    try:
        examples, rep = generate(clusters, teachers, config, judge)
    finally:
        for t in teachers + ([judge] if judge else []):
            t.close()
    notes = [f"teacher {t.spec}: {t.errors} failed answers (last: {t.last_error})" for t in teachers if t.errors]
    if not examples:
        asked = sum(len(v) for v in clusters.values())
        raise BadInput(f"no teacher answer passed the verifier ({asked} failures asked"
                       + "".join(f"; {n}" for n in notes) + "); nothing written")
    write_jsonl(examples, output)
    if report is not None:
        write_json({"examples": rep.examples, "duplicates": rep.duplicates, "contaminated": rep.contaminated,
                    "rows": rep.rows()}, report)
    return GenerateResult(len(examples), len(clusters), rep, notes,
                          None if output is None or str(output) == STDIO else Path(output))
