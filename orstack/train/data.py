"""Tokenising training rows with the prompt masked out of the loss.

A Training Example (`prompt`, `response`) becomes prompt tokens + response tokens + EOS
with labels -100 on the prompt, so the loss is on the response only. The prompt and the
response are tokenised separately and concatenated, so a merge across their boundary
cannot move the mask. A row with only `text` is trained on every token.

Chat rows: `messages` (the OpenAI chat format, as TRL's conversational datasets) go through
the chat template with the loss on the assistant turns only (each turn's content and the
template's end-of-turn text after it); TRL's `prompt`/`completion` are read as prompt/response,
or, when both are lists of messages, as the conversation prompt + completion. The rendered
conversation is cut into segments at every assistant turn (the conversation before it
rendered with the generation prompt, then with the turn), each tokenised on its own as the
prompt and response are. With a --chat-template choice a prompt/response row is the
conversation [user: prompt, assistant: response] too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orstack.errors import BadInput
from orstack.train.losses import IGNORE


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0

    def counted(self) -> int:
        """Tokens the loss counts: those with a label, from the second position on."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int, weight: float = 1.0) -> Encoded:
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Encoded(ids, labels, weight)


def encode_text(tokenizer: Any, text: str, max_length: int, weight: float = 1.0) -> Encoded:
    ids = tokenizer(text)["input_ids"][:max_length]
    return Encoded(ids, list(ids), weight)


def conversation_of(row: dict[str, Any], chat_template: str | None = None) -> list[dict[str, Any]] | None:
    """The row as a conversation, or None when it is trained as plain prompt/response or text."""
    if row.get("messages") is not None:
        return list(row["messages"])
    prompt, completion = row.get("prompt"), row.get("completion", row.get("response"))
    if isinstance(prompt, list) and isinstance(completion, list):
        return list(prompt) + list(completion)
    if chat_template is not None and isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return None


def encode_conversation(tokenizer: Any, template: str, messages: list[dict[str, Any]], max_length: int,
                        weight: float = 1.0, where: str = "data") -> Encoded:
    """The conversation through `template`, labels on the assistant turns only."""
    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise BadInput(f"{where}: field 'messages': the chat template does not render this conversation turn "
                           "by turn (a turn changes the text before it), so its assistant turns cannot be masked")
        context = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        target = tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]
        ids += context + target
        labels += [IGNORE] * len(context) + target
        done = after
    return Encoded(ids[:max_length], labels[:max_length], weight)


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, where: str = "data",
                chat_template: str | None = None, lines: list[int] | None = None) -> list[Encoded]:
    """Encode prompt/response rows (or `text` rows, or chat rows); `weight` (default 1) scales a
    row's loss. `chat_template` is the run's --chat-template choice; `lines` the rows' line numbers."""
    from orstack.backends.chat import no_template_message, template_file_text

    file_text = template_file_text(chat_template)
    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    template = file_text if file_text is not None else own
    out = []
    for n, row in enumerate(rows, 1):
        weight = float(row.get("weight", 1.0))
        at = f"{where}:{lines[n - 1]}" if lines else f"{where}: row {n}"
        conversation = conversation_of(row, chat_template)
        if conversation is not None:
            if template is None:
                raise BadInput(no_template_message("the student", at))
            out.append(encode_conversation(tokenizer, template, conversation, max_length, weight, at))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion", row.get("response")), str):
            response = row.get("completion", row.get("response"))
            out.append(encode_example(tokenizer, row["prompt"], response, max_length, weight))
        elif isinstance(row.get("text"), str):
            out.append(encode_text(tokenizer, row["text"], max_length, weight))
        else:
            raise BadInput(f"{at}: needs 'prompt' and 'response' (or 'completion'), 'messages' or 'text'")
    return out


def read_examples(path: str) -> list[dict[str, Any]]:
    """Training rows from a JSONL file ('-': standard input), each checked before any model loads:
    string `prompt` and `response` (or `completion`), a string `text`, or a conversation
    (`messages`, or TRL's conversational `prompt`/`completion`); a numeric `weight` when given.
    Errors name file:line and the field."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    name = display_name(path)
    rows = ExampleList()
    for lineno, row in read_jsonl_numbered(path):
        where = f"{name}:{lineno}"
        check_example(row, where)
        rows.append(row)
        rows.lines.append(lineno)
    if not rows:
        raise BadInput(f"{name}: no rows")
    return rows


class ExampleList(list):
    """Training rows remembering their line numbers (for errors found after the model loads)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []


def check_example(row: dict[str, Any], where: str) -> None:
    """A Training Example (`prompt`, `response`), a plain `{"text": ...}` row, a `messages` row
    with at least one assistant turn, or TRL's `prompt`/`completion` (strings, or lists of
    messages); BadInput naming the field."""
    from orstack.tasks.contract import validate_messages

    if row.get("messages") is not None:
        if row.get("prompt") is not None or row.get("response") is not None or row.get("completion") is not None:
            raise BadInput(f"{where}: field 'messages': give a conversation or prompt/response, not both")
        validate_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise BadInput(f"{where}: field 'messages': no assistant turn to train on")
        _check_weight(row, where)
        return
    if "completion" in row:
        if "response" in row:
            raise BadInput(f"{where}: fields 'response' and 'completion': give one of them")
        prompt, completion = row.get("prompt"), row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            validate_messages(prompt, where, "prompt")
            validate_messages(completion, where, "completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise BadInput(f"{where}: field 'completion': no assistant turn to train on")
            _check_weight(row, where)
            return
        row = {**row, "response": completion}
    needed = ("text",) if "text" in row and "prompt" not in row and "response" not in row else ("prompt", "response")
    for name in needed:
        value = row.get(name)
        if value is None:
            raise BadInput(f"{where}: missing required field '{name}' (rows need 'prompt' and 'response', "
                           "or 'text')")
        if not isinstance(value, str):
            raise BadInput(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    _check_weight(row, where)


def _check_weight(row: dict[str, Any], where: str) -> None:
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise BadInput(f"{where}: field 'weight': expected a number, got {type(weight).__name__}")


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding), weights."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def read_rows_or_tasks(path: str) -> list[dict[str, Any]]:
    """Training rows, or a task file (e.g. the general tasks rehearsed against forgetting) whose
    tasks train on their reference answers; every row checked before any model loads."""
    from orstack.io.jsonl import read_jsonl_numbered
    from orstack.train.validate import answer_row, is_task_row

    first = next(iter(read_jsonl_numbered(path)), None)
    if first is None or not is_task_row(first[1]):
        return read_examples(path)
    from orstack.tasks.contract import load_tasks

    tasks = load_tasks(path)
    rows = ExampleList()
    for task in tasks:
        rows.append(answer_row(task))
        rows.lines.append(tasks.lines[task["id"]])
    return rows
