"""`orstack distill generate|train`: failure-targeted data from tiered teachers, then fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands import _train_options as T
from orstack.commands.options import (
    ChatTemplate,
    Force,
    MaxAccuracyDrop,
    MaxClusterDrop,
    Output,
    RequiredOutput,
    current_runtime,
)

distill_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)

GENERATE_HELP = """Ask tiered teachers for verified worked examples of what the student got wrong.

Reads annotated failures (bench Result rows with cluster/cluster_label from
cluster-failures; rows with correct=true are skipped). For each cluster, the teachers
answer the failures and, with --per-cluster N, N new problems made from the cluster's
representatives. Teachers are tiers, cheapest first: a task goes to the next --teacher
only when the verifier (bench's numeric/exact/choice/code scoring) rejects the answer.
Teachers never see `answer` or `tests`. Writes Training Example rows (source = tier),
near-duplicates removed, and prints asked/accepted/escalated per cluster and tier.
--per-cluster auto --budget N shares N new problems among the clusters in proportion to
their failures; the teacher is shown the cluster's label and a few of its failures (a
conversation's new problem replaces its last user turn). --exclude TASKS (repeatable)
rejects any new problem that repeats one of those tasks: keep the held-out half out of
the training data.
Open-ended (`kind: text`) answers have no verifier: with --judge SPEC (any teacher SPEC;
a cmd: judge gets rows with question/response/reference/rubric and answers `response`
with the score) each is graded 1-10 and kept at --judge-min (8) or above.

A --teacher is a checkpoint directory, a .gguf file, http(s)://HOST:PORT/v1#MODEL
(OpenAI-compatible; key from $OPENAI_API_KEY or --api-key-env) or cmd:COMMAND (Task
JSONL on stdin, JSONL with `response` on stdout).

Example:

\b
    orstack distill generate --failures failures.jsonl --teacher cmd:'python oracle.py' \\
        --teacher http://127.0.0.1:8080/v1#big --per-cluster 20 -o train.jsonl
"""


def generate(
    failures: Annotated[Path, typer.Option("--failures", help="Annotated failures JSONL ('-' for stdin).")],
    teacher: Annotated[list[str], typer.Option("--teacher", help="Teacher SPEC; repeat for tiers, cheapest first.")],
    output: Output = None,
    per_cluster: Annotated[str, typer.Option("--per-cluster", help="New problems per cluster, or auto: --budget "
                                             "shared in proportion to each cluster's failures.")] = "0",
    budget: Annotated[int | None, typer.Option("--budget", min=1, help="New problems in all, with --per-cluster "
                                               "auto.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Teacher SPEC grading `text` answers 1-10 "
                                              "(kept at --judge-min or above).")] = None,
    judge_min: Annotated[float, typer.Option("--judge-min", min=1.0, max=10.0, help="Lowest judge score kept.")
                         ] = 8.0,
    judge_rubric: Annotated[Path | None, typer.Option("--judge-rubric", help="Rubric file with {question} and "
                                                      "{response} (default: orstack's).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Teacher answer budget.")] = 64,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable; default: the task's).")] = [],  # noqa: B006
    timeout: Annotated[float, typer.Option("--timeout", min=0.01, help="Seconds per request (or cmd: run).")] = 60.0,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Retries per endpoint request.")] = 3,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Parallel endpoint requests.")] = 4,
    rate_limit: Annotated[float | None, typer.Option("--rate-limit", min=0.001, help="Endpoint requests/s.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Variable holding the API key.")] = "OPENAI_API_KEY",
    teacher_api: Annotated[str, typer.Option("--teacher-api", help="Endpoint API: chat or completions.")] = "chat",
    report: Annotated[Path | None, typer.Option("--report", help="Also write the report as JSON.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", metavar="I/N",
                                              help="Only the I-th (from 0) of N contiguous blocks of the clusters; "
                                                   "the N outputs concatenated are the whole run's.")] = None,
    exclude: Annotated[list[Path], typer.Option("--exclude", help="Task JSONL no new problem may repeat "
                                                "(repeatable; e.g. the held-out tasks).")] = [],  # noqa: B006
    chat_template: ChatTemplate = None,
) -> None:
    from orstack.distill.generate import GenerateConfig, run_generate
    from orstack.teachers import TeacherOptions

    options = TeacherOptions(max_new_tokens=max_new_tokens, stop=list(stop), timeout=timeout, retries=retries,
                             concurrency=concurrency, rate_limit=rate_limit, api_key_env=api_key_env,
                             api=teacher_api, chat_template=chat_template)
    from orstack.teachers.judge import JudgeConfig

    judging = JudgeConfig(judge, min_score=judge_min, rubric=str(judge_rubric) if judge_rubric else None) if judge \
        else None
    config = GenerateConfig(failures=str(failures), teachers=list(teacher),
                            per_cluster=int(per_cluster) if per_cluster.isdigit() else per_cluster, budget=budget,
                            teacher=options, judge=judging, shard=shard, exclude=[str(p) for p in exclude],
                            seed=current_runtime().seed)
    result = run_generate(output, config, current_runtime(), report=report)
    for note in result.notes:
        console.warn(note)
    show_report(result.report)
    console.info(f"{result.examples} training examples from {result.clusters} clusters"
                 + (f" -> {result.output}" if result.output else ""))


def show_report(rep) -> None:  # noqa: ANN001 - GenerateReport, imported lazily
    tbl = console.new_table("cluster", "tier", "what", "asked", "accepted", "escalated", "rejected", "errors",
                            title="distill generate")
    for row in rep.rows():
        tbl.add_row(str(row["cluster"]), f"{row['tier']}", row["what"], str(row["asked"]), str(row["accepted"]),
                    str(row["escalated"]), str(row["rejected"]), str(row["errors"]))
    console.table(tbl)
    if rep.duplicates:
        console.info(f"{rep.duplicates} duplicate failure prompts skipped")
    if rep.contaminated:
        console.info(f"{rep.contaminated} new problems rejected: an --exclude file has them")


TRAIN_HELP = """Fine-tune STUDENT on Training Examples: loss on the responses only (prompt masked).

LoRA by default (--lora-rank, --lora-alpha, --target-modules): the output is an adapter
directory with orstack.json naming the base (a modifier that route hot-swaps, and that
bench loads as base + adapter); --merge folds it in and saves a full checkpoint; --full
trains every weight. --logits TEACHER adds logit distillation (GKD's generalised JSD:
--kd-beta 0 forward KL, 1 reverse KL, between JSD; --kd-temperature; --t2-scale), only
when the teacher's tokenizer is the student's (checked before loading weights).
--recover trains on the --recover-fraction of rows with the highest loss under STUDENT
(post-compression recovery); on a pruned (sparse) or awq (packed) STUDENT it keeps the
compression: the LoRA trains on the compressed base, is folded back with pruned weights
exactly zero and every weight on the student's grid (--recover-mode qat: straight-through
rounding while training; round: rounded once when folding), and the output is in
STUDENT's format. Rows may also be plain {"text": ...}, conversations
({"messages": [...]}: loss on the assistant turns only, through the chat template) or TRL's
prompt/completion; --chat-template model|FILE.jinja trains prompt/response rows as a user
turn and an assistant turn too.

