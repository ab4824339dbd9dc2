"""rl: reward functions on hand-made cases, batch shapes, adaptive KL, SRL rows, bad input, and
a few real GRPO steps on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import cli_defaults, run_orstack, tree_hash

from orstack.errors import BadInput
from orstack.rl.grpo import adaptive_beta, choose_batch, load_tasks, srl_examples
from orstack.rl.rewards import RewardConfig, build_rewards, efficiency_bonus

EOS = 1


def call(funcs, tasks, completions, ids=None):
    ids = ids or [[5, EOS]] * len(completions)
    kw = {"task": [json.dumps(t) for t in tasks], "completion_ids": ids}
    return {f.__name__: f(prompts=[t["prompt"] for t in tasks], completions=completions, **kw) for f in funcs}


NUM = {"id": "a", "prompt": "12+345=", "answer": "357", "kind": "numeric"}
EXACT = {"id": "b", "prompt": "rev abc=", "answer": "cba", "kind": "exact"}


def test_efficiency_bonus_hand_cases():
    assert efficiency_bonus(True, 4, 16, 0.2) == pytest.approx(0.2 * 0.75)
    assert efficiency_bonus(True, 16, 16, 0.2) == 0.0
    assert efficiency_bonus(True, 24, 16, 0.2) == pytest.approx(-0.1)
    assert efficiency_bonus(True, 500, 16, 0.2) == pytest.approx(-0.2)  # the penalty is capped
    assert efficiency_bonus(False, 2, 16, 0.2) == 0.0  # wrong answers earn nothing for brevity
    assert efficiency_bonus(True, 2, 16, 0.0) == 0.0


def test_correct_efficiency_and_format_rewards():
    funcs = build_rewards(RewardConfig(rewards=("correct", "format"), efficiency_weight=0.2, target_length=8), EOS)
    assert [f.__name__ for f in funcs] == ["correct", "efficiency", "format"]
    tasks = [NUM, NUM, EXACT, EXACT, NUM]
    completions = ["357", "356", "cba", "cba\nrev xyz=zyx", "the sum is 357"]
    ids = [[3, 5, 7, EOS], [3, 5, 6, EOS], [9, 9, 9, EOS], [9] * 14, [4] * 16]
    got = call(funcs, tasks, completions, ids)
    assert got["correct"] == [1.0, 0.0, 1.0, 1.0, 1.0]  # exact: cut at the task's stop sequence first
    assert got["efficiency"] == pytest.approx([0.2 * 0.5, 0.0, 0.2 * 0.5, -0.2 * 0.75, -0.2])
    # format: ended by EOS and nothing after the answer
    assert got["format"] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_format_regex_and_clip():
    funcs = build_rewards(RewardConfig(rewards=("format",), format_regex=r"\d+", clip=0.5), EOS)
    assert call(funcs, [NUM, NUM], ["357", "abc"])["format"] == [0.5, 0.0]


def test_cmd_reward(tmp_path):
    script = tmp_path / "score.py"
    script.write_text("import json, sys\nfor l in sys.stdin:\n    r = json.loads(l)\n"
                      "    print(json.dumps({'row': r['row'], 'reward': len(r['completion']) - 10}))\n")
    funcs = build_rewards(RewardConfig(rewards=(f"cmd:{sys.executable} {script}",), clip=3.0), EOS)
    assert call(funcs, [NUM, NUM], ["357", "3" * 20])[funcs[0].__name__] == [-3.0, 3.0]
    broken = build_rewards(RewardConfig(rewards=("cmd:echo '{}'",)), EOS)
    with pytest.raises(BadInput, match="wrote 1 rows for 2"):
        call(broken, [NUM, NUM], ["1", "2"])


def test_batch_shapes_never_fail_trl():
    assert choose_batch(0, 1, 4).batch_size == 4
    shape = choose_batch(3, 1, 4)
    assert shape.batch_size == 4 and "--batch-size 4" in shape.note
    assert choose_batch(2, 2, 4).note is None  # 2 x 2 = 4 completions per generation batch
    assert choose_batch(6, 1, 4).batch_size == 8
    assert choose_batch(3, 1, 4, processes=4).batch_size == 3
    with pytest.raises(BadInput, match="at least 2"):
        choose_batch(4, 1, 1)


def test_adaptive_beta_moves_toward_target():
    assert adaptive_beta(0.02, 0.5, 0.1, 10) > 0.02
    assert adaptive_beta(0.02, 0.01, 0.1, 10) < 0.02
    assert adaptive_beta(0.02, 0.1, 0.1, 10) == pytest.approx(0.02)


def test_tasks_without_answers_are_bad_input(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(NUM) + "\n" + json.dumps({"id": "x", "prompt": "hello", "kind": "exact"}) + "\n")
    with pytest.raises(BadInput, match=r"t.jsonl:2: missing required field 'answer'"):
        load_tasks(str(path), need_answers=True)
    assert len(load_tasks(str(path), need_answers=False)) == 2


def test_srl_rows_weighted_by_step_reward(tmp_path):
    path = tmp_path / "traj.jsonl"
    path.write_text(json.dumps({"id": "t", "prompt": "17+25=", "answer": "42", "steps": [
        {"action": "2", "reasoning": "7+5=12 carry 1", "reward": 0.5},
        {"action": "4", "reasoning": "1+2+1=4", "reward": 1.0},
        {"action": "x", "reward": 0.0}]}) + "\n")
    rows = srl_examples(str(path))
    assert [r["weight"] for r in rows] == [0.5, 1.0]
    assert rows[1]["prompt"] == "17+25=" + "7+5=12 carry 1\n2\n" and rows[1]["response"] == "1+2+1=4\n4\n"


def one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_rl_cli_bad_input(tmp_path, random_llama):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": "x", "prompt": "hello"}) + "\n")
    out = tmp_path / "out"
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out))
    assert done.returncode == 2 and "t.jsonl:1: kind 'text' has no answer to verify" in done.stderr
    assert one_line(done.stderr) and not out.exists() and done.stdout == ""
    tasks.write_text(json.dumps(NUM) + "\n")
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), "--num-generations", "1")
    assert done.returncode == 2 and "at least 2" in done.stderr and one_line(done.stderr) and not out.exists()
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), "--reward", "cmd:no-such-prog-x")
    assert done.returncode == 2 and "not found" in done.stderr and one_line(done.stderr) and not out.exists()


@pytest.mark.parametrize(("row", "rewards", "message"), [
    ({"id": "a", "prompt": 12, "answer": "3"}, [], "t.jsonl:2: field 'prompt': expected a string, got int"),
    ({"id": "a", "prompt": ["1="]}, ["--reward", "format"], "t.jsonl:2: field 'prompt': expected a string, got list"),
    ({"id": "a", "answer": "3"}, [], "t.jsonl:2: missing required field 'prompt'"),
    ({"id": "a", "prompt": "1+1=", "answer": "two", "kind": "numeric"}, [], "t.jsonl:2: field 'answer'"),
    (NUM, [], "t.jsonl:2: field 'id': duplicate id 'a' (first on line 1)"),
    ({"id": "h", "prompt": "the quick brown fox " * 500_000, "answer": "1"}, [],
     "t.jsonl:2: field 'prompt': its first 16448 of 10000000 characters alone are"),
])
def test_rl_task_field_types_name_file_line_and_field(tmp_path, random_llama, row, rewards, message):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps(NUM) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out"
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), *rewards)
    assert done.returncode == 2 and message in done.stderr and one_line(done.stderr), done.stderr
    assert not out.exists()


def test_rl_reads_tasks_from_stdin(tmp_path, random_llama):
    out = tmp_path / "out"
    done = run_orstack("rl", str(random_llama), "--tasks", "-", "-o", str(out), stdin=json.dumps(NUM) + "\n{,}\n")
    assert done.returncode == 2 and "<stdin>:2: not valid JSON" in done.stderr and one_line(done.stderr)
    assert not out.exists()


def test_rl_refuses_a_file_where_the_adapter_goes(tmp_path, random_llama):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps(NUM) + "\n")
    out = tmp_path / "rl-out"
    out.write_text("not a checkpoint\n")
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), "--max-steps", "1")
    assert done.returncode == 2 and f"-o {out}: is a file" in done.stderr and one_line(done.stderr)
    assert out.read_text() == "not a checkpoint\n"


def test_a_failing_reward_command_is_one_line_naming_it(tmp_path, random_llama):
    """The reward program fails mid-run: exit 2 (its input is at fault), one line naming the command and
    the last line it wrote to stderr; the old output and the log stay as they were."""
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                             for i in range(4)))
    script = tmp_path / "score.py"
    script.write_text("import sys\nsys.stdin.read()\nprint('loading rubric', file=sys.stderr)\n"
                      "print('KeyError: rubric.json', file=sys.stderr)\nsys.exit(4)\n")
    command = f"{sys.executable} {script}"
    out, log = tmp_path / "rl-out", tmp_path / "rl.jsonl"
    out.mkdir()
    (out / "orstack.json").write_text("{}\n")  # an earlier orstack output: replaceable, but only by a whole new one
    log.write_text("old log\n")
    before = tree_hash(out)
    # --quiet: the progress display of the steps begun would print its last frame first.
    done = run_orstack("--quiet", "rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), "--reward",
                       f"cmd:{command}", "--max-steps", "1", "--num-generations", "2", "--max-new-tokens", "2",
                       "--log", str(log))
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr)
    assert f"--reward cmd:{command}: exited with status 4: KeyError: rubric.json" in done.stderr
    assert tree_hash(out) == before and log.read_text() == "old log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl-out", "rl.jsonl", "score.py", "t.jsonl"]


def test_grpo_steps_on_a_tiny_model(tmp_path, random_llama):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i),
                                         "kind": "numeric"}) + "\n" for i in range(6)))
    traj = tmp_path / "traj.jsonl"
    traj.write_text(json.dumps({"prompt": "1+1=", "steps": [{"action": "2", "reasoning": "one and one", "reward": 1}]})
                    + "\n")
    out, log = tmp_path / "rl", tmp_path / "rl.jsonl"
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(out), "--max-steps", "2",
                       "--num-generations", "2", "--batch-size", "3", "--max-new-tokens", "4", "--log", str(log),
                       "--reward", "correct", "--reward", "format", "--target-kl", "0.01", "--srl", str(traj),
                       "--top-p", "0.9", "--min-p", "0.05")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # trl's own log printing is off: stdout is for data
    assert "using --batch-size 4" in done.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "completion_length", "kl", "beta", "lr"):
        assert rows[-1][key] is not None, key
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["stage"] == "rl" and manifest["base"] == str(random_llama)
    assert manifest["args"]["beta"] == 0.02 and manifest["metrics"]["steps"] == 2
    assert manifest["args"]["top_p"] == 0.9 and manifest["args"]["min_p"] == 0.05
    assert manifest["metrics"]["srl_rows"] == 1 and manifest["metrics"]["srl_steps"] == 1  # SRL ran first

    # The manifest is the config: it loads back into exactly the run's RLConfig.
    from orstack.io.manifest import config_from_manifest
    from orstack.rl import RewardConfig, RLConfig
    from orstack.train.config import TrainConfig

    assert manifest["config_class"] == "orstack.rl.grpo:RLConfig"
    assert config_from_manifest(manifest) == RLConfig(
        tasks=str(tasks), train=TrainConfig(epochs=1.0, max_steps=2, lr=1e-4, batch_size=3, log=str(log)),
        rewards=RewardConfig(rewards=("correct", "format")), num_generations=2, max_new_tokens=4, top_p=0.9,
        min_p=0.05, target_kl=0.01, srl=str(traj))

    from orstack.io.checkpoint import load_model

    model, _ = load_model(out)  # base + adapter, as bench loads it
    assert model.config.model_type == "llama"


def test_rl_cli_defaults_are_the_config_defaults():
    from orstack.rl import RewardConfig, RLConfig
    from orstack.train.config import TrainConfig

    cli = cli_defaults("rl")
    config = RLConfig(tasks="t.jsonl")
    train = {f.name for f in dataclasses.fields(TrainConfig)} & set(cli)
    rewards = {"efficiency_weight": "efficiency_weight", "target_length": "target_length",
               "format_regex": "format_regex", "clip_reward": "clip", "efficiency_formula": "efficiency_formula"}
    top = {f.name for f in dataclasses.fields(RLConfig)} & set(cli) - {"tasks"}
    renamed = {"vllm": "use_vllm"}  # option name -> RLConfig field
    # --reward is repeatable: none given means the correctness reward alone.
    assert set(cli) == {"model", "tasks", "output", "reward"} | train | set(rewards) | top | set(renamed)
    assert {o: cli[o] for o in renamed} == {o: getattr(config, f) for o, f in renamed.items()}
    assert cli["reward"] == [] and RewardConfig().rewards == ("correct",)
    # repeatable options default to [] in typer and () in the config
    assert {n: _tuple(cli[n]) for n in train} == {n: getattr(config.train, n) for n in train}
    assert {o: cli[o] for o in rewards} == {o: getattr(config.rewards, f) for o, f in rewards.items()}
    assert {n: cli[n] for n in top} == {n: getattr(config, n) for n in top}
    assert cli_defaults()["seed"] == config.train.seed


@pytest.mark.slow
def test_rl_runs_under_torchrun_with_two_gloo_processes(tmp_path, random_llama):
    import os
    import shutil
    import socket
    from pathlib import Path

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    orstack_bin = shutil.which("orstack") or str(Path(sys.executable).parent / "orstack")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i),
                                         "kind": "numeric"}) + "\n" for i in range(4)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "rl.jsonl"
    env = dict(os.environ, ORSTACK_LOG=str(log))
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), orstack_bin, "rl",
                           str(random_llama), "--tasks", str(tasks), "-o", str(tmp_path / "out"), "--max-steps", "2",
                           "--num-generations", "2", "--max-new-tokens", "4"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert len(log.read_text().splitlines()) == 2


def _tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
