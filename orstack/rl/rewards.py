"""Verifiable rewards for GRPO, each a trl reward function (prompts, completions, **columns) -> floats.

- correct: 1 when bench's verifier accepts the completion (numeric / exact / choice / code
  tests in the sandbox), else 0; the completion is cut at the task's stop sequences first,
  as bench cuts generations.
- format: 1 when the completion ended by itself (EOS, not the length limit), has nothing
  after its first stop sequence and, with a regex, matches it in full.
- efficiency: for correct completions, a bonus up to `weight` for being shorter than the
  target length; over it, a penalty (`capped`: correct ones only, at most `weight`;
  `gentle`: every completion, half the slope, at most 2.5 x `weight`).
- cmd:COMMAND: any program scores completions (JSONL rows with prompt, completion and the
  task's fields in; rows with `reward` out).
Each value is clipped to [-clip, clip] when `clip` is set. Task rows travel in the dataset's
`task` column as JSON, so tasks of different shapes share one dataset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orstack.errors import BadInput


@dataclass
class RewardConfig:
    rewards: tuple[str, ...] = ("correct",)  # correct, format, cmd:COMMAND
    efficiency_weight: float = 0.2  # 0 turns the efficiency reward off
    target_length: int = 16  # tokens
    efficiency_formula: str = "capped"  # capped (orstack's) or gentle (see efficiency_bonus)
    format_regex: str | None = None
    clip: float | None = None
    cmd_timeout: float = 120.0


EFFICIENCY_FORMULAS = ("capped", "gentle")


def efficiency_bonus(correct: bool, length: int, target: int, weight: float, formula: str = "capped") -> float:
    """The token-efficiency reward. Both formulas give a correct answer shorter than the target
    +weight * (1 - length/target). Over the target, `capped` (orstack's) penalises a correct answer
    by weight * (length - target)/target, at most `weight`, and gives wrong ones 0; `gentle` (the
    recipe orstack follows: 0.2 bonus, -0.1 slope, -0.5 floor) penalises every completion by half
    that slope, at most 2.5 x weight."""
    if weight == 0:
        return 0.0
    over = (length - target) / target
    if formula == "gentle":
        if length > target:
            return -min(2.5 * weight, 0.5 * weight * over)
        return weight * (1.0 - length / target) if correct else 0.0
    if not correct:
        return 0.0
    if length <= target:
        return weight * (1.0 - length / target)
    return -weight * min(1.0, over)


def completion_text(completion: Any) -> str:
    """trl passes strings for plain prompts and message lists for conversational ones."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


class Scorer:
    """bench's verifier, cached per (task, completion) so several rewards score a batch once."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], bool] = {}

    def correct(self, tasks: list[dict[str, Any]], completions: list[str]) -> list[bool]:
        from orstack.tasks.stops import cut_at_stop, stop_sequences
        from orstack.tasks.verify import score_outputs

        cut = [cut_at_stop(c, stop_sequences(t))[0] for t, c in zip(tasks, completions)]
        keys = [(json.dumps(t, sort_keys=True), c) for t, c in zip(tasks, cut)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            scores = score_outputs([tasks[i] for i in todo], [cut[i] for i in todo])
            for i, (ok, _) in zip(todo, scores):
                self.cache[keys[i]] = bool(ok)
        if len(self.cache) > 50_000:
            self.cache.clear()
        return [self.cache[k] for k in keys]


def _clip(values: list[float], clip: float | None) -> list[float]:
    return values if clip is None else [max(-clip, min(clip, v)) for v in values]


def _named(name: str, fn: Callable[..., list[float]]) -> Callable[..., list[float]]:
    fn.__name__ = name  # trl logs rewards/<__name__>/mean
    return fn


def build_rewards(config: RewardConfig, eos_token_id: int | None) -> list[Callable[..., list[float]]]:
    """The trl reward functions for `config`, in a fixed order (correct, efficiency, format, cmd)."""
    from orstack.tasks.stops import stop_sequences

    scorer = Scorer()
    funcs = []
    pattern = re.compile(config.format_regex) if config.format_regex else None

    def tasks_of(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        return [json.loads(t) for t in kwargs["task"]]

    if "correct" in config.rewards:
        def correct(prompts, completions, **kwargs) -> list[float]:  # noqa: ANN001 - trl's signature
            ok = scorer.correct(tasks_of(kwargs), [completion_text(c) for c in completions])
            return _clip([float(x) for x in ok], config.clip)

        funcs.append(_named("correct", correct))
        if config.efficiency_weight:
            def efficiency(prompts, completions, completion_ids, **kwargs) -> list[float]:  # noqa: ANN001
                ok = scorer.correct(tasks_of(kwargs), [completion_text(c) for c in completions])
                return _clip([efficiency_bonus(c, len(ids), config.target_length, config.efficiency_weight,
                                               config.efficiency_formula)
                              for c, ids in zip(ok, completion_ids)], config.clip)

            funcs.append(_named("efficiency", efficiency))
    if "format" in config.rewards:
        def format_(prompts, completions, completion_ids, **kwargs) -> list[float]:  # noqa: ANN001
            from orstack.tasks.stops import cut_at_stop

            out = []
            for task, text, ids in zip(tasks_of(kwargs), completions, completion_ids):
                text = completion_text(text)
                ended = bool(ids) and eos_token_id is not None and ids[-1] == eos_token_id
                answer = cut_at_stop(text, stop_sequences(task))[0]
                clean = answer.strip() != "" and text.strip() == answer.strip()
                matches = pattern is None or bool(pattern.fullmatch(answer.strip()))
                out.append(float(ended and clean and matches))
            return _clip(out, config.clip)

        funcs.append(_named("format", format_))
    for spec in config.rewards:
        if spec.startswith("cmd:"):
            funcs.append(_named(f"cmd{len(funcs)}", command_reward(spec, config)))
    if not funcs:
        raise BadInput("no reward: give --reward correct, format or cmd:COMMAND")
    return funcs


def command_reward(spec: str, config: RewardConfig) -> Callable[..., list[float]]:
    """A reward program (orstack/io/command.py: its own process group, killed when done); a program
    that fails or answers wrongly stops the run with one line naming it (exit 2: the input is at fault)."""
    from orstack.io.command import CommandError, run_jsonl_command

    command = spec[4:].strip()

    def reward(prompts, completions, **kwargs) -> list[float]:  # noqa: ANN001
        rows = [{**json.loads(t), "prompt": p if isinstance(p, str) else completion_text(p),
                 "completion": completion_text(c)} for t, p, c in zip(kwargs["task"], prompts, completions)]
        for n, row in enumerate(rows):
            row["row"] = n
        try:
            outputs = run_jsonl_command(command, rows, config.cmd_timeout)
        except CommandError as e:
            raise BadInput(f"--reward {spec}: {e}") from None
        # Rows of one task share its id, so outputs are matched by `row` (echoed) or by order.
        if outputs and all("row" in o for o in outputs):
            by_row = {o["row"]: o for o in outputs}
            matched = [by_row.get(n) for n in range(len(rows))]
        elif len(outputs) == len(rows):
            matched = outputs
        else:
            raise BadInput(f"--reward {spec}: wrote {len(outputs)} rows for {len(rows)} completions")
        values = []
        for n, out in enumerate(matched):
            if out is None or not isinstance(out.get("reward"), (int, float)):
                raise BadInput(f"--reward {spec}: no numeric 'reward' for row {n}")
            values.append(float(out["reward"]))
        return _clip(values, config.clip)

    return reward