The recipe: --warmup steps, then --lr-scheduler linear|cosine|constant; --weight-decay,
--max-grad-norm; --module-ranks self_attn=64,mlp=32 for per-module LoRA ranks. --mix
FILE[:WEIGHT] (repeatable) draws rows from more files beside --data (the main data weighs
1); --rehearsal F gives the --mix files F of the draws (0.1: a tenth general data against
forgetting). --eval FILE[:WEIGHT] (repeatable; tasks: greedy accuracy, rows: loss; weighted
mean over files) validates every --eval-every steps and at the end; --early-stop P stops
after P validations without improvement; --save-best accuracy|loss keeps the best weights.
Gate (exit 3, nothing written unless --force): on the --eval tasks the output's accuracy may
fall at most --max-accuracy-drop (2) points below the student's, and no cluster the training
rows target (their `cluster`) more than --max-cluster-drop (0) points.

Example:

\b
    orstack distill train tiny --data train.jsonl -o tiny-lora --epochs 3 --lr 1e-3
"""


def train(
    student: Annotated[str, typer.Argument(help="Student checkpoint directory.")],
    data: Annotated[Path, typer.Option("--data", help="Training Example JSONL (prompt, response; '-' for stdin).")],
    output: RequiredOutput,
    epochs: T.Epochs = 3.0,
    max_steps: T.MaxSteps = None,
    lr: T.LearningRate = 2e-4,
    batch_size: T.BatchSize = 8,
    grad_accum: T.GradAccum = 1,
    lora_rank: T.LoraRank = 8,
    lora_alpha: T.LoraAlpha = None,
    target_modules: T.TargetModules = "all-linear",
    merge: T.Merge = False,
    full: T.Full = False,
    log: T.Log = None,
    log_every: T.LogEvery = 1,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Tokens per row (truncated).")] = 512,
    logits: Annotated[str | None, typer.Option("--logits", help="Teacher checkpoint for logit distillation.")] = None,
    kd_beta: Annotated[float, typer.Option("--kd-beta", min=0.0, max=1.0, help="GKD beta: 0 fwd KL, 1 rev KL.")] = 0.0,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", min=0.01, help="Softmax temperature.")] = 1.0,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", min=0.0, max=1.0, help="Weight of KD vs CE.")] = 1.0,
    t2_scale: Annotated[bool, typer.Option("--t2-scale", help="Scale the KD term by temperature^2.")] = False,
    recover: Annotated[bool, typer.Option("--recover", help="Train only on the hardest rows (highest loss).")] = False,
    recover_fraction: Annotated[float, typer.Option("--recover-fraction", min=0.0, max=1.0,
                                                   help="Fraction of rows kept by --recover.")] = 0.25,
    recover_mode: Annotated[str, typer.Option("--recover-mode", help="Compressed STUDENT: qat (train through "
                                              "rounding) or round (round when folding).")] = "qat",
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
    max_accuracy_drop: MaxAccuracyDrop = 2.0,
    max_cluster_drop: MaxClusterDrop = 0.0,
    force: Force = False,
) -> None:
    from orstack.distill.train import DistillTrainConfig, run_train
    from orstack.train.config import TrainConfig
    from orstack.train.sft import DistillLoss

    tc = TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                     lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules, merge=merge,
                     full=full, log=str(log) if log else None, log_every=log_every, max_length=max_length,
                     seed=current_runtime().seed, **T.recipe(warmup_steps, lr_scheduler, weight_decay, max_grad_norm,
                                                            module_ranks, eval_data, eval_every, early_stop,
                                                            save_best, mix, rehearsal))
    config = DistillTrainConfig(data=str(data), train=tc, logits_teacher=logits,
                                distill=DistillLoss(kd_beta, kd_temperature, kd_alpha, t2_scale), recover=recover,
                                recover_fraction=recover_fraction, recover_mode=recover_mode,
                                chat_template=chat_template,
                                max_accuracy_drop=max_accuracy_drop, max_cluster_drop=max_cluster_drop, force=force)
    result = run_train(student, output, config, current_runtime())
    if result.kind is None:  # a torchrun process other than rank 0: it trained, rank 0 reports
        return
    console.info(f"{result.steps} steps on {result.metrics['trained_rows']} rows, loss {result.loss_first:.4f} -> "
                 f"{result.loss_last:.4f}; wrote {result.kind} to {result.output}")
    if "recover_loss_kept_after" in result.metrics:
        m = result.metrics
        console.info(f"--recover: loss on the same rows before -> after training (as saved): trained rows "
                     f"{m['recover_loss_kept']:.4f} -> {m['recover_loss_kept_after']:.4f}, all rows "
                     f"{m['recover_loss_all']:.4f} -> {m['recover_loss_all_after']:.4f}")


GROUP_HELP = """Failure-targeted distillation: generate verified examples, then train a student.

Example:

\b
    orstack distill generate --failures failures.jsonl --teacher cmd:'python oracle.py' -o train.jsonl
    orstack distill train tiny --data train.jsonl -o tiny-lora
"""


def register(app: typer.Typer) -> None:
    distill_app.command("generate", help=GENERATE_HELP)(generate)
    distill_app.command("train", help=TRAIN_HELP)(train)
    app.add_typer(distill_app, name="distill", help=GROUP_HELP)
