"""RL with verifiable rewards on trl's GRPOTrainer: orstack supplies the rewards, a batch
shape that cannot fail trl's divisibility checks, adaptive KL, a per-step JSONL log and
progress, and the SRL stage (step-wise SFT weighted by step reward) before RL."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.rl.rewards import RewardConfig
from orstack.train.config import TrainConfig

if TYPE_CHECKING:
    from orstack.runtime import Runtime


@dataclass
class RLConfig:
    """Everything that determines an `rl` output; the manifest stores it whole."""

    tasks: str  # Task JSONL with answers (or tests)
    # batch_size 0: one group of num_generations completions per device
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, lr=1e-4, batch_size=0))
    rewards: RewardConfig = field(default_factory=RewardConfig)
    num_generations: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling; < 1 keeps small models' stray tokens out of the samples
    min_p: float | None = None  # drop tokens below min_p x the top token's probability
    beta: float = 0.02
    target_kl: float | None = None  # adaptive beta toward this KL
    kl_rule: str = "proportional"  # proportional (Ziegler et al.) or double-halve (PPO's rule)
    kl_horizon: int = 100  # steps over which the proportional controller moves beta by its full error
    loss_type: str = "dapo"  # trl's loss aggregation: dapo (its default), grpo (length-biased), dr_grpo, bnpo
    importance_sampling: str = "token"  # token, or sequence (GSPO)
    scale_rewards: str = "group"  # advantages divided by the reward std of the group, the batch, or none
    zero_std_warn: float = 0.5  # warn when more than this fraction of groups has no reward spread
    srl: str | None = None  # trajectories for the step-wise SFT stage
    srl_epochs: float = 1.0
    srl_weighting: str = "zscore"  # step rewards z-scored over all steps (below-average steps pushed down), or
    #                                "positive": steps with reward > 0 weighted by their reward (plain weighted SFT)
    srl_beta: float = 0.05  # the SRL stage's own KL coefficient to the model it starts from
    srl_max_kl: float | None = 0.1  # nats per token: the coefficient doubles whenever a step's KL exceeds it
    chat_template: str | None = None  # None: `messages` tasks only; "model" or a .jinja path: every task
    use_vllm: bool = False  # trl generates the completions with vLLM in this process (needs vLLM and a GPU)
    # the quality gate on the --eval tasks (orstack/gates.py): the output's accuracy against the source's
    max_accuracy_drop: float = 2.0  # points
    force: bool = False


@dataclass
class BatchShape:
    batch_size: int  # completions per device per forward pass
    grad_accum: int
    note: str | None  # what was changed, when it was


def choose_batch(batch_size: int, grad_accum: int, num_generations: int, processes: int = 1) -> BatchShape:
    """trl needs batch x processes x grad_accum (the generation batch) divisible by num_generations.
    0 means "choose": one group per device. An incompatible batch is raised to the next one that
    fits, and the note says so exactly."""
    if num_generations < 2:
        raise BadInput(f"--num-generations must be at least 2 (GRPO compares completions within a group), "
                       f"got {num_generations}")
    if batch_size == 0:
        batch_size = num_generations
    fixed = batch_size
    while (fixed * processes * grad_accum) % num_generations:
        fixed += 1
    note = None
    if fixed != batch_size:
        note = (f"--batch-size {batch_size} x {processes} process(es) x --grad-accum {grad_accum} is not a multiple of "
                f"--num-generations {num_generations}; using --batch-size {fixed}")
    return BatchShape(fixed, grad_accum, note)


def load_tasks(path: str, need_answers: bool, fits: Callable[[Any], str | None] | None = None,
               chat: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Tasks for RL ('-': standard input): every row needs a string prompt, and (for the correctness
    reward) what bench verifies; ids, where given, are unique. `fits(prompt)` says why a prompt does
    not fit the model (None when it does). A task may ask with `messages` (a conversation) instead
    of `prompt`: trl's conversational format; `chat(where)` fails when no template is there for it.
    Errors name file:line and the field."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered
    from orstack.tasks.contract import infer_kind, prompt_of, validate_messages, validate_task

    tasks = []
    first_line: dict[Any, int] = {}
    for lineno, row in read_jsonl_numbered(path):
        where = f"{display_name(path)}:{lineno}"
        if row.get("messages") is not None or "messages" in row:
            if row.get("prompt") is not None:
                raise BadInput(f"{where}: fields 'prompt' and 'messages': give exactly one of them")
            validate_messages(row["messages"], where)
            if chat is not None:
                chat(where)
        elif row.get("prompt") is None:
            raise BadInput(f"{where}: missing required field 'prompt' (or 'messages')")
        if need_answers:
            row["kind"] = infer_kind(row)
            validate_task(row, where, fields=("prompt", "kind"))
            if row["kind"] == "text":
                raise BadInput(f"{where}: kind 'text' has no answer to verify; the correctness reward needs "
                               "answer (or tests for code)")
        elif row.get("messages") is None and not isinstance(row["prompt"], str):
            raise BadInput(f"{where}: field 'prompt': expected a string, got {type(row['prompt']).__name__}")
        if "id" in row:
            key = json.dumps(row["id"])
            if key in first_line:
                raise BadInput(f"{where}: field 'id': duplicate id {row['id']!r} (first on line {first_line[key]})")
            first_line[key] = lineno
        too_long = fits(prompt_of(row)) if fits is not None else None
        if too_long:
            raise BadInput(f"{where}: field '{'prompt' if row.get('messages') is None else 'messages'}': {too_long}")
        tasks.append(row)
    if not tasks:
        raise BadInput(f"{display_name(path)}: no tasks")
    return tasks


# Past this many characters per token of context only a prefix of a prompt is tokenized: enough
# to tell that a 10 MB prompt is too long, in milliseconds instead of minutes and gigabytes.
PROBE_CHARS = 64


def prompt_fit(source: str, template: str | None = None) -> Callable[[Any], str | None]:
    """From the model's tokenizer and config (no weights): a check that a prompt is no longer than
    the model's context (`max_position_embeddings`), giving the reason when it is; a conversation
    is counted as `template` renders it."""
    from orstack.io.checkpoint import load_config, load_tokenizer

    tokenizer = load_tokenizer(source)
    context = getattr(load_config(source), "max_position_embeddings", None)

    def fits(prompt: Any) -> str | None:
        if not context:
            return None
        if not isinstance(prompt, str):
            n_tokens = len(tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=True,
                                                         add_generation_prompt=True, return_dict=False))
            return None if n_tokens <= context else (f"{n_tokens} tokens, more than the context of {source} "
                                                     f"({context} tokens)")
        probe = PROBE_CHARS * (context + 1)
        n_tokens = len(tokenizer(prompt[:probe])["input_ids"])
        if n_tokens <= context and len(prompt) > probe:
            n_tokens = len(tokenizer(prompt)["input_ids"])
        if n_tokens <= context:
            return None
        counted = (f"{n_tokens} tokens" if len(prompt) <= probe else
                   f"its first {probe} of {len(prompt)} characters alone are {n_tokens} tokens")
        return f"{counted}, more than the context of {source} ({context} tokens)"

    return fits


SRL_WEIGHTINGS = ("zscore", "positive")


def srl_examples(path: str, weighting: str = "positive") -> list[dict[str, Any]]:
    """Trajectory rows -> one training row per step: the prompt and the steps before it, then the
    step (reasoning, then action). `positive`: steps with a positive reward, weighted by it.
    `zscore`: every step, weighted by its reward's z-score over all steps (steps worse than the
    average get negative weight: their likelihood is pushed down; with equal rewards every step
    weighs 1)."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    rows = []
    for lineno, traj in read_jsonl_numbered(path, required=("prompt", "steps")):
        where = f"{display_name(path)}:{lineno}"
        if not isinstance(traj["steps"], list) or not traj["steps"]:
            raise BadInput(f"{where}: field 'steps': expected a non-empty list")
        context = traj["prompt"]
        for n, step in enumerate(traj["steps"]):
            if not isinstance(step, dict) or not isinstance(step.get("action"), str):
                raise BadInput(f"{where}: steps[{n}]: missing required field 'action'")
            text = (f"{step['reasoning']}\n" if step.get("reasoning") else "") + step["action"] + "\n"
            reward = step.get("reward", 1.0)
            if not isinstance(reward, (int, float)):
                raise BadInput(f"{where}: steps[{n}]: field 'reward' is not a number")
            if reward > 0 or weighting == "zscore":
                rows.append({"prompt": context, "response": text, "weight": float(reward)})
            context += text
    if not rows:
        raise BadInput(f"{display_name(path)}: no step with a positive reward")
    if weighting == "zscore":
        rewards = [r["weight"] for r in rows]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        for r in rows:
            r["weight"] = (r["weight"] - mean) / std if std > 0 else 1.0
    return rows


