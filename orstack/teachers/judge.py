"""A judge for open answers: `kind: text` tasks have no answer a verifier can check, so a
model (any teacher SPEC: an endpoint, a GGUF, a checkpoint, or `cmd:PROGRAM`) grades each
response on a 1-10 rubric. bench counts a response as correct at `--judge-min` (7: below 7
is a failure, as the recipe orstack follows has it); distill generate keeps a teacher's
response at its own `--judge-min` (8).

The judge is asked a task row like any teacher: `prompt` is the rubric with the question,
the reference (when the task has one) and the response filled in; the fields `question`,
`response`, `reference` and `rubric` travel beside it so a `cmd:` judge need not parse the
prompt. Its reply must contain a score: the first whole number from 1 to 10 in it (a reply
of "8", "Score: 8/10" or "8 - clear and correct" all read 8). A reply without one stops the
run with one line naming the task (exit 2): a judge that cannot be read cannot gate anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    from orstack.runtime import Runtime
    from orstack.teachers.base import Teacher, TeacherOptions

RUBRIC = (
    "You are grading a response to a question on a scale from 1 to 10.\n"
    "10: fully correct, complete and clear. 7: correct with minor flaws. 4: partly correct or "
    "unclear. 1: wrong, off-topic or empty.\n"
    "Question:\n{question}\n"
    "{reference_block}"
    "Response:\n{response}\n"
    "Reply with the score alone, a whole number from 1 to 10.\n"
    "Score:"
)
SCORE = re.compile(r"(?<![\d.])(10|[1-9])(?![\d.])")


@dataclass
class JudgeConfig:
    spec: str  # a teacher SPEC
    min_score: float = 7.0  # a response scoring below this fails
    rubric: str | None = None  # a file with {question}, {response} and optionally {reference_block}
    max_new_tokens: int = 16


def read_rubric(path: str | None) -> str:
    """The rubric template: the built-in one, or a file that names {question} and {response}."""
    if path is None:
        return RUBRIC
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--judge-rubric {path}: no such file")
    text = p.read_text(encoding="utf-8")
    for slot in ("{question}", "{response}"):
        if slot not in text:
            raise BadInput(f"--judge-rubric {path}: the rubric must contain {slot}")
    return text


def check_judge(config: JudgeConfig) -> None:
    """The judge's SPEC and rubric checked before anything loads (BadInput naming --judge)."""
    from orstack.teachers.base import parse_spec

    try:
        parse_spec(config.spec)
    except BadInput as e:
        raise BadInput(str(e).replace("--teacher", "--judge", 1)) from None
    read_rubric(config.rubric)


def parse_score(reply: str) -> int | None:
    match = SCORE.search(reply)
    return int(match.group(1)) if match else None


class Judge:
    """Scores (question, response) pairs with a teacher; built once per run."""

    def __init__(self, config: JudgeConfig, runtime: Runtime, options: TeacherOptions | None = None) -> None:
        from dataclasses import replace

        from orstack.teachers.base import TeacherOptions, open_teacher

        self.config = config
        self.rubric = read_rubric(config.rubric)
        base = options or TeacherOptions()
        self.teacher: Teacher = open_teacher(config.spec, runtime, replace(base, max_new_tokens=config.max_new_tokens,
                                                                           stop=[]))

    def check(self) -> None:
        self.teacher.check()

    def close(self) -> None:
        self.teacher.close()

    def score(self, tasks: list[dict[str, Any]], responses: list[str], where: str = "tasks") -> list[int]:
        """One score per response; a judge reply without a score is bad input naming the task."""
        from orstack.tasks.contract import prompt_of

        if not tasks:
            return []
        asked = []
        for task, response in zip(tasks, responses):
            question = prompt_of(task)
            reference = task.get("reference") or task.get("answer")
            block = f"Reference answer:\n{reference}\n" if reference not in (None, "") else ""
            prompt = self.rubric.format(question=question, response=response, reference_block=block)
            asked.append({"id": task.get("id"), "prompt": prompt, "question": question, "response": response,
                          "reference": reference, "rubric": self.rubric})
        replies = self.teacher.answer(asked)
        scores = []
        for task, reply in zip(tasks, replies):
            score = parse_score(reply) if reply is not None else None
            if score is None:
                said = "no reply" if reply is None else f"reply {reply.strip()[:60]!r}"
                detail = f" ({self.teacher.last_error})" if reply is None and self.teacher.last_error else ""
                raise BadInput(f"--judge {self.config.spec}: {where}: task {task.get('id')!r}: {said}{detail} has "
                               "no score from 1 to 10")
            scores.append(score)
        return scores


def judge_rows(judge: Judge, rows: list[dict[str, Any]], tasks: list[dict[str, Any]], where: str) -> None:
    """bench: fill `judge_score`, `score` (the judge's score / 10) and `correct` (score at or
    above the judge's minimum) in place for the rows of `text` tasks."""
    open_rows = [i for i, t in enumerate(tasks) if t.get("kind") == "text"]
    scores = judge.score([tasks[i] for i in open_rows], [rows[i]["output"] for i in open_rows], where)
    for i, s in zip(open_rows, scores):
        rows[i]["judge_score"] = s
        rows[i]["score"] = s / 10.0
        rows[i]["correct"] = s >= judge.config.min_score
