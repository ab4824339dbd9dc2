"""Training recipes: schedules, per-module ranks, mixing, validation with early stopping and
best-checkpoint selection, and rl's trl options — each flag reaching torch / peft / trl."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_orstack

from orstack.train.config import TrainConfig, lr_multiplier, trl_scheduler


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("scheduler,expected", [
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedules_at_given_steps(scheduler, expected):
    got = [lr_multiplier(step, 6, 2, scheduler) for step in range(6)]
    assert got == pytest.approx(expected)


def test_trl_gets_the_same_schedule_names():
    assert trl_scheduler(TrainConfig(lr_scheduler="cosine")) == "cosine"
    assert trl_scheduler(TrainConfig(lr_scheduler="constant")) == "constant"
    assert trl_scheduler(TrainConfig(lr_scheduler="constant", warmup_steps=3)) == "constant_with_warmup"


def test_mixed_batches_follow_the_weights_and_the_seed():
    from orstack.train.sft import mixed_batches, mixture

    main, general = [("a", i) for i in range(50)], [("g", i) for i in range(20)]
    weights = mixture(len(main), [(general, 1.0)], rehearsal=0.1)
    assert weights == pytest.approx([0.9, 0.1])
    drawn: list[int] = []
    stream = mixed_batches([main, general], weights, 100, seed=3, drawn=drawn)
    rows = [r for _ in range(40) for r in next(stream)]
    share = sum(1 for r in rows if r[0] == "g") / len(rows)
    assert abs(share - 0.1) < 0.02 and drawn == [len(rows) - drawn[1], sum(1 for r in rows if r[0] == "g")]
    again = mixed_batches([main, general], weights, 100, seed=3)
    assert [r for _ in range(40) for r in next(again)] == rows
    other = mixed_batches([main, general], weights, 100, seed=4)
    assert [r for _ in range(40) for r in next(other)] != rows
    assert mixture(10, [(general, 0.5), (general, 1.5)], 0.0) == [1.0, 0.5, 1.5]


class ScriptedValidator:
    """A Validator whose measurements are given, to test selection and patience on a real module."""

    def __new__(cls, values, metric, patience, keep_best):
        from orstack.train.validate import Validator

        class Scripted(Validator):
            def measure(self, model):  # noqa: ANN001, ANN201
                return {metric: values[len(self.checks)]}

        return Scripted([], None, metric, patience=patience, keep_best=keep_best)


def test_validation_keeps_the_best_weights_and_stops_on_patience():
    import torch

    model = torch.nn.Linear(2, 1)
    v = ScriptedValidator([0.2, 0.5, 0.4, 0.45, 0.3], "accuracy", patience=2, keep_best=True)
    stops = []
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0], 1):
        with torch.no_grad():
            model.weight.fill_(value)
        stops.append(v.check(step, model))
    assert stops == [False, False, False, True]  # 0.4 and 0.45 do not beat 0.5
    v.restore_best(model)
    assert model.weight.detach().tolist() == [[2.0, 2.0]]  # the weights of step 2
    summary = v.summary()
    assert summary["eval_best_step"] == 2 and summary["selected_step"] == 2 and summary["eval_last_step"] == 4

    loss = ScriptedValidator([1.0, 0.8, 0.9], "loss", patience=0, keep_best=False)
    assert [loss.check(s, model) for s in (1, 2, 3)] == [False, False, False]
    assert loss.best.step == 2


def test_efficiency_formulas():
    from orstack.rl.rewards import efficiency_bonus

    # capped (orstack's): correct answers only, slope = weight, floor -weight
    assert efficiency_bonus(True, 8, 16, 0.2) == pytest.approx(0.1)
    assert efficiency_bonus(True, 24, 16, 0.2) == pytest.approx(-0.1)
    assert efficiency_bonus(True, 100, 16, 0.2) == pytest.approx(-0.2)
    assert efficiency_bonus(False, 100, 16, 0.2) == 0.0
    # gentle: bonus 0.2 (1 - L/T) for correct, -0.1 (L - T)/T for every long answer, floor -0.5
    assert efficiency_bonus(True, 8, 16, 0.2, "gentle") == pytest.approx(0.1)
    assert efficiency_bonus(False, 8, 16, 0.2, "gentle") == 0.0
    assert efficiency_bonus(True, 24, 16, 0.2, "gentle") == pytest.approx(-0.05)
    assert efficiency_bonus(False, 32, 16, 0.2, "gentle") == pytest.approx(-0.1)
    assert efficiency_bonus(True, 1000, 16, 0.2, "gentle") == pytest.approx(-0.5)


def test_double_halve_kl_rule():
    from orstack.rl.grpo import adaptive_beta

    assert adaptive_beta(0.04, 0.2, 0.1, 100, "double-halve") == pytest.approx(0.08)
    assert adaptive_beta(0.04, 0.04, 0.1, 100, "double-halve") == pytest.approx(0.02)
    assert adaptive_beta(0.04, 0.1, 0.1, 100, "double-halve") == pytest.approx(0.04)
    assert adaptive_beta(0.04, 0.149, 0.1, 100, "double-halve") == pytest.approx(0.04)


def test_rl_options_reach_trls_config(tmp_path):
    from orstack.rl.grpo import BatchShape, RLConfig, grpo_args

    config = RLConfig(tasks="t.jsonl", loss_type="dr_grpo", importance_sampling="sequence", scale_rewards="none",
                      train=TrainConfig(lr=1e-4, batch_size=0, warmup_steps=2, lr_scheduler="cosine",
                                        weight_decay=0.1, max_grad_norm=0.5))
    args = grpo_args(config, BatchShape(4, 1, None), 10, "cpu", str(tmp_path))
    assert (args.loss_type, args.importance_sampling_level, args.scale_rewards) == ("dr_grpo", "sequence", "none")
    assert (str(args.lr_scheduler_type).split(".")[-1].lower(), args.warmup_steps, args.weight_decay,
            args.max_grad_norm) == ("cosine", 2, 0.1, 0.5)
    default = grpo_args(RLConfig(tasks="t.jsonl"), BatchShape(4, 1, None), 10, "cpu", str(tmp_path))
    assert (default.loss_type, default.importance_sampling_level, default.scale_rewards) == ("dapo", "token", "group")


def _rows(path, n, offset=0):
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n"
                            for i in range(offset, offset + n)))
    return path


def test_distill_train_schedule_mix_ranks_and_validation_reach_the_run(tmp_path, random_llama):
    data, general = _rows(tmp_path / "d.jsonl", 6), _rows(tmp_path / "g.jsonl", 6, offset=50)
    tasks = tmp_path / "ev.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"{i}+2=", "answer": str(i + 2),
                                         "kind": "numeric"}) + "\n" for i in range(4)))
    out, log = tmp_path / "lora", tmp_path / "log.jsonl"
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out), "--max-steps", "6",
                       "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--lr-scheduler", "cosine",
                       "--mix", f"{general}:1", "--rehearsal", "0.25", "--module-ranks", "self_attn=4",
                       "--eval", f"{tasks}:0.7", "--eval", f"{general}:0.3", "--eval-every", "3",
                       "--save-best", "loss", "--log", str(log))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    assert lrs == pytest.approx([1e-3 * lr_multiplier(s, 6, 2, "cosine") for s in range(6)])
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    manifest = json.loads((out / "orstack.json").read_text())
    m = manifest["metrics"]
    assert m["mix_weights"] == [0.75, 0.25] and sum(m["mix_drawn"]) == 6 * 4
    assert m["eval_checks"] == 2 and m["selected_step"] in (3, 6)
    best = min(h["loss"] for h in m["eval_history"])
    assert m["eval_best_loss"] == best
    assert "ev/accuracy" in m["eval_history"][0] and "g/loss" in m["eval_history"][0]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert list(adapter["rank_pattern"].values()) == [4] and adapter["r"] == 8
    assert manifest["args"]["train"]["lr_scheduler"] == "cosine"


@pytest.mark.parametrize("extra,message", [
    (["--mix", "nope.jsonl"], "--mix nope.jsonl: no such file"),
    (["--mix", "{g}:heavy"], "weight 'heavy' is not a number"),
    (["--save-best", "accuracy"], "--save-best needs --eval"),
    (["--lr-scheduler", "step"], "--lr-scheduler step: expected one of linear, cosine, constant"),
    (["--rehearsal", "0.2"], "--rehearsal FRACTION draws from the general data"),
    (["--eval", "{g}", "--early-stop", "2"], "--early-stop counts validations"),
    (["--module-ranks", "attn"], "--module-ranks attn: expected NAME=RANK"),
    (["--module-ranks", "nowhere=4"], "--module-ranks: no linear layer"),
    (["--eval", "{g}", "--save-best", "accuracy"], "has training rows, not tasks"),
])
def test_recipe_bad_input_is_one_line_exit_2(tmp_path, random_llama, extra, message):
    data, general = _rows(tmp_path / "d.jsonl", 4), _rows(tmp_path / "g.jsonl", 4)
    out = tmp_path / "o"
    args = [a.replace("{g}", str(general)) for a in extra]
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out), "--max-steps", "1",
                       *args)
    assert done.returncode == 2 and message in done.stderr and one_line(done.stderr), done.stderr
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--loss-type", "ppo"), ("--importance-sampling", "word"),
                                        ("--scale-rewards", "std"), ("--kl-rule", "pid"),
                                        ("--efficiency-formula", "soft")])
def test_rl_choice_bad_input(tmp_path, random_llama, flag, value):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": "2"}) + "\n")
    done = run_orstack("rl", str(random_llama), "--tasks", str(tasks), "-o", str(tmp_path / "o"), flag, value)
    assert done.returncode == 2 and f"{flag} {value}: expected one of" in done.stderr and one_line(done.stderr)
    assert not (tmp_path / "o").exists()


def test_srl_weights_are_z_scores_of_the_step_rewards(tmp_path):
    from orstack.rl.grpo import srl_examples

    path = tmp_path / "traj.jsonl"
    path.write_text(json.dumps({"prompt": "17+25=", "steps": [
        {"action": "2", "reward": 0.5}, {"action": "4", "reward": 1.0}, {"action": "x", "reward": 0.0}]}) + "\n")
    weights = [r["weight"] for r in srl_examples(str(path), "zscore")]
    assert weights == pytest.approx([0.0, 1.2247449, -1.2247449])  # (r - 0.5) / std(0.5, 1, 0)
    assert [r["weight"] for r in srl_examples(str(path), "positive")] == [0.5, 1.0]


def test_srl_reference_kl_is_held_under_its_bound(random_llama):
    """The KL term is zero at the start (the adapter is a no-op) and grows with training; past the
    bound its coefficient doubles."""
    from orstack.io.checkpoint import load_model
    from orstack.rl.grpo import _reference_logits
    from orstack.train.data import encode_rows
    from orstack.train.lora import apply_lora
    from orstack.train.sft import ReferenceKL, train_sft

    model, tokenizer = load_model(str(random_llama), device="cpu")
    model = apply_lora(model, TrainConfig(lora_rank=4))
    rows = [{"prompt": f"{i}+1=", "response": f"{i + 1} and more text", "weight": 1.0} for i in range(8)]
    data = encode_rows(tokenizer, rows, 64)
    term = ReferenceKL(beta=0.01, max_kl=1e-4, reference=_reference_logits(model, None))
    result = train_sft(model, tokenizer, data, TrainConfig(max_steps=6, lr=5e-2, batch_size=4), reference_kl=term)
    kls = [r["kl"] for r in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and max(kls) > 1e-4
    assert term.raised >= 1 and term.beta == pytest.approx(0.01 * 2 ** term.raised)