def make_callback(config: RLConfig, log_path: str | None, total_steps: int,  # noqa: ANN201 - a trl callback
                  validator: Any = None):
    """A trl TrainerCallback: JSONL log row per step, progress with reward/accuracy/KL, adaptive KL,
    the zero-reward-spread tally, and validation (every --eval-every steps and at the end, early
    stopping, the best weights put back) when `validator` is given."""
    from transformers import TrainerCallback

    from orstack.console import progress

    class Callback(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None
            self.rows: list[dict[str, Any]] = []
            self.log = Path(log_path).open("w", encoding="utf-8") if log_path else None
            self.bar = progress()
            self.task = None
            self.start = time.perf_counter()
            self.pending: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - trl's hook signature
            self.bar.start()
            self.task = self.bar.add_task("rl", total=total_steps, unit="steps")

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if not logs or "reward" not in logs:
                return
            row = {"step": state.global_step, "reward_mean": logs.get("reward"), "reward_std": logs.get("reward_std"),
                   "accuracy": logs.get("rewards/correct/mean"),
                   "completion_length": logs.get("completions/mean_length"), "kl": logs.get("kl"),
                   "beta": getattr(self.trainer, "beta", config.beta), "lr": logs.get("learning_rate"),
                   "frac_reward_zero_std": logs.get("frac_reward_zero_std"), "loss": logs.get("loss"),
                   "elapsed_s": round(time.perf_counter() - self.start, 3)}
            row.update({k: v for k, v in logs.items() if k.startswith("rewards/")})
            row.update(self.pending)
            self.pending = {}
            self.rows.append(row)
            if self.log:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
            if config.target_kl and row["kl"] is not None and self.trainer is not None and self.trainer.beta > 0:
                self.trainer.beta = adaptive_beta(self.trainer.beta, row["kl"], config.target_kl, config.kl_horizon,
                                                  config.kl_rule)
            desc = f"rl reward {row['reward_mean']:.3f}"
            if row["accuracy"] is not None:
                desc += f" acc {row['accuracy']:.2f}"
            if row["kl"] is not None:
                desc += f" kl {row['kl']:.4f}"
            self.bar.update(self.task, completed=state.global_step, description=desc)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            every = config.train.eval_every
            if validator is None or self.trainer is None:
                return
            if state.global_step == total_steps or (every and state.global_step % every == 0):
                if validator.check(state.global_step, self.trainer.model):
                    control.should_training_stop = True
                # trl logs the step after this hook: the figures join that step's row
                self.pending = {f"eval/{k}": v for k, v in validator.checks[-1].figures.items()}

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if validator is not None and self.trainer is not None:
                validator.restore_best(self.trainer.model)
            self.close()

        def close(self) -> None:
            self.bar.stop()
            if self.log:
                self.log.close()
                self.log = None

    return Callback()


def adaptive_beta(beta: float, kl: float, target: float, horizon: int, rule: str = "proportional") -> float:
    """Adapt the KL coefficient toward `target`: `proportional` is the controller of Ziegler et al.
    (2019), moving beta by the clipped proportional error over `horizon` steps; `double-halve` is
    PPO's rule (Schulman et al., 2017) as the recipe orstack follows states it: double beta when
    the KL is above 1.5 x target, halve it below 0.5 x target."""
    if rule == "double-halve":
        if kl > 1.5 * target:
            return beta * 2.0
        if kl < 0.5 * target:
            return beta / 2.0
        return beta
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + error / horizon)


LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
KL_RULES = ("proportional", "double-halve")


def check_choices(config: RLConfig) -> None:
    from orstack.rl.rewards import EFFICIENCY_FORMULAS

    for flag, value, allowed in (("--loss-type", config.loss_type, LOSS_TYPES),
                                 ("--importance-sampling", config.importance_sampling, IMPORTANCE_SAMPLING),
                                 ("--scale-rewards", config.scale_rewards, SCALE_REWARDS),
                                 ("--kl-rule", config.kl_rule, KL_RULES),
                                 ("--efficiency-formula", config.rewards.efficiency_formula, EFFICIENCY_FORMULAS)):
        if value not in allowed:
            raise BadInput(f"{flag} {value}: expected one of {', '.join(allowed)}")


@dataclass
class RLResult:
    """What `rl` reports; `kind` (adapter, merged or full) is None on the processes of a torchrun
    that do not write."""

    steps: int
    seconds: float
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    notes: list[str]
    kind: str | None = None
    output: Path | None = None


REWARDS = ("correct", "format")


def run(source: str, output: str | Path, config: RLConfig, runtime: Runtime) -> RLResult:
    """`orstack rl`: check the model, tasks, trajectories, rewards and outputs (nothing loads before
    they pass), then SRL (optional) and GRPO, and save the result (rank 0 only)."""
    import re

    from orstack.io.checkpoint import check_checkpoint
    from orstack.io.command import check_command
    from orstack.io.output import Output, check_outputs
    from orstack.train.distributed import main_process_log
    from orstack.train.lora import save_trained

    tc = config.train
    check_checkpoint(source)  # exists, sound weight headers, a causal LM
    from orstack.gates import check_limits

    check_limits(max_accuracy_drop=config.max_accuracy_drop)
    if config.tasks != "-" and not Path(config.tasks).is_file():
        raise BadInput(f"{config.tasks}: no such file")
    if config.srl is not None and not Path(config.srl).is_file():
        raise BadInput(f"--srl {config.srl}: no such file")
    for r in config.rewards.rewards:
        if r not in REWARDS and not r.startswith("cmd:"):
            raise BadInput(f"--reward {r}: expected correct, format or cmd:COMMAND")
        if r.startswith("cmd:"):
            check_command(f"--reward {r}", r[4:].strip() or " ")
    if config.rewards.format_regex is not None:
        try:
            re.compile(config.rewards.format_regex)
        except re.error as e:
            raise BadInput(f"--format-regex: {e}") from None
    tc.check()
    check_choices(config)
    if config.use_vllm:
        from orstack.backends.vllm import check_vllm_available

        check_vllm_available("--vllm")
    choose_batch(tc.batch_size, tc.grad_accum, config.num_generations, runtime.world_size)  # bad shapes fail first
    check_outputs([Output(output, "dir", "-o"), Output(tc.log, "file", "--log")],
                  inputs=[source, config.tasks, config.srl])
    template = rl_template(source, config.chat_template)
    tasks = load_tasks(config.tasks, need_answers="correct" in config.rewards.rewards,
                       fits=prompt_fit(source, template), chat=None if template else _no_template(source))
    if config.chat_template is not None and template is None:
        raise BadInput(f"--chat-template model: {source} has no chat template; pass --chat-template FILE.jinja")
    conversational = {t.get("messages") is not None for t in tasks}
    if config.chat_template is None and len(conversational) > 1:
        raise BadInput(f"{config.tasks}: both `messages` and `prompt` tasks; trl takes one format per run: pass "
                       "--chat-template model to ask the prompts as user turns, or split the file")
    mix = [(load_tasks(path, need_answers="correct" in config.rewards.rewards, fits=prompt_fit(source, template),
                       chat=None if template else _no_template(source)), weight) for path, weight in tc.mix_weights()]
    eval_sets = None
    if tc.eval_data:
        from orstack.train.validate import read_eval_sets

        eval_sets = read_eval_sets(tc.eval_data)
    if config.srl is not None:
        if config.srl_weighting not in SRL_WEIGHTINGS:
            raise BadInput(f"--srl-weighting {config.srl_weighting}: expected one of {', '.join(SRL_WEIGHTINGS)}")
        srl_examples(config.srl, config.srl_weighting)
    with main_process_log(tc.log, runtime) as log_path:
        trained, tokenizer, result = run_rl(source, tasks, config, runtime, log_path=log_path, mix=mix,
                                            eval_sets=eval_sets)
    result.output = Path(output)
    verdict = _gate(config, result.metrics)
    if runtime.is_main_process:
        result.kind = save_trained(trained, tokenizer, Path(output), stage="rl", config=tc, base=source, args=config,
                                   metrics=result.metrics, extra={"gate": verdict.record()})
    return result


