"""The tiny default: config, model construction, training (orstack.train.loop) and a quick greedy
evaluation (orstack's transformers backend over the model in memory).

Recipe (measured in FACTS.md, "A tiny default that does something"): a 2-layer Llama of
hidden 256 with untied embeddings, AdamW at 2e-3 with 50 warm-up steps and a cosine
decay to 10%, batch 64, loss on the answer tokens and EOS only, a fixed step count.
Same seed, step count and thread count give bit-identical weights.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orstack.tiny.tasks import training_stream
from orstack.train.losses import IGNORE

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass
class TinyConfig:
    """Everything that determines the tiny default; written into its manifest."""

    seed: int = 0
    steps: int = 1000
    untrained: bool = False
    threads: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.05
    warmup: int = 50
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    max_position: int = 128
    n_heldout: int = 1000
    n_train_rows: int = 2000
    micro_batches: int = 4  # a cost knob only: the gradient is that of the whole batch
    max_new_tokens: int = 16


def build_model(config: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama, deterministic in `config.seed`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.max_position, tie_word_embeddings=False, **ids,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama)
    # Greedy decoding that stops at EOS: what `bench` and plain `generate` should do by default.
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, **ids)
    return model


def encode_example(tokenizer: PreTrainedTokenizerFast, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) for BOS + prompt + answer + EOS; only answer and EOS are scored."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch. Padding sits after EOS, so a causal model's scored positions never
    see it and no attention mask is needed."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def lr_at(step: int, config: TinyConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr_ratio * lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TinyConfig) -> torch.optim.Optimizer:
    import torch

    # Weight decay on matrices (embeddings included), not on the norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, config: TinyConfig,
          exclude: set[str]) -> list[float]:
    """Train in place for `config.steps` steps on the task stream (never a prompt in
    `exclude`); returns the loss of every step."""
    from orstack.train.loop import train_loop

    stream = training_stream(config.seed, exclude)
    optimizer = make_optimizer(model, config)

    def step(_: int) -> dict[str, float]:
        batch = [encode_example(tokenizer, prompt, answer) for _, _, prompt, answer in
                 (next(stream) for _ in range(config.batch_size))]
        return {"loss": batch_loss_backward(model, batch, tokenizer.pad_token_id, config.micro_batches)}

    result = train_loop(model, optimizer, list(model.parameters()), config.steps, step,
                        lr_at=lambda i: lr_at(i, config), max_grad_norm=config.clip, desc="training")
    model.eval()
    return result.losses


def batch_loss_backward(model: LlamaForCausalLM, batch: list[tuple[list[int], list[int]]], pad_id: int,
                        micro_batches: int) -> float:
    """Accumulate the gradient of the mean loss over all scored tokens of `batch`.

    The batch is sorted by length and cut into `micro_batches` pieces, each padded only to
    its own longest example: the same objective and gradient as one padded batch (up to
    summation order), at about 60% of the cost, since padding was ~40% of the tokens."""
    import torch.nn.functional as F

    batch = sorted(batch, key=lambda example: len(example[0]))
    n_scored = sum(label != IGNORE for _, labels in batch for label in labels)
    size = -(-len(batch) // micro_batches)
    total = 0.0
    for start in range(0, len(batch), size):
        input_ids, labels = (t.to(model.device) for t in collate(batch[start : start + size], pad_id))
        logits = model(input_ids=input_ids, use_cache=False).logits
        # Position t predicts token t+1.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum") / n_scored
        loss.backward()
        total += loss.item()
    return total


def greedy_answers(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
    max_new_tokens: int = 16, batch_size: int = 256,
) -> list[str]:
    """Greedy continuations up to EOS through orstack's transformers backend (what bench runs)."""
    from orstack.backends.hf import HFBackend

    backend = HFBackend.from_model(model, tokenizer, name="tiny", batch_size=batch_size)
    return [g.text for g in backend.generate(list(prompts), max_new_tokens=max_new_tokens, stop=[])]


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]],
             max_new_tokens: int = 16) -> dict[str, Any]:
    """Held-out accuracy (exact match of the greedy answer), overall, per family and per
    family/level. A quick check for the manifest; `orstack bench` is the full evaluation."""
    outputs = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, output in zip(rows, outputs, strict=True):
        ok = output.strip() == str(row["answer"])
        hits["all"].append(ok)
        hits[row["family"]].append(ok)
        hits[f"{row['family']}-{row['level']}"].append(ok)

    def acc(key: str) -> float:
        return round(sum(hits[key]) / len(hits[key]), 4)

    families = list(dict.fromkeys(r["family"] for r in rows))
    cells = list(dict.fromkeys(f"{r['family']}-{r['level']}" for r in rows))
    return {
        "heldout_accuracy": acc("all"),
        "accuracy_by_family": {f: acc(f) for f in families},
        "accuracy_by_level": {c: acc(c) for c in cells},
    }


def run(config: TinyConfig, tokenizer: PreTrainedTokenizerFast, heldout: Sequence[dict[str, Any]],
        device: str = "cpu") -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Build the model and, unless `config.untrained`, train it (never on a held-out prompt)
    and evaluate it on `heldout`, on `device` with `config.threads` CPU threads. Returns
    (model, metrics). Bit-identical weights are promised on the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model = build_model(config, tokenizer).to(device)
        if config.untrained:
            model.eval()
            return model, {"trained": False}
        start = time.perf_counter()
        losses = train(model, tokenizer, config, {r["prompt"] for r in heldout})
        seconds = time.perf_counter() - start
        scores = evaluate(model, tokenizer, heldout, config.max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    tail = losses[-50:]
    return model, {"trained": True, "final_loss": round(sum(tail) / len(tail), 4), "train_seconds": round(seconds, 1),
                   "parameters": sum(p.numel() for p in model.parameters()), **scores}
