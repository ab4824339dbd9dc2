"""Optional one-line cluster labels from an OpenAI-compatible chat endpoint.

`--labeler http://127.0.0.1:8080/v1#model-name`, through orstack's OpenAI-compatible client
(orstack/backends/openai.py: timeout, a retry, the key from $OPENAI_API_KEY). A label that
cannot be fetched falls back to the c-TF-IDF keywords (with a warning), never fails the run.
"""

from __future__ import annotations

from collections.abc import Sequence

from orstack.errors import BadInput

PROMPT = ("These inputs are examples a small language model answered wrongly. They were grouped "
          "together automatically; distinctive terms: {keywords}.\n\n{examples}\n\n"
          "Name the skill the model lacks in one short line (at most 8 words). Reply with the label only.")


def parse_labeler(spec: str) -> tuple[str, str]:
    """`URL#MODEL` -> (base URL, model name)."""
    url, _, model = spec.partition("#")
    if not url.startswith(("http://", "https://")) or not model:
        raise BadInput(f"--labeler: expected http://HOST:PORT/v1#MODEL, got '{spec}'")
    return url.rstrip("/"), model


def llm_label(spec: str, examples: Sequence[str], keywords: Sequence[str], *, timeout: float = 60.0) -> str:
    """Ask the endpoint for a label; raises EndpointError/ValueError when it cannot answer."""
    from orstack.backends.openai import OpenAIClient

    url, model = parse_labeler(spec)
    shown = "\n".join(f"- {e[:300]}" for e in examples[:10])
    client = OpenAIClient(url, model, api="chat", timeout=timeout, retries=1)
    text = client.complete(PROMPT.format(keywords=", ".join(keywords), examples=shown), max_tokens=32)
    lines = [line.strip(" \"'`*#-") for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[0]:
        raise ValueError("empty label")
    return lines[0][:120]


def try_llm_label(spec: str, examples: Sequence[str], keywords: Sequence[str]) -> str | None:
    from orstack.backends.openai import EndpointError
    from orstack.console import warn

    try:
        return llm_label(spec, examples, keywords)
    except (EndpointError, ValueError) as e:
        warn(f"--labeler: no label from {spec} ({e}); using keywords")
        return None