def _gate(config: RLConfig, metrics: dict[str, Any]):  # noqa: ANN202 - orstack.gates.Verdict
    """Accuracy on the --eval tasks may not fall more than --max-accuracy-drop points below the source's."""
    from orstack.gates import TaskScore, decide, training_checks

    checks = []
    if "eval_before" in metrics:
        before, after = TaskScore.from_dict(metrics["eval_before"]), TaskScore.from_dict(metrics["eval_after"])
        checks = training_checks(before, after, max_accuracy_drop=config.max_accuracy_drop,
                                 on=", ".join(config.train.eval_data))
    return decide("rl", checks, config.force)


def rl_template(source: str, choice: str | None) -> str | None:
    """The chat template conversational tasks go through: the --chat-template file, else the
    model's own (None when it has none)."""
    from orstack.backends.chat import template_file_text
    from orstack.io.checkpoint import load_tokenizer

    text = template_file_text(choice)
    if text is not None:
        return text
    own = getattr(load_tokenizer(source), "chat_template", None)
    return own if isinstance(own, str) else None


def _no_template(source: str) -> Callable[[str], None]:
    from orstack.backends.chat import no_template_message

    def fail(where: str) -> None:
        raise BadInput(no_template_message(source, where))

    return fail


def _reference_logits(model: Any, frozen: Any) -> Callable[[Any, Any], Any]:
    """The logits of the model SRL started from: a frozen copy (full fine-tuning) or the same
    model with its LoRA adapter switched off."""
    if frozen is not None:
        return lambda ids, mask: frozen(input_ids=ids, attention_mask=mask).logits

    def without_adapter(ids: Any, mask: Any) -> Any:
        with model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask).logits

    return without_adapter


