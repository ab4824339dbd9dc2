"""`orstack rl`: reinforcement learning with verifiable rewards (GRPO, tight KL, token efficiency)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands import _train_options as T
from orstack.commands.options import ChatTemplate, Force, MaxAccuracyDrop, RequiredOutput, current_runtime

HELP = """Train MODEL with GRPO (trl) on tasks whose answers can be checked.

Rewards compose by flag: --reward correct (bench's verifiers: numeric, exact, choice,
code tests in the sandbox; the default), --reward format (ended by itself, nothing after
the answer, --format-regex), --reward cmd:COMMAND (JSONL rows in, `reward` out), and the
token-efficiency reward for correct answers (up to --efficiency-weight for being shorter
than --target-length tokens, a capped penalty for longer; 0 turns it off). --clip-reward
clips each reward. KL to the reference: --beta (0.02), or adaptive toward --target-kl.
LoRA by default; --merge or --full as in distill train. A batch size that trl would
reject is raised to the next compatible one (and said so). --srl TRAJECTORIES runs a
step-wise SFT stage first: every step weighted by its reward's z-score over all steps
(--srl-weighting positive: rewarded steps by their reward), with its own KL term to the
starting model (--srl-beta, doubled whenever a step's KL exceeds --srl-max-kl). --log
writes one JSONL row per step (reward, accuracy, completion length, KL, beta, lr).

trl's GRPO variants: --loss-type dapo (default) | grpo | dr_grpo | bnpo, --importance-sampling
sequence (GSPO), --scale-rewards group|batch|none; --kl-rule double-halve for PPO's adaptive
KL; --efficiency-formula gentle for the half-slope penalty floored at 2.5 x the weight. The
recipe options of distill train apply too: --warmup, --lr-scheduler, --weight-decay,
--max-grad-norm, --module-ranks, --mix/--rehearsal (more task files drawn by weight),
--eval/--eval-every/--early-stop/--save-best (greedy accuracy on held-out tasks).
Gate (exit 3, nothing written unless --force): on the --eval tasks the output's accuracy
may fall at most --max-accuracy-drop (2) points below the source model's.

Example:

\b
    orstack rl tiny --tasks tasks/train.jsonl -o tiny-rl --max-steps 50 --log rl.jsonl
"""


def rl(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (or an adapter directory).")],
    tasks: Annotated[Path, typer.Option("--tasks", help="Task JSONL with answers (or tests for code; '-' for stdin).")],
    output: RequiredOutput,
    reward: Annotated[list[str], typer.Option("--reward", help="correct, format or cmd:COMMAND (repeatable).")] = [],  # noqa: B006
    efficiency_weight: Annotated[float, typer.Option("--efficiency-weight", min=0.0,
                                                    help="Largest efficiency bonus/penalty (0: off).")] = 0.2,
    target_length: Annotated[int, typer.Option("--target-length", min=1, help="Efficiency target, tokens.")] = 16,
    format_regex: Annotated[str | None, typer.Option("--format-regex", help="Answer must match (format).")] = None,
    clip_reward: Annotated[float | None, typer.Option("--clip-reward", min=0.0, help="Clip each reward.")] = None,
    beta: Annotated[float, typer.Option("--beta", min=0.0, help="KL coefficient to the reference.")] = 0.02,
    target_kl: Annotated[float | None, typer.Option("--target-kl", min=1e-9, help="Adapt beta toward this KL.")] = None,
    num_generations: Annotated[int, typer.Option("--num-generations", help="Completions per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Completion budget.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01, help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.01, max=1.0, help="Nucleus sampling: keep the most "
                                         "likely tokens up to this probability mass.")] = 1.0,
    min_p: Annotated[float | None, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens less likely than "
                                                "this fraction of the most likely one.")] = None,
    srl: Annotated[Path | None, typer.Option("--srl", help="Trajectory JSONL for a step-wise SFT stage.")] = None,
    srl_weighting: Annotated[str, typer.Option("--srl-weighting", help="zscore (step rewards normalised over all "
                                               "steps) or positive (reward-weighted SFT on rewarded steps).")
                             ] = "zscore",
    srl_beta: Annotated[float, typer.Option("--srl-beta", min=0.0, help="The SRL stage's KL coefficient to the "
                                            "starting model (0: none).")] = 0.05,
    srl_max_kl: Annotated[float | None, typer.Option("--srl-max-kl", min=1e-9, help="KL bound per token: the SRL "
                                                     "coefficient doubles whenever a step exceeds it.")] = 0.1,
    epochs: T.Epochs = 1.0,
    max_steps: T.MaxSteps = None,
    lr: T.LearningRate = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=0,
                                            help="Completions per forward pass (0: --num-generations).")] = 0,
    grad_accum: T.GradAccum = 1,
    lora_rank: T.LoraRank = 8,
    lora_alpha: T.LoraAlpha = None,
    target_modules: T.TargetModules = "all-linear",
    merge: T.Merge = False,
    full: T.Full = False,
    log: T.Log = None,
    loss_type: Annotated[str, typer.Option("--loss-type", help="trl's loss: dapo (its default), grpo "
                                           "(length-biased), dr_grpo or bnpo.")] = "dapo",
    importance_sampling: Annotated[str, typer.Option("--importance-sampling", help="Importance ratios per token, "
                                                     "or per sequence (GSPO).")] = "token",
    scale_rewards: Annotated[str, typer.Option("--scale-rewards", help="Divide advantages by the reward std of "
                                               "the group, the batch, or none (Dr. GRPO).")] = "group",
    kl_rule: Annotated[str, typer.Option("--kl-rule", help="How --target-kl adapts beta: proportional, or "
                                         "double-halve (x2 above 1.5 x target, /2 below 0.5 x).")] = "proportional",
    efficiency_formula: Annotated[str, typer.Option("--efficiency-formula", help="Over-length penalty: capped "
                                                    "(correct answers, at most the weight) or gentle (every "
                                                    "answer, half the slope, at most 2.5 x the weight).")
                                  ] = "capped",
    warmup_steps: T.Warmup = 0,
    lr_scheduler: T.LrScheduler = "linear",
    weight_decay: T.WeightDecay = 0.0,
    max_grad_norm: T.MaxGradNorm = 1.0,
    module_ranks: T.ModuleRanks = None,
    eval_data: T.Eval = [],  # noqa: B006 - typer's repeatable option
    eval_every: T.EvalEvery = 0,
    early_stop: T.EarlyStop = 0,
    save_best: T.SaveBest = None,
    mix: T.Mix = [],  # noqa: B006
    rehearsal: T.Rehearsal = 0.0,
    chat_template: ChatTemplate = None,
    vllm: Annotated[bool, typer.Option("--vllm", help="Generate the completions with vLLM (trl's use_vllm, "
                                       "colocated; needs vLLM and a GPU).")] = False,
    max_accuracy_drop: MaxAccuracyDrop = 2.0,
    force: Force = False,
) -> None:
    from orstack.rl.grpo import RLConfig, run
    from orstack.rl.rewards import RewardConfig
    from orstack.train.config import TrainConfig

    tc = TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                     lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules, merge=merge, full=full,
                     log=str(log) if log else None, seed=current_runtime().seed,
                     **T.recipe(warmup_steps, lr_scheduler, weight_decay, max_grad_norm, module_ranks, eval_data,
                                eval_every, early_stop, save_best, mix, rehearsal))
    rewards = RewardConfig(rewards=tuple(reward) or ("correct",), efficiency_weight=efficiency_weight,
                           target_length=target_length, format_regex=format_regex, clip=clip_reward,
                           efficiency_formula=efficiency_formula)
    config = RLConfig(tasks=str(tasks), train=tc, rewards=rewards, num_generations=num_generations,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, min_p=min_p, beta=beta,
                      target_kl=target_kl, kl_rule=kl_rule, loss_type=loss_type,
                      importance_sampling=importance_sampling, scale_rewards=scale_rewards,
                      srl=str(srl) if srl else None, srl_weighting=srl_weighting, srl_beta=srl_beta,
                      srl_max_kl=srl_max_kl,
                      chat_template=chat_template, use_vllm=vllm, max_accuracy_drop=max_accuracy_drop, force=force)
    result = run(model, output, config, current_runtime())
    if result.kind is None:  # a torchrun process other than rank 0: it trained, rank 0 reports
        return
    for note in result.notes:
        console.warn(note)
    m = result.metrics
    console.info(f"{result.steps} steps in {result.seconds:.1f} s ({m['steps_per_s']} steps/s); reward "
                 f"{_f(m['reward_first'])} -> {_f(m['reward_last'])}, accuracy {_f(m['accuracy_first'])} -> "
                 f"{_f(m['accuracy_last'])}, length {_f(m['length_first'])} -> {_f(m['length_last'])}, "
                 f"final KL {_f(m['kl_last'])}; wrote {result.kind} to {result.output}")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def register(app: typer.Typer) -> None:
    app.command("rl", help=HELP)(rl)
