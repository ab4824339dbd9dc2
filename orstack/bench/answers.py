"""Answer perplexity: how likely a model finds each task's reference answer after its prompt.

Text perplexity means little for a model trained only on answers (the tiny default scores its
loss on answer tokens, so it never learnt to predict the random digits of a prompt: its
held-out text perplexity is in the hundreds of thousands). exp(mean NLL of the answer tokens
given the prompt) asks the question the model was trained for, and moves smoothly where
greedy accuracy jumps: a model can get closer to the right answer without getting it yet.
Scored with the backend's lm-evaluation-harness pair tokenization (`loglikelihoods`), so the
transformers and llama.cpp backends agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orstack.backends.perplexity import PerplexityResult
from orstack.errors import BadInput

if TYPE_CHECKING:
    from orstack.backends.base import Backend

# Kinds whose `answer` is the text a model should write (choice and code tasks have none).
ANSWER_KINDS = ("numeric", "exact")


def answer_pairs(tasks: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(prompt, answer) of every plain-prompt task with a written answer."""
    return [(t["prompt"], str(t["answer"])) for t in tasks
            if t["kind"] in ANSWER_KINDS and isinstance(t.get("prompt"), str) and t.get("answer") is not None]


def check_answer_tasks(tasks: Sequence[dict[str, Any]], source: str) -> None:
    """Before any model is loaded: some task must have a plain prompt and a written answer."""
    if not answer_pairs(tasks):
        raise BadInput(f"{source}: --ppl-answers needs tasks with a `prompt` and a numeric or exact `answer`; "
                       "there are none")


def answer_perplexity(backend: Backend, tasks: Sequence[dict[str, Any]]) -> PerplexityResult:
    """Perplexity of the answer tokens given the prompt, over every task `answer_pairs` keeps
    (one pooled figure: total NLL over total answer tokens)."""
    pairs = answer_pairs(tasks)
    contexts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    scores = backend.loglikelihoods(contexts, answers)
    n_tokens = sum(_continuation_length(backend, p, a) for p, a in pairs)
    return PerplexityResult(nll=-sum(scores), n_tokens=n_tokens,
                            n_bytes=sum(len(a.encode("utf-8")) for a in answers), rule="answers")


def _continuation_length(backend: Backend, context: str, continuation: str) -> int:
    """How many tokens `loglikelihoods` scores for the pair: the whole pair's tokens minus the
    context's, after moving the context's trailing whitespace onto the continuation, as
    backends.base.split_pair does (BOS, when added, is in both and cancels)."""
    return len(backend.encode_prompt(context + continuation)) - len(backend.encode_prompt(context.rstrip()))