def trl_prompt(task: dict[str, Any], choice: str | None) -> Any:
    """The dataset's `prompt` as trl takes it: a conversation (trl's conversational format, which
    GRPOTrainer renders with the tokenizer's chat template and the generation prompt) for a
    `messages` task, and for every task under --chat-template; else the string as-is."""
    if task.get("messages") is not None:
        return [{"role": m["role"], "content": m["content"]} for m in task["messages"]]
    if choice is not None:
        return [{"role": "user", "content": task["prompt"]}]
    return task["prompt"]


def run_rl(model_spec: str, tasks: list[dict[str, Any]], config: RLConfig, runtime: Runtime, *,
           log_path: str | None = None, mix: list[tuple[list[dict[str, Any]], float]] | None = None,
           eval_sets: list[Any] | None = None) -> tuple[Any, Any, RLResult]:
    """SRL stage (optional), then GRPO on `tasks` (with `mix` sources drawn beside them by weight,
    validating on `eval_sets`). Returns (trained model, tokenizer, result)."""
    import warnings

    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from orstack.io.checkpoint import load_model, quiet_transformers
    from orstack.rl.rewards import build_rewards
    from orstack.runtime import seed_everything
    from orstack.train.lora import apply_lora

    # transformers 5 deprecation notices raised by trl/peft internals: not the user's concern.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    if not runtime.is_main_process:
        from orstack.console import set_quiet

        set_quiet(True)
    tc = config.train
    shape = choose_batch(tc.batch_size, tc.grad_accum, config.num_generations, runtime.world_size)
    notes = [shape.note] if shape.note else []
    device = runtime.torch_device()
    seed_everything(tc.seed)
    quiet_transformers()
    model, tokenizer = load_model(model_spec, device=device, trust_pickle=runtime.trust_pickle)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from orstack.gates import eval_set_tasks, measure_tasks

    gate_tasks = eval_set_tasks(eval_sets)
    parent = (measure_tasks(model, tokenizer, gate_tasks, name="parent", chat_template=config.chat_template)
              if gate_tasks else None)
    from orstack.backends.chat import template_file_text

    chat_file = template_file_text(config.chat_template)
    if chat_file is not None:  # trl renders conversations with the tokenizer's template: use the file's
        tokenizer.chat_template = chat_file
    rewards = build_rewards(config.rewards, tokenizer.eos_token_id)

    peft_config = None
    srl_metrics: dict[str, Any] = {}
    if config.srl:
        from dataclasses import replace

        from orstack.train.data import encode_rows
        from orstack.train.distributed import init_distributed
        from orstack.train.sft import train_sft

        reference = None
        if tc.full:
            import copy

            reference = copy.deepcopy(model).eval()  # the model SRL starts from, frozen
            for p in reference.parameters():
                p.requires_grad_(False)
        else:
            model = apply_lora(model, tc)
        srl_cfg = replace(tc, max_steps=None, epochs=config.srl_epochs, batch_size=max(1, shape.batch_size), log=None,
                          eval_data=(), eval_every=0, early_stop=0, save_best=None, mix=(), rehearsal=0.0)
        data = encode_rows(tokenizer, srl_examples(config.srl, config.srl_weighting), tc.max_length, config.srl)
        kl_term = None
        if config.srl_beta > 0:
            from orstack.train.sft import ReferenceKL

            kl_term = ReferenceKL(config.srl_beta, config.srl_max_kl, _reference_logits(model, reference))
        init_distributed(runtime)
        srl = train_sft(model, tokenizer, data, srl_cfg, rank=runtime.rank, world_size=runtime.world_size,
                        progress_desc="srl", reference_kl=kl_term)
        srl_metrics = {"srl_steps": srl.steps, "srl_rows": srl.examples, "srl_loss_first": srl.loss_first,
                       "srl_loss_last": srl.loss_last, "srl_weighting": config.srl_weighting}
        if kl_term is not None:
            kls = [r["kl"] for r in srl.history if "kl" in r]
            srl_metrics.update(srl_kl_max=max(kls) if kls else None, srl_kl_last=kls[-1] if kls else None,
                               srl_beta_final=kl_term.beta, srl_beta_raised=kl_term.raised)
        del reference
    elif not tc.full:
        from orstack.train.lora import lora_config

        peft_config = lora_config(model, tc)  # the decoder's linears by structure, per-module ranks

    import tempfile

    workdir = tempfile.TemporaryDirectory(prefix="orstack-rl-")
    drawn = mixed_tasks(tasks, mix or [], tc.rehearsal, tc.seed)
    dataset = Dataset.from_list([{"prompt": trl_prompt(t, config.chat_template), "task": json.dumps(t)}
                                 for t in drawn])
    rows_per_step = shape.batch_size * shape.grad_accum * runtime.world_size // config.num_generations
    steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(drawn) / max(1, rows_per_step)))
    args = grpo_args(config, shape, steps, device, workdir.name)
    from orstack.train.validate import make_validator

    validator = make_validator(tc, tokenizer, config.chat_template, eval_sets)
    callback = make_callback(config, log_path, steps, validator)
    torch.manual_seed(tc.seed)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
    callback.trainer = trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # transformers prints log dicts to stdout without tqdm: stdout is for data only.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        callback.close()
        workdir.cleanup()
    seconds = time.perf_counter() - start
    history = callback.rows
    zero = [r["frac_reward_zero_std"] for r in history if r.get("frac_reward_zero_std") is not None]
    metrics = summarize(history, steps, seconds)
    metrics.update(srl_metrics)
    if validator is not None:
        metrics.update(validator.summary())
    if mix:
        metrics["mix_rows"] = len(drawn)
    if any(not isinstance(row, str) for row in dataset["prompt"]):
        from orstack.backends.chat import template_record

        metrics.update(template_record(config.chat_template, tokenizer.chat_template))
    if zero and sum(zero) / len(zero) > config.zero_std_warn:
        notes.append(f"{100 * sum(zero) / len(zero):.0f}% of groups had identical rewards for all "
                     f"{config.num_generations} completions (no learning signal); try more --num-generations, "
                     "a higher --temperature, or tasks nearer the model's ability")
    model = trainer.model
    model.eval()
    if parent is not None:
        child = measure_tasks(model, tokenizer, gate_tasks, name="trained", chat_template=config.chat_template)
        metrics["eval_before"], metrics["eval_after"] = parent.as_dict(), child.as_dict()
    return model, tokenizer, RLResult(steps, seconds, history, metrics, notes)


