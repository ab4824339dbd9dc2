"""Chat templates: which one a run uses, rendering it as transformers does, its end-of-turn token.

The choice (`--chat-template`, a field of every generating or training stage's config):
- None (the default): `messages` tasks go through the model's own template; `prompt` tasks
  are fed as-is (so scores stay comparable with runs that never used a template);
- "model": every task goes through the model's own template (a `prompt` becomes one user turn),
  as lm-evaluation-harness's --apply_chat_template does;
- a path to a .jinja file: every task goes through that template instead of the model's.

A conversation renders with the generation prompt (add_generation_prompt=True). A final
assistant turn is a prefill, as lm-evaluation-harness's gen_prefix is: the conversation
before it renders with the generation prompt and its content follows, so the model
continues it. Rendering uses jinja2 the way transformers' apply_chat_template does (a
sandboxed environment with trim_blocks and lstrip_blocks, loopcontrols, `raise_exception`,
a `tojson` that does not escape HTML, `strftime_now`, the special tokens as variables), so
a GGUF file's `tokenizer.chat_template` renders to the same text in the llama.cpp backend
as the checkpoint's does in transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orstack.errors import BadInput

MODEL = "model"  # --chat-template model: the model's own template for every task
ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063orstack-end-of-turn-probe\u2063"


def template_file_text(choice: str | None) -> str | None:
    """The text of a --chat-template FILE (None for no choice or "model"); bad input when it
    cannot be read or is not a jinja template."""
    if choice is None or choice == MODEL:
        return None
    path = Path(choice)
    if not path.is_file():
        raise BadInput(f"--chat-template {choice}: no such file (give a .jinja chat template, or 'model' for "
                       "the model's own)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--chat-template {choice}: cannot read it ({e})") from None
    try:
        _compile(text)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax errors have several classes
        raise BadInput(f"--chat-template {choice}: not a jinja template ({e})") from None
    return text


def template_record(choice: str | None, text: str | None) -> dict[str, Any]:
    """What a manifest or summary records of the template a run used."""
    return {"chat_template": choice,
            "chat_template_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None}


def _compile(template: str):  # noqa: ANN202 - a jinja2 Template
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


@functools.cache
def _generation_tag():  # noqa: ANN202 - built on first use: importing this module needs no jinja2
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):  # noqa: ANN001, ANN202
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):  # noqa: ANN001, ANN202
            return caller()

    return GenerationTag


_CACHE: dict[str, Any] = {}


def render(template: str, messages: list[dict[str, Any]], special_tokens: dict[str, str], *,
           add_generation_prompt: bool = True) -> str:
    """The conversation as the template renders it (transformers' apply_chat_template with
    tokenize=False), with jinja2 alone (no transformers)."""
    compiled = _CACHE.get(template)
    if compiled is None:
        compiled = _CACHE[template] = _compile(template)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return compiled.render(messages=plain, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                           **special_tokens)


def render_prompt(renderer: Callable[[list[dict[str, Any]]], str], prompt: str | list[dict[str, Any]]) -> str:
    """A prompt rendered for generation by `renderer` (messages -> text with the generation
    prompt); a final assistant turn is a prefill: the rest renders and its content follows."""
    messages = as_messages(prompt)
    if messages and messages[-1]["role"] == "assistant":
        return renderer(messages[:-1]) + messages[-1]["content"]
    return renderer(messages)


def end_of_turn_text(template: str, special_tokens: dict[str, str]) -> str | None:
    """The text the template writes right after an assistant turn's content (where the
    end-of-turn token is: "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>" ...), found
    by rendering a probe conversation; None when the template writes nothing there."""
    try:
        text = render(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                      special_tokens, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template may refuse the probe; it then has no known end of turn
        return None
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    tail = text[at + len(_SENTINEL):].strip()
    return tail or None


def end_of_turn_token(template: str, special_tokens: dict[str, str], encode: Callable[[str], list[int]],
                      is_special: Callable[[int], bool]) -> int | None:
    """The id of the special token that ends an assistant turn (None when there is none)."""
    tail = end_of_turn_text(template, special_tokens)
    if tail is None:
        return None
    ids = encode(tail)
    return ids[0] if ids and is_special(ids[0]) else None


def as_messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt as a conversation: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class ChatTemplating:
    """What a backend needs to render prompts: the run's choice, the template it resolves to, the
    special tokens the template sees, and the end-of-turn token to stop at.

    `model_template` is the model's own (None when it has none); `renderer(template, messages)`
    renders with the generation prompt (the transformers backend passes its tokenizer's
    apply_chat_template, the llama.cpp backend uses `render`)."""

    def __init__(self, choice: str | None, model_template: str | None, special_tokens: dict[str, str],
                 name: str, renderer: Callable[[str, list[dict[str, Any]]], str] | None = None) -> None:
        self.choice = choice
        self.file_text = template_file_text(choice)
        self.template = self.file_text if self.file_text is not None else model_template
        self.special_tokens = special_tokens
        self.name = name
        self.end_of_turn: int | None = None
        self._renderer = renderer or (lambda template, messages: render(template, messages, special_tokens))

    @property
    def applies_to_prompts(self) -> bool:
        return self.choice is not None

    def wants_template(self, prompt: str | list[dict[str, Any]]) -> bool:
        return not isinstance(prompt, str) or self.applies_to_prompts

    def render(self, prompt: str | list[dict[str, Any]], where: str | None = None) -> str:
        if self.template is None:
            raise BadInput(no_template_message(self.name, where))
        template = self.template
        return render_prompt(lambda messages: self._renderer(template, messages), prompt)

    def record(self) -> dict[str, Any]:
        return template_record(self.choice, self.template)


def no_template_message(model: str, where: str | None) -> str:
    lead = f"{where}: field 'messages': " if where else ""
    return f"{lead}{model} has no chat template; pass --chat-template FILE.jinja"
