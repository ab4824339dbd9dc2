"""Hugging Face checkpoint teachers: batched greedy generation with transformers."""

from __future__ import annotations

from typing import Any

from orstack.teachers.base import Teacher, TeacherOptions, cut_at_stop


class HFTeacher(Teacher):
    kind = "hf"

    def __init__(self, spec: str, options: TeacherOptions, path: str) -> None:
        super().__init__(spec, options)
        self.path = path
        self.model = None
        self.tokenizer = None

    def check(self) -> None:
        from orstack.io.checkpoint import load_config

        load_config(self.path)

    def _load(self) -> None:
        if self.model is None:
            from orstack.io.checkpoint import load_model
            from orstack.runtime import settings

            self.model, self.tokenizer = load_model(self.path, device=self.options.device,
                                                    trust_pickle=settings.trust_pickle)

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        self._load()
        out: list[str | None] = []
        size = max(1, self.options.batch_size)
        for i in range(0, len(tasks), size):
            batch = tasks[i:i + size]
            self.requests += 1
            texts = greedy_generate(self.model, self.tokenizer, [t["prompt"] for t in batch],
                                    self.options.max_new_tokens)
            out.extend(cut_at_stop(text, self.stop_for(t)) for text, t in zip(texts, batch))
        return out

    def close(self) -> None:
        self.model = self.tokenizer = None


def greedy_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` (left-padded batch), stopping at EOS."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[row, width - len(e):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
    return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