def mixed_tasks(tasks: list[dict[str, Any]], mix: list[tuple[list[dict[str, Any]], float]], rehearsal: float,
                seed: int) -> list[dict[str, Any]]:
    """The RL dataset: the tasks alone, or (with --mix) as many rows as make the main tasks their
    weight's share, each drawn from a source by weight (seeded), as distill train draws batches."""
    if not mix:
        return tasks
    from orstack.train.sft import mixed_batches, mixture

    weights = mixture(len(tasks), mix, rehearsal)
    n = math.ceil(len(tasks) * sum(weights) / weights[0])
    return next(mixed_batches([tasks, *(rows for rows, _ in mix)], weights, n, seed))


def grpo_args(config: RLConfig, shape: BatchShape, steps: int, device: str, output_dir: str) -> Any:
    """trl's GRPOConfig for a run: every orstack option that trl implements lands here."""
    import warnings

    from trl import GRPOConfig

    # transformers 5 deprecation notices raised inside trl's config: not the user's concern.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)

    from orstack.train.config import trl_scheduler

    tc = config.train
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=device == "cpu", report_to=[], beta=config.beta, num_generations=config.num_generations,
        per_device_train_batch_size=shape.batch_size, gradient_accumulation_steps=shape.grad_accum,
        max_completion_length=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        min_p=config.min_p, learning_rate=tc.lr, loss_type=config.loss_type,
        importance_sampling_level=config.importance_sampling, scale_rewards=config.scale_rewards,
        max_steps=steps, logging_steps=1, save_strategy="no", seed=tc.seed, disable_tqdm=True,
        max_grad_norm=tc.max_grad_norm, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_steps,
        lr_scheduler_type=trl_scheduler(tc),
        # colocate: vLLM shares this process's GPU and gets the new weights after each step
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if config.use_vllm else {}),
    )


def summarize(history: list[dict[str, Any]], steps: int, seconds: float) -> dict[str, Any]:
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    head, tail = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
    return {"steps": steps, "seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 4) if seconds else None,
            "reward_first": mean("reward_mean", head), "reward_last": mean("reward_mean", tail),
            "accuracy_first": mean("accuracy", head), "accuracy_last": mean("accuracy", tail),
            "length_first": mean("completion_length", head), "length_last": mean("completion_length", tail),
            "kl_last": history[-1].get("kl") if history else None,
            "frac_reward_zero_std": mean("frac_reward_zero_std", history)}
