"""`distill train`: fine-tune a student on Training Examples (responses only), LoRA by default,
optionally with logit distillation from a same-vocabulary teacher, or in --recover mode on the
rows the model finds hardest. --recover on a pruned or quantized student keeps its compression:
the LoRA is trained on the compressed base and folded back into the format the student was
read in (orstack/distill/recover.py, orstack/train/recover.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.train.config import TrainConfig
from orstack.train.sft import DistillLoss, TrainResult

if TYPE_CHECKING:
    from orstack.runtime import Runtime


@dataclass
class DistillTrainConfig:
    """Everything that determines a `distill train` output; the manifest stores it whole."""

    data: str  # Training Example JSONL ('-': standard input)
    train: TrainConfig = field(default_factory=TrainConfig)
    logits_teacher: str | None = None  # --logits: a same-vocabulary teacher checkpoint
    distill: DistillLoss = field(default_factory=DistillLoss)  # the logit loss, used with a teacher
    recover: bool = False  # train only on the hardest rows
    recover_fraction: float = 0.25  # --recover keeps this fraction of the rows (highest loss first)
    # --recover on a compressed student: "qat" trains through straight-through rounding onto the
    # student's grid, "round" trains unrounded and rounds once when folding (same output format)
    recover_mode: str = "qat"
    chat_template: str | None = None  # None: only chat rows use the template; "model" or a .jinja path: every row
    # the quality gate on the --eval tasks (orstack/gates.py): parent (the student) against the output
    max_accuracy_drop: float = 2.0  # points of general accuracy
    max_cluster_drop: float = 0.0  # points, each cluster the training rows target
    force: bool = False


@dataclass
class DistillTrainResult:
    """What `distill train` reports; `kind` is None on the processes of a torchrun that do not write."""

    steps: int
    loss_first: float | None
    loss_last: float | None
    metrics: dict[str, Any]
    kind: str | None  # adapter, merged, full, or sparse / packed (--recover on a compressed student)
    output: Path


def run_train(student: str, output: str | Path, config: DistillTrainConfig, runtime: Runtime) -> DistillTrainResult:
    """Check the student, data, teacher and outputs; then load, train and save (rank 0 only)."""
    from orstack.io.checkpoint import check_checkpoint
    from orstack.io.output import Output, check_outputs
    from orstack.train.data import read_examples, read_rows_or_tasks
    from orstack.train.distributed import main_process_log
    from orstack.train.lora import save_trained
    from orstack.train.validate import read_eval_sets
    from orstack.train.vocab import check_same_vocabulary

    tc = config.train
    check_checkpoint(student)  # exists, sound weight headers, a causal LM
    if config.logits_teacher is not None:
        check_checkpoint(config.logits_teacher)
    if config.recover and config.recover_fraction <= 0:
        raise BadInput("--recover-fraction must be > 0")
    _check_recover_mode(config, student)
    from orstack.gates import check_limits

    check_limits(max_accuracy_drop=config.max_accuracy_drop, max_cluster_drop=config.max_cluster_drop)
    tc.check()
    from orstack.backends.chat import template_file_text

    template_file_text(config.chat_template)  # an unusable --chat-template FILE: before anything loads
    check_outputs([Output(output, "dir", "-o"), Output(tc.log, "file", "--log")],
                  inputs=[student, config.data, config.logits_teacher])
    rows = read_examples(config.data)
    mix = [(read_rows_or_tasks(path), weight) for path, weight in tc.mix_weights()]
    eval_sets = read_eval_sets(tc.eval_data) if tc.eval_data else None
    if config.logits_teacher:
        check_same_vocabulary(student, config.logits_teacher)  # before any weights load
    with main_process_log(tc.log, runtime) as log_path:
        model, tokenizer, result, metrics = fine_tune(student, rows, config, runtime, log_path=log_path, mix=mix,
                                                      eval_sets=eval_sets)
    verdict = _gate(config, rows, metrics)
    kind = None
    if runtime.is_main_process:
        compressed = getattr(model, "orstack_compressed_base", None)
        if compressed is not None:
            from orstack.distill.recover import save_compressed

            kind = save_compressed(model, tokenizer, Path(output), compressed, args=config, parent=student,
                                   metrics=metrics, extra={"gate": verdict.record()})
        else:
            kind = save_trained(model, tokenizer, Path(output), stage="distill", config=tc, base=student,
                                args=config, metrics=metrics, extra={"gate": verdict.record()})
    return DistillTrainResult(result.steps, result.loss_first, result.loss_last, metrics, kind, Path(output))


def fine_tune(student: str, rows: list[dict[str, Any]], config: DistillTrainConfig, runtime: Runtime, *,
              log_path: str | None = None, mix: list[tuple[list[dict[str, Any]], float]] | None = None,
              eval_sets: list[Any] | None = None) -> tuple[Any, Any, TrainResult, dict[str, Any]]:
    """Load the student (and teacher), train (drawing `mix` sources beside the rows, validating on
    `eval_sets`), and return (model, tokenizer, result, metrics)."""
    from orstack.gates import eval_set_tasks, measure_tasks
    from orstack.io.checkpoint import load_model
    from orstack.io.jsonl import display_name
    from orstack.runtime import seed_everything
    from orstack.train.data import encode_rows
    from orstack.train.distributed import init_distributed
    from orstack.train.lora import apply_lora
    from orstack.train.sft import example_losses, hardest, train_sft
    from orstack.train.validate import make_validator

    tc = config.train
    device = runtime.torch_device()
    seed_everything(tc.seed)
    model, tokenizer = load_model(student, device=device, trust_pickle=runtime.trust_pickle)
    gate_tasks = eval_set_tasks(eval_sets)
    parent = (measure_tasks(model, tokenizer, gate_tasks, name="parent", chat_template=config.chat_template)
              if gate_tasks else None)
    data = encode_rows(tokenizer, rows, tc.max_length, display_name(config.data), chat_template=config.chat_template,
                       lines=getattr(rows, "lines", None))
    metrics: dict[str, Any] = {"rows": len(data), **_template_metrics(tokenizer, rows, config.chat_template)}
    all_rows = data
    compressed = None
    if config.recover:
        from orstack.distill.recover import compressed_base

        compressed = compressed_base(student, model)
        losses = example_losses(model, tokenizer, data, tc.batch_size)
        keep = hardest(data, losses, config.recover_fraction)
        metrics.update(recover_rows=len(keep), recover_loss_all=sum(losses) / len(losses),
                       recover_loss_kept=sum(losses[i] for i in keep) / len(keep))
        data = [data[i] for i in keep]
    teacher = None
    if config.logits_teacher:
        teacher, _ = load_model(config.logits_teacher, device=device, trust_pickle=runtime.trust_pickle,
                                with_tokenizer=False)
        for p in teacher.parameters():
            p.requires_grad_(False)
    if compressed is not None:
        from orstack.train.recover import attach

        attach(model, compressed.kept, rank=tc.lora_rank, alpha=tc.alpha, mode=config.recover_mode)
        metrics["recover_base"] = compressed.describe() | {"mode": config.recover_mode}
    elif not tc.full:
        model = apply_lora(model, tc)
    encoded_mix = [(encode_rows(tokenizer, mrows, tc.max_length, path, chat_template=config.chat_template,
                                lines=getattr(mrows, "lines", None)), weight)
                   for (mrows, weight), (path, _) in zip(mix or [], tc.mix_weights())]
    validator = make_validator(tc, tokenizer, config.chat_template, eval_sets)
    init_distributed(runtime)
    result = train_sft(model, tokenizer, data, tc, teacher=teacher, distill=config.distill if teacher else None,
                       log_path=log_path, rank=runtime.rank, world_size=runtime.world_size, mix=encoded_mix,
                       validator=validator)
    metrics.update(steps=result.steps, trained_rows=len(data), loss_first=result.loss_first,
                   loss_last=result.loss_last, train_seconds=round(result.seconds, 2), **result.extra)
    if compressed is not None:
        from orstack.train.recover import fold, verify

        fold(model)  # back onto the grid, pruned weights zero: what is saved is what is measured
        metrics["recover_base"].update(verify(model, compressed.kept))
        model.orstack_compressed_base = compressed
    if config.recover:
        # The step losses are single batches (noisy, and of a model not yet folded); these are
        # the same rows before and after, measured on the model as it is saved.
        after = example_losses(model, tokenizer, all_rows, tc.batch_size)
        metrics.update(recover_loss_all_after=sum(after) / len(after),
                       recover_loss_kept_after=sum(after[i] for i in keep) / len(keep))
    if parent is not None:
        child = measure_tasks(model, tokenizer, gate_tasks, name="trained", chat_template=config.chat_template)
        metrics["eval_before"], metrics["eval_after"] = parent.as_dict(), child.as_dict()
    return model, tokenizer, result, metrics


def _check_recover_mode(config: DistillTrainConfig, student: str) -> None:
    """--recover-mode is one of MODES; a compressed student is recovered with a LoRA only."""
    from orstack.train.recover import MODES

    if config.recover_mode not in MODES:
        raise BadInput(f"--recover-mode {config.recover_mode}: expected one of {', '.join(MODES)}")
    if not config.recover:
        return
    from orstack.distill.recover import FORMATS
    from orstack.io.checkpoint import detect_format, resolve_checkpoint

    source = resolve_checkpoint(student)
    if not (isinstance(source, Path) and source.is_dir() and detect_format(source) in FORMATS):
        return
    tc = config.train
    if tc.full:
        raise BadInput(f"--recover on {student} (stored {detect_format(source)}) trains a LoRA folded back into "
                       "that format; drop --full")
    if tc.module_ranks or tc.target_modules != "all-linear":
        raise BadInput(f"--recover on {student} (stored {detect_format(source)}) trains every decoder Linear at "
                       "--lora-rank; drop --target-modules/--module-ranks")


def _gate(config: DistillTrainConfig, rows: list[dict[str, Any]], metrics: dict[str, Any]):  # noqa: ANN202 - Verdict
    """General accuracy on the --eval tasks may not fall more than --max-accuracy-drop points, nor
    any cluster the training rows target (their `cluster`) more than --max-cluster-drop."""
    from orstack.gates import TaskScore, decide, training_checks

    checks = []
    if "eval_before" in metrics:
        targeted = sorted({str(r["cluster"]) for r in rows if r.get("cluster") is not None})
        checks = training_checks(TaskScore.from_dict(metrics["eval_before"]),
                                 TaskScore.from_dict(metrics["eval_after"]),
                                 max_accuracy_drop=config.max_accuracy_drop, max_cluster_drop=config.max_cluster_drop,
                                 clusters=targeted, on=", ".join(config.train.eval_data))
    return decide("distill train", checks, config.force)


def _template_metrics(tokenizer: Any, rows: list[dict[str, Any]], choice: str | None) -> dict[str, Any]:
    """The chat template the run trained through (its sha256), when one was used."""
    from orstack.backends.chat import template_file_text, template_record
    from orstack.train.data import conversation_of

    if not any(conversation_of(r, choice) is not None for r in rows):
        return {}
    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    text = template_file_text(choice)
    return template_record(choice, text if text is not None else own)
