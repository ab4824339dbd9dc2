"""Optional one-line cluster labels from an OpenAI-compatible chat endpoint.

`--labeler http://127.0.0.1:8080/v1#model-name`; stdlib urllib only. A label that
cannot be fetched falls back to the c-TF-IDF keywords (with a warning), never fails the run.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
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
    """Ask the endpoint for a label; raises OSError/ValueError when it cannot answer."""
    url, model = parse_labeler(spec)
    shown = "\n".join(f"- {e[:300]}" for e in examples[:10])
    body = {"model": model, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": PROMPT.format(keywords=", ".join(keywords), examples=shown)}]}
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - user-given URL
        answer = json.loads(response.read().decode("utf-8"))
    text = answer["choices"][0]["message"]["content"]
    lines = [line.strip(" \"'`*#-") for line in str(text).strip().splitlines() if line.strip()]
    if not lines or not lines[0]:
        raise ValueError("empty label")
    return lines[0][:120]


def try_llm_label(spec: str, examples: Sequence[str], keywords: Sequence[str]) -> str | None:
    from orstack.console import warn

    try:
        return llm_label(spec, examples, keywords)
    except (OSError, ValueError, KeyError, IndexError, TypeError, urllib.error.URLError) as e:
        warn(f"--labeler: no label from {spec} ({e}); using keywords")
        return None
