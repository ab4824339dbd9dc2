"""Logit distillation needs one vocabulary: checked on the tokenizer files, before any weights load."""

from __future__ import annotations

from orstack.errors import BadInput


def check_same_vocabulary(student: str, teacher: str) -> None:
    """BadInput unless the two tokenizers map exactly the same strings to the same ids (and agree on
    EOS/padding), and both models' output layers cover that vocabulary."""
    from orstack.io.checkpoint import load_config, load_tokenizer

    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        raise BadInput(f"--logits {teacher}: tokenizer differs from the student's ({_difference(s_vocab, t_vocab)}); "
                       "logit distillation needs the same vocabulary — use sequence-level distillation "
                       "(distill generate) instead")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(s_tok, name) != getattr(t_tok, name):
            raise BadInput(f"--logits {teacher}: {name} is {getattr(t_tok, name)} in the teacher, "
                           f"{getattr(s_tok, name)} in the student")
    for spec in (student, teacher):
        size = getattr(load_config(spec), "vocab_size", None)
        if size is not None and size < len(s_vocab):
            raise BadInput(f"{spec}: the model's vocab_size {size} is smaller than its tokenizer ({len(s_vocab)})")


def _difference(a: dict[str, int], b: dict[str, int]) -> str:
    if len(a) != len(b):
        return f"student {len(a)} tokens, teacher {len(b)}"
    for token, idx in sorted(a.items(), key=lambda kv: kv[1]):
        if b.get(token) != idx:
            return f"token {token!r} is id {idx} in the student, {b.get(token)} in the teacher"
    return "different token sets"

