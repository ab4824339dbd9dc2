"""The SFT fast path (orstack/train/sft.py): micro-batches of similar length and logits only at
response positions give the loss and gradients of the plain padded full-logits step."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from orstack.train.data import Encoded, collate  # noqa: E402
from orstack.train.losses import IGNORE, ce_sum_at, masked_ce, response_positions  # noqa: E402
from orstack.train.sft import accepts_logits_to_keep, length_chunks  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).float()


def rows(n: int = 9) -> list[Encoded]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        prompt, response = rng.randint(3, 40 if i % 4 else 90), rng.randint(1, 6)
        ids = [rng.randrange(1, 97) for _ in range(prompt + response)]
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:], weight=1.0 + (i % 3) / 2))
    out.append(Encoded([5, 6, 7], [IGNORE] * 3))  # a row with nothing to learn
    return out


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_fast_step_equals_the_padded_full_logits_step():
    model, data = tiny_llama(), rows()
    batch = collate(data, 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    reference = masked_ce(out.logits, batch["labels"], batch["weights"])
    reference.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)

    assert accepts_logits_to_keep(model)
    counted = sum(e.counted() for e in data)
    assert counted == int((batch["labels"][:, 1:] != IGNORE).sum())
    chunks = length_chunks(data)
    assert 1 < len(chunks) < len(data) and sorted(map(id, sum(chunks, []))) == sorted(map(id, data))
    total = 0.0
    for chunk in chunks:
        b = collate(chunk, 0)
        positions = response_positions(b["labels"])
        if positions.numel() == 0:
            continue
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=positions).logits
        assert logits.shape[1] == positions.numel() < b["input_ids"].shape[1]
        part = ce_sum_at(logits, b["labels"], positions, b["weights"]) / counted
        part.backward()
        total += part.item()
    assert total == pytest.approx(reference.item(), rel=1e-5)
    for g, w in zip(grads(model), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_train_sft_fast_path_follows_the_plain_path(monkeypatch):
    from orstack.train import sft
    from orstack.train.config import TrainConfig

    class Tok:
        pad_token_id = 0
        eos_token_id = 0

    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, seed=0)
    fast_model, plain_model = tiny_llama(), tiny_llama()
    fast = sft.train_sft(fast_model, Tok(), rows(), config)
    monkeypatch.setattr(sft, "accepts_logits_to_keep", lambda model: False)
    plain = sft.train_sft(plain_model, Tok(), rows(), config)
    assert [r["loss"] for r in fast.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)
    assert [r["tokens"] for r in fast.history] == [r["tokens"] for r in plain.history]
    # AdamW divides each step by the gradient's running RMS, so a weight whose gradient is near
    # zero moves by up to lr per step on rounding alone (seen: 1.9e-5 on one of 2,048 weights
    # on an AVX-512 CPU); a wrong position or weight would move them all by far more.
    for a, b in zip(fast_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_foreach_adamw_takes_the_same_steps():
    model_a, model_b = tiny_llama(), tiny_llama()
    params_a = [p for p in model_a.parameters()]
    params_b = [p for p in model_b.parameters()]
    opt_a = torch.optim.AdamW(params_a, lr=1e-2, weight_decay=0.01, foreach=True)
    opt_b = torch.optim.AdamW(params_b, lr=1e-2, weight_decay=0.01, foreach=False)
    batch = collate(rows(), 0)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        for _ in range(2):
            opt.zero_grad()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            masked_ce(out.logits, batch["labels"], batch["weights"]).backward()
            opt.step()
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
