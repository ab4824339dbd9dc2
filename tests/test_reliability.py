"""Bad-input and fault suite (issue 15): one table of cases over every subcommand.

Each case runs one command in a fresh working directory holding its own inputs (and, where the
case is about outputs, a pre-existing output) and checks the contract of docs/design.md:
- the exit code (2 for bad usage or input, 1 for a full disk, 130/143 for SIGINT/SIGTERM);
- standard error is exactly one line, naming the file (and line or field where there is one);
- nothing changed on disk: the whole working directory hashes the same before and after (a
  pre-existing output is byte-identical, no temporary sibling `.name.tmp-*` is left), and the
  shared fixtures are untouched.
Signal cases run orstack as a subprocess, signal it mid-work and also check that no process it
started is still running.

Most cases fail before any weights load; the fixtures (a random Llama, its GGUF and .orz, a
random BERT encoder, fake bench results and a router trained on them) are built once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import build_random_llama, run_orstack

# --------------------------------------------------------------------------- input files

TASK = {"id": 1, "prompt": "1+1=", "answer": "2", "kind": "numeric"}


def rows(*items: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in items)


def tasks(n: int = 4, **override) -> str:
    return rows(*({**TASK, "id": i + 1, "prompt": f"{i}+1=", "answer": str(i + 1), **override} for i in range(n)))


EXAMPLE = {"id": 1, "prompt": "1+1=", "response": "2"}
FAILURE = {**TASK, "output": "3", "correct": False, "cluster": 0, "cluster_label": "add"}
RESULT = {**TASK, "model": "m", "output": "2", "correct": True, "score": 1.0, "prompt_tokens": 4, "output_tokens": 2,
          "mean_logprob": -0.1, "min_logprob": -0.5, "mean_entropy": 0.2, "latency_ms": 5.0, "error": None}
STEPS = {"id": 1, "prompt": "1+1=", "answer": "2", "steps": [{"action": "2", "reasoning": "add", "reward": 1.0}]}
# Each value is file content (str or bytes), DIR (an empty directory), USER_DIR (a directory of
# the user's files, not written by orstack), OLD_DIR (an earlier orstack output), or a function
# of the fixtures writing the entry itself.
DIR, USER_DIR, OLD_DIR = "<dir>", "<user-dir>", "<orstack-dir>"


def bad_json(first: dict) -> str:
    """A good row of a contract, then a line that is not JSON (line 2)."""
    return rows(first) + '{"id": 2,,}\n'


def not_utf8(first: dict) -> bytes:
    """A good row of a contract, then a row with invalid UTF-8 (line 2)."""
    return rows(first).encode() + b'{"id": 2, "prompt": "\xff\xfe", "text": "\xff"}\n'


BAD_JSON = bad_json(TASK)
NOT_UTF8 = not_utf8(TASK)
NOT_UTF8_TEXT = b"first line\nsecond line\nthird \xff line\n"
TEXT = "The quick brown fox jumps over the lazy dog. 12+345=357\n" * 40


def copy_of(key: str, edit: Callable[[Path], None] | None = None) -> Callable[[dict, Path], None]:
    """A copy of a fixture (file or directory), optionally damaged by `edit`."""
    def make(fx: dict, dest: Path) -> None:
        src = Path(fx[key])
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copyfile(src, dest)
        if edit is not None:
            edit(dest)

    return make


def truncate(name: str | None = None, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        target = path / name if name else path
        data = target.read_bytes()
        target.write_bytes(data[: int(len(data) * keep)])

    return edit


def overwrite(name: str | None, data: bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name if name else path).write_bytes(data)

    return edit


def flip_byte(fraction: float) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[int(len(data) * fraction)] ^= 0xFF
        path.write_bytes(bytes(data))

    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        obj = json.loads((path / name).read_text())
        change(obj)
        (path / name).write_text(json.dumps(obj))

    return edit


TRUNCATED_ST = copy_of("llama", truncate("model.safetensors"))
GARBAGE_ST = copy_of("llama", overwrite("model.safetensors", b"this is not a safetensors file\n" * 100))
EMPTY_ST = copy_of("llama", overwrite("model.safetensors", b""))
NO_CONFIG = copy_of("llama", remove("config.json"))
BAD_CONFIG = copy_of("llama", overwrite("config.json", b"{not json"))
TRUNCATED_GGUF = copy_of("gguf", truncate(keep=0.6))
GARBAGE_GGUF = copy_of("gguf", overwrite(None, b"GGUF" + b"\xff" * 400))
TRUNCATED_ORZ = copy_of("orz", truncate(keep=0.7))
GARBAGE_ORZ = copy_of("orz", overwrite(None, b"not a pack\n" * 50))
FLIPPED_ORZ = copy_of("orz", flip_byte(0.5))
TRUNCATED_ROUTER = copy_of("router", truncate("router.json"))
BROKEN_ROUTER = copy_of("router", overwrite("router.json", b'{"threshold": "high"}'))
HUGE_PROMPT = rows({**TASK, "prompt": "the quick brown fox " * 500_000 + "1+1="})  # 10 MB


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # shell words; {llama}, {gguf}, ... are fixture paths, other paths are in the case directory
    names: tuple[str, ...]  # what the one line on stderr must contain (file, line, field, option)
    code: int = 2
    files: dict = field(default_factory=dict)
    stdin: str | bytes | None = None
    signal: int | None = None  # a signal case: run as a subprocess and send this signal mid-work
    needs: str | None = None  # "ro" or "full": a read-only / a full file system (skipped when unavailable)
    # Run as a subprocess, killed after ISOLATED_TIMEOUT: an input that, unrefused, costs minutes or
    # tens of GB (a 10 MB prompt) must not take the test session down with it.
    isolated: bool = False


def C(id: str, args: str, *names: str, code: int = 2, files: dict | None = None, stdin: str | bytes | None = None,
      sig: int | None = None, needs: str | None = None, isolated: bool = False) -> Case:
    return Case(id, args, names, code, files or {}, stdin, sig, needs, isolated)


ISOLATED_TIMEOUT = 30


T = {"t.jsonl": tasks()}  # a valid task file in the case directory
CASES = [
    # ---- tiny
    C("tiny/out-is-a-file", "tiny -o out", "out", files={"out": "my notes\n"}),
    C("tiny/out-is-a-user-dir", "tiny -o out", "out", files={"out": USER_DIR}),
    C("tiny/missing-parent", "tiny -o nodir/model", "nodir"),
    C("tiny/tasks-out-is-a-file", "tiny -o model --tasks-out tasks", "tasks", files={"tasks": "x\n"}),
    C("tiny/same-path-twice", "tiny -o same --tasks-out same", "same"),
    C("tiny/steps-zero", "tiny -o model --steps 0", "--steps"),
    C("tiny/threads-zero", "tiny -o model --threads 0", "--threads"),
    C("tiny/device-cuda", "--device cuda tiny -o model --steps 2", "--device cuda"),
    C("tiny/bad-device-name", "--device tpu tiny -o model", "--device"),
    C("tiny/read-only", "tiny -o {ro}/model", "model", needs="ro"),
    C("tiny/read-only-existing", "tiny -o {ro}/old-dir", "old-dir", needs="ro"),
    C("tiny/sigint", "tiny -o model --steps 100000", "interrupted", code=130, sig=signal.SIGINT,
      files={"model": OLD_DIR}),
    C("tiny/sigterm", "tiny -o model --steps 100000", "terminated", code=143, sig=signal.SIGTERM,
      files={"model": OLD_DIR}),
    # ---- bench: tasks
    C("bench/missing-model", "bench nope --tasks t.jsonl -o r.jsonl", "nope", files=T),
    C("bench/missing-tasks", "bench {llama} --tasks nope.jsonl -o r.jsonl", "nope.jsonl"),
    C("bench/tasks-is-a-dir", "bench {llama} --tasks tdir -o r.jsonl", "tdir", files={"tdir": DIR}),
    C("bench/tasks-empty", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl", files={"t.jsonl": ""}),
    C("bench/tasks-bad-json", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:2", files={"t.jsonl": BAD_JSON}),
    C("bench/tasks-not-object", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", files={"t.jsonl": "[1, 2]\n"}),
    C("bench/tasks-not-utf8", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:2", files={"t.jsonl": NOT_UTF8}),
    C("bench/tasks-stdin-bad-json", "bench {llama} --tasks - -o r.jsonl", "<stdin>:2", stdin=BAD_JSON),
    C("bench/prompt-is-a-number", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "prompt",
      files={"t.jsonl": rows({**TASK, "prompt": 12})}),
    C("bench/prompt-missing", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "prompt",
      files={"t.jsonl": rows({"id": 1, "answer": "2", "kind": "numeric"})}),
    C("bench/answer-missing", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "answer",
      files={"t.jsonl": rows({"id": 1, "prompt": "1+1=", "kind": "numeric"})}),
    C("bench/unknown-kind", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "kind",
      files={"t.jsonl": rows({**TASK, "kind": "telepathy"})}),
    C("bench/duplicate-ids", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:2", "id",
      files={"t.jsonl": rows(TASK, TASK)}),
    C("bench/id-is-a-list", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "id",
      files={"t.jsonl": rows({**TASK, "id": [1]})}),
    C("bench/max-new-tokens-not-int", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1", "max_new_tokens",
      files={"t.jsonl": rows({**TASK, "max_new_tokens": "many"})}),
    C("bench/huge-prompt", "bench {llama} --tasks t.jsonl -o r.jsonl", "t.jsonl:1",
      files={"t.jsonl": HUGE_PROMPT}, isolated=True),
    # ---- bench: models
    C("bench/truncated-safetensors", "bench m --tasks t.jsonl -o r.jsonl", "model.safetensors",
      files={**T, "m": TRUNCATED_ST}),
    C("bench/garbage-safetensors", "bench m --tasks t.jsonl -o r.jsonl", "model.safetensors",
      files={**T, "m": GARBAGE_ST}),
    C("bench/empty-safetensors", "bench m --tasks t.jsonl -o r.jsonl", "model.safetensors",
      files={**T, "m": EMPTY_ST}),
    C("bench/no-config", "bench m --tasks t.jsonl -o r.jsonl", "m", files={**T, "m": NO_CONFIG}),
    C("bench/bad-config", "bench m --tasks t.jsonl -o r.jsonl", "m", files={**T, "m": BAD_CONFIG}),
    C("bench/truncated-gguf", "bench m.gguf --tasks t.jsonl -o r.jsonl", "m.gguf",
      files={**T, "m.gguf": TRUNCATED_GGUF}),
    C("bench/garbage-gguf", "bench m.gguf --tasks t.jsonl -o r.jsonl", "m.gguf", files={**T, "m.gguf": GARBAGE_GGUF}),
    C("bench/truncated-orz", "bench m.orz --tasks t.jsonl -o r.jsonl", "m.orz", files={**T, "m.orz": TRUNCATED_ORZ}),
    C("bench/garbage-orz", "bench m.orz --tasks t.jsonl -o r.jsonl", "m.orz", files={**T, "m.orz": GARBAGE_ORZ}),
    C("bench/flipped-orz", "bench m.orz --tasks t.jsonl -o r.jsonl", "m.orz", files={**T, "m.orz": FLIPPED_ORZ}),
    C("bench/encoder", "bench {bert} --tasks t.jsonl -o r.jsonl", "bert", "BertModel", files=T),
    C("bench/second-model-missing", "bench {llama} nope --tasks t.jsonl -o r.jsonl", "nope", files=T),
    C("bench/model-is-a-text-file", "bench t.jsonl --tasks t.jsonl -o r.jsonl", "t.jsonl", files=T),
    C("bench/device-cuda", "--device cuda bench {llama} --tasks t.jsonl -o r.jsonl", "--device cuda", files=T),
    # ---- bench: other inputs and outputs
    C("bench/ppl-missing", "bench {llama} --tasks t.jsonl --ppl nope.txt -o r.jsonl", "nope.txt", files=T),
    C("bench/ppl-empty", "bench {llama} --tasks t.jsonl --ppl e.txt -o r.jsonl", "e.txt", files={**T, "e.txt": ""}),
    C("bench/ppl-is-a-dir", "bench {llama} --tasks t.jsonl --ppl pdir -o r.jsonl", "pdir", files={**T, "pdir": DIR}),
    C("bench/ppl-not-utf8", "bench {llama} --tasks t.jsonl --ppl p.txt -o r.jsonl", "p.txt:3",
      files={**T, "p.txt": NOT_UTF8_TEXT}),
    C("bench/ppl-rule-unknown", "bench {llama} --tasks t.jsonl --ppl-rule median -o r.jsonl", "--ppl-rule", files=T),
    C("bench/out-is-a-dir", "bench {llama} --tasks t.jsonl -o out", "out", files={**T, "out": USER_DIR}),
    C("bench/summary-is-a-dir", "bench {llama} --tasks t.jsonl -o r.jsonl --summary s", "s",
      files={**T, "s": USER_DIR}),
    C("bench/out-and-summary-same", "bench {llama} --tasks t.jsonl -o same.json --summary same.json", "same.json",
      files=T),
    C("bench/out-and-plot-same", "bench {llama} --tasks t.jsonl -o same.png --plot same.png", "same.png", files=T),
    C("bench/out-is-the-tasks", "bench {llama} --tasks t.jsonl -o t.jsonl", "t.jsonl", files=T),
    C("bench/missing-parent", "bench {llama} --tasks t.jsonl -o nodir/r.jsonl", "nodir", files=T),
    C("bench/read-only", "bench {llama} --tasks t.jsonl -o {ro}/r.jsonl", "r.jsonl", needs="ro", files=T),
    C("bench/read-only-existing", "bench {llama} --tasks t.jsonl -o {ro}/old.jsonl", "old.jsonl", needs="ro",
      files=T),
    C("bench/limit-zero", "bench {llama} --tasks t.jsonl --limit 0", "--limit", files=T),
    C("bench/batch-size-zero", "bench {llama} --tasks t.jsonl --batch-size 0", "--batch-size", files=T),
    C("bench/fail-under-above-one", "bench {llama} --tasks t.jsonl --fail-under 2", "--fail-under", files=T),
    C("bench/no-tasks-no-ppl", "bench {llama} -o r.jsonl", "--tasks"),
    C("bench/score-bad-json", "bench --score s.jsonl -o r.jsonl", "s.jsonl:2", files={"s.jsonl": bad_json(RESULT)}),
    C("bench/score-missing", "bench --score nope.jsonl", "nope.jsonl"),
    C("bench/sigterm", "bench {llama} --tasks big.jsonl --max-new-tokens 200 --batch-size 1 -o r.jsonl",
      "terminated", code=143, sig=signal.SIGTERM, files={"big.jsonl": tasks(500), "r.jsonl": "old results\n"}),
    C("bench/sigint", "bench {llama} --tasks big.jsonl --max-new-tokens 200 --batch-size 1 -o r.jsonl",
      "interrupted", code=130, sig=signal.SIGINT, files={"big.jsonl": tasks(500), "r.jsonl": "old results\n"}),
    # ---- vocab-trim
    C("vocab-trim/missing-model", "vocab-trim nope --corpus c.txt -o out", "nope", files={"c.txt": TEXT}),
    C("vocab-trim/corpus-missing", "vocab-trim {llama} --corpus nope.txt -o out", "nope.txt"),
    C("vocab-trim/corpus-is-a-dir", "vocab-trim {llama} --corpus cdir -o out", "cdir", files={"cdir": DIR}),
    C("vocab-trim/corpus-empty", "vocab-trim {llama} --corpus c.txt -o out", "c.txt", files={"c.txt": ""}),
    C("vocab-trim/corpus-not-utf8", "vocab-trim {llama} --corpus c.txt -o out", "c.txt:3",
      files={"c.txt": NOT_UTF8_TEXT}),
    C("vocab-trim/corpus-bad-jsonl", "vocab-trim {llama} --corpus c.jsonl -o out", "c.jsonl:2",
      files={"c.jsonl": BAD_JSON}),
    C("vocab-trim/keep-missing", "vocab-trim {llama} --corpus c.txt --keep nope.txt -o out", "nope.txt",
      files={"c.txt": TEXT}),
    C("vocab-trim/validate-missing", "vocab-trim {llama} --corpus c.txt --validate nope.txt -o out", "nope.txt",
      files={"c.txt": TEXT}),
    C("vocab-trim/coverage-above-one", "vocab-trim {llama} --corpus c.txt --coverage 1.5 -o out", "--coverage",
      files={"c.txt": TEXT}),
    C("vocab-trim/out-is-a-file", "vocab-trim {llama} --corpus c.txt -o out", "out",
      files={"c.txt": TEXT, "out": "mine\n"}),
    C("vocab-trim/out-is-a-user-dir", "vocab-trim {llama} --corpus c.txt -o out", "out",
      files={"c.txt": TEXT, "out": USER_DIR}),
    C("vocab-trim/missing-parent", "vocab-trim {llama} --corpus c.txt -o nodir/out", "nodir", files={"c.txt": TEXT}),
    C("vocab-trim/out-is-the-model", "vocab-trim m --corpus c.txt -o m", "m",
      files={"c.txt": TEXT, "m": copy_of("llama")}),
    C("vocab-trim/read-only", "vocab-trim {llama} --corpus c.txt -o {ro}/out", "out", needs="ro",
      files={"c.txt": TEXT}),
    C("vocab-trim/truncated-safetensors", "vocab-trim m --corpus c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": TRUNCATED_ST}),
    C("vocab-trim/garbage-safetensors", "vocab-trim m --corpus c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": GARBAGE_ST}),
    C("vocab-trim/encoder", "vocab-trim {bert} --corpus c.txt -o out", "bert", files={"c.txt": TEXT}),
    C("vocab-trim/garbage-orz", "vocab-trim m.orz --corpus c.txt -o out", "m.orz",
      files={"c.txt": TEXT, "m.orz": GARBAGE_ORZ}),
    C("vocab-trim/device-cuda", "--device cuda vocab-trim {llama} --corpus c.txt -o out", "--device cuda",
      files={"c.txt": TEXT}),
    # ---- cluster-failures
    C("cluster/missing-input", "cluster-failures nope.jsonl -o c.jsonl", "nope.jsonl"),
    C("cluster/input-is-a-dir", "cluster-failures fdir -o c.jsonl", "fdir", files={"fdir": DIR}),
    C("cluster/bad-json", "cluster-failures f.jsonl -o c.jsonl", "f.jsonl:2", files={"f.jsonl": bad_json(FAILURE)}),
    C("cluster/not-utf8", "cluster-failures f.jsonl -o c.jsonl", "f.jsonl:2", files={"f.jsonl": not_utf8(FAILURE)}),
    C("cluster/not-object", "cluster-failures f.jsonl -o c.jsonl", "f.jsonl:1", files={"f.jsonl": '"row"\n'}),
    C("cluster/stdin-bad-json", "cluster-failures - -o c.jsonl", "<stdin>:2", stdin=BAD_JSON),
    C("cluster/correct-is-a-string", "cluster-failures f.jsonl -o c.jsonl --embedder tfidf", "f.jsonl:2", "correct",
      files={"f.jsonl": rows(FAILURE, {**FAILURE, "id": 2, "correct": "no"})}),
    C("cluster/empty", "cluster-failures f.jsonl -o c.jsonl", "f.jsonl", files={"f.jsonl": ""}),
    C("cluster/out-is-a-dir", "cluster-failures f.jsonl -o out", "out",
      files={"f.jsonl": rows(FAILURE), "out": USER_DIR}),
    C("cluster/annotate-is-a-dir", "cluster-failures f.jsonl -o c.jsonl --annotate a", "a",
      files={"f.jsonl": rows(FAILURE), "a": USER_DIR}),
    C("cluster/out-and-annotate-same", "cluster-failures f.jsonl -o same.jsonl --annotate same.jsonl", "same.jsonl",
      files={"f.jsonl": rows(FAILURE)}),
    C("cluster/out-and-plot-same", "cluster-failures f.jsonl -o same.png --plot same.png", "same.png",
      files={"f.jsonl": rows(FAILURE)}),
    C("cluster/out-is-the-input", "cluster-failures f.jsonl -o f.jsonl", "f.jsonl", files={"f.jsonl": rows(FAILURE)}),
    C("cluster/missing-parent", "cluster-failures f.jsonl -o nodir/c.jsonl", "nodir",
      files={"f.jsonl": rows(FAILURE)}),
    C("cluster/read-only", "cluster-failures f.jsonl -o {ro}/c.jsonl", "c.jsonl", needs="ro",
      files={"f.jsonl": rows(FAILURE)}),
    C("cluster/k-not-a-number", "cluster-failures f.jsonl -k lots", "-k", files={"f.jsonl": rows(FAILURE)}),
    C("cluster/k-max-one", "cluster-failures f.jsonl --k-max 1", "--k-max", files={"f.jsonl": rows(FAILURE)}),
    C("cluster/embedder-missing", "cluster-failures f.jsonl --embedder nope-model", "nope-model",
      files={"f.jsonl": rows(FAILURE)}),
    C("cluster/embedder-causal-lm", "cluster-failures f.jsonl --embedder {llama}", "llama",
      files={"f.jsonl": rows(FAILURE)}),
    # ---- distill generate
    C("generate/missing-failures", "distill generate --failures nope.jsonl --teacher {llama} -o g.jsonl", "nope.jsonl"),
    C("generate/failures-bad-json", "distill generate --failures f.jsonl --teacher {llama} -o g.jsonl", "f.jsonl:2",
      files={"f.jsonl": BAD_JSON}),
    C("generate/failures-not-utf8", "distill generate --failures f.jsonl --teacher {llama} -o g.jsonl", "f.jsonl:2",
      files={"f.jsonl": NOT_UTF8}),
    C("generate/failures-empty", "distill generate --failures f.jsonl --teacher {llama} -o g.jsonl", "f.jsonl",
      files={"f.jsonl": ""}),
    C("generate/prompt-is-a-number", "distill generate --failures f.jsonl --teacher {llama} -o g.jsonl",
      "f.jsonl:1", "prompt", files={"f.jsonl": rows({**FAILURE, "prompt": 7})}),
    C("generate/stdin-bad-json", "distill generate --failures - --teacher {llama} -o g.jsonl", "<stdin>:2",
      stdin=BAD_JSON),
    C("generate/no-teacher", "distill generate --failures f.jsonl -o g.jsonl", "--teacher",
      files={"f.jsonl": rows(FAILURE)}),
    C("generate/teacher-missing", "distill generate --failures f.jsonl --teacher nope -o g.jsonl", "nope",
      files={"f.jsonl": rows(FAILURE)}),
    C("generate/teacher-truncated-gguf", "distill generate --failures f.jsonl --teacher m.gguf -o g.jsonl", "m.gguf",
      files={"f.jsonl": rows(FAILURE), "m.gguf": TRUNCATED_GGUF}),
    C("generate/teacher-truncated-safetensors", "distill generate --failures f.jsonl --teacher m -o g.jsonl",
      "model.safetensors", files={"f.jsonl": rows(FAILURE), "m": TRUNCATED_ST}),
    C("generate/teacher-encoder", "distill generate --failures f.jsonl --teacher {bert} -o g.jsonl", "BertModel",
      files={"f.jsonl": rows(FAILURE)}),
    C("generate/teacher-api-unknown",
      "distill generate --failures f.jsonl --teacher http://127.0.0.1:9/v1 --teacher-api rest -o g.jsonl",
      "--teacher-api", files={"f.jsonl": rows(FAILURE)}),
    C("generate/out-is-a-dir", "distill generate --failures f.jsonl --teacher {llama} -o out", "out",
      files={"f.jsonl": rows(FAILURE), "out": USER_DIR}),
    C("generate/out-and-report-same", "distill generate --failures f.jsonl --teacher {llama} -o s.json --report s.json",
      "s.json", files={"f.jsonl": rows(FAILURE)}),
    C("generate/out-is-the-input", "distill generate --failures f.jsonl --teacher {llama} -o f.jsonl", "f.jsonl",
      files={"f.jsonl": rows(FAILURE)}),
    C("generate/missing-parent", "distill generate --failures f.jsonl --teacher {llama} -o nodir/g.jsonl", "nodir",
      files={"f.jsonl": rows(FAILURE)}),
    C("generate/read-only", "distill generate --failures f.jsonl --teacher {llama} -o {ro}/g.jsonl", "g.jsonl",
      needs="ro", files={"f.jsonl": rows(FAILURE)}),
    C("generate/device-cuda", "--device cuda distill generate --failures f.jsonl --teacher {llama} -o g.jsonl",
      "--device cuda", files={"f.jsonl": rows(FAILURE)}),
    C("generate/sigterm-cmd-teacher",
      "distill generate --failures f.jsonl --teacher 'cmd:sleep 300' --timeout 600 -o g.jsonl", "terminated",
      code=143, sig=signal.SIGTERM, files={"f.jsonl": rows(FAILURE), "g.jsonl": "old examples\n"}),
    C("generate/sigint-cmd-teacher",
      "distill generate --failures f.jsonl --teacher 'cmd:sleep 300' --timeout 600 -o g.jsonl", "interrupted",
      code=130, sig=signal.SIGINT, files={"f.jsonl": rows(FAILURE), "g.jsonl": "old examples\n"}),
    # ---- distill train
    C("train/missing-student", "distill train nope --data d.jsonl -o out", "nope", files={"d.jsonl": rows(EXAMPLE)}),
    C("train/data-missing", "distill train {llama} --data nope.jsonl -o out", "nope.jsonl"),
    C("train/data-is-a-dir", "distill train {llama} --data ddir -o out", "ddir", files={"ddir": DIR}),
    C("train/data-empty", "distill train {llama} --data d.jsonl -o out", "d.jsonl", files={"d.jsonl": ""}),
    C("train/data-bad-json", "distill train {llama} --data d.jsonl -o out", "d.jsonl:2",
      files={"d.jsonl": bad_json(EXAMPLE)}),
    C("train/data-not-utf8", "distill train {llama} --data d.jsonl -o out", "d.jsonl:2",
      files={"d.jsonl": rows(EXAMPLE).encode() + b'{"prompt": "\xff", "response": "1"}\n'}),
    C("train/data-stdin-bad-json", "distill train {llama} --data - -o out", "<stdin>:2",
      stdin=rows(EXAMPLE) + "{oops\n"),
    C("train/prompt-is-a-number", "distill train {llama} --data d.jsonl -o out", "d.jsonl:1", "prompt",
      files={"d.jsonl": rows({**EXAMPLE, "prompt": 3})}),
    C("train/response-missing", "distill train {llama} --data d.jsonl -o out", "d.jsonl:1", "response",
      files={"d.jsonl": rows({"prompt": "1+1="})}),
    C("train/weight-is-a-string", "distill train {llama} --data d.jsonl -o out", "d.jsonl:1", "weight",
      files={"d.jsonl": rows({**EXAMPLE, "weight": "heavy"})}),
    C("train/student-encoder", "distill train {bert} --data d.jsonl -o out", "BertModel",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/student-truncated-safetensors", "distill train m --data d.jsonl -o out", "model.safetensors",
      files={"d.jsonl": rows(EXAMPLE), "m": TRUNCATED_ST}),
    C("train/student-garbage-orz", "distill train m.orz --data d.jsonl -o out", "m.orz",
      files={"d.jsonl": rows(EXAMPLE), "m.orz": GARBAGE_ORZ}),
    C("train/logits-teacher-missing", "distill train {llama} --data d.jsonl --logits nope -o out", "nope",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/logits-teacher-encoder", "distill train {llama} --data d.jsonl --logits {bert} -o out", "BertModel",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/out-is-a-file", "distill train {llama} --data d.jsonl -o out", "out",
      files={"d.jsonl": rows(EXAMPLE), "out": "mine\n"}),
    C("train/out-is-a-user-dir", "distill train {llama} --data d.jsonl -o out", "out",
      files={"d.jsonl": rows(EXAMPLE), "out": USER_DIR}),
    C("train/out-and-log-same", "distill train {llama} --data d.jsonl -o same --log same", "same",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/log-is-a-dir", "distill train {llama} --data d.jsonl -o out --log ldir", "ldir",
      files={"d.jsonl": rows(EXAMPLE), "ldir": USER_DIR}),
    C("train/missing-parent", "distill train {llama} --data d.jsonl -o nodir/out", "nodir",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/read-only", "distill train {llama} --data d.jsonl -o {ro}/out", "out", needs="ro",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/recover-fraction-zero", "distill train {llama} --data d.jsonl --recover --recover-fraction 0 -o out",
      "--recover-fraction", files={"d.jsonl": rows(EXAMPLE)}),
    C("train/lr-negative", "distill train {llama} --data d.jsonl --lr -1 -o out", "--lr",
      files={"d.jsonl": rows(EXAMPLE)}),
    C("train/device-cuda", "--device cuda distill train {llama} --data d.jsonl -o out", "--device cuda",
      files={"d.jsonl": rows(EXAMPLE)}),
    # ---- prune
    C("prune/missing-model", "prune nope --calib c.txt -o out", "nope", files={"c.txt": TEXT}),
    C("prune/calib-missing", "prune {llama} --calib nope.txt -o out", "nope.txt"),
    C("prune/calib-empty", "prune {llama} --calib c.txt -o out", "c.txt", files={"c.txt": ""}),
    C("prune/calib-is-a-dir", "prune {llama} --calib cdir -o out", "cdir", files={"cdir": DIR}),
    C("prune/calib-not-utf8", "prune {llama} --calib c.txt -o out --nsamples 2 --seqlen 16", "c.txt:3",
      files={"c.txt": NOT_UTF8_TEXT}),
    C("prune/calib-bad-jsonl", "prune {llama} --calib c.jsonl -o out --nsamples 2 --seqlen 16", "c.jsonl:2",
      files={"c.jsonl": BAD_JSON}),
    C("prune/heldout-missing", "prune {llama} --calib c.txt --heldout nope.txt -o out", "nope.txt",
      files={"c.txt": TEXT}),
    C("prune/recover-missing", "prune {llama} --calib c.txt --recover nope.jsonl -o out", "nope.jsonl",
      files={"c.txt": TEXT}),
    C("prune/sparsity-above-one", "prune {llama} --calib c.txt --sparsity 1.5 -o out", "--sparsity",
      files={"c.txt": TEXT}),
    C("prune/pattern-and-sparsity", "prune {llama} --calib c.txt --pattern 2:4 --sparsity 0.7 -o out", "--pattern",
      files={"c.txt": TEXT}),
    C("prune/pattern-malformed", "prune {llama} --calib c.txt --pattern 4:2 -o out", "--pattern",
      files={"c.txt": TEXT}),
    C("prune/method-unknown", "prune {llama} --calib c.txt --method random -o out", "--method",
      files={"c.txt": TEXT}),
    C("prune/dtype-unknown", "prune {llama} --calib c.txt --dtype int3 -o out", "int3", files={"c.txt": TEXT}),
    C("prune/grid-malformed", "prune {llama} --calib c.txt --grid 0.5,lots -o out", "--grid", files={"c.txt": TEXT}),
    C("prune/seqlen-beyond-context", "prune {llama} --calib c.txt --seqlen 100000 -o out", "--seqlen",
      files={"c.txt": TEXT}),
    C("prune/out-is-a-file", "prune {llama} --calib c.txt -o out", "out", files={"c.txt": TEXT, "out": "mine\n"}),
    C("prune/out-is-a-user-dir", "prune {llama} --calib c.txt -o out", "out",
      files={"c.txt": TEXT, "out": USER_DIR}),
    C("prune/out-is-the-model", "prune m --calib c.txt -o m", "m", files={"c.txt": TEXT, "m": copy_of("llama")}),
    C("prune/missing-parent", "prune {llama} --calib c.txt -o nodir/out", "nodir", files={"c.txt": TEXT}),
    C("prune/read-only", "prune {llama} --calib c.txt -o {ro}/out", "out", needs="ro", files={"c.txt": TEXT}),
    C("prune/read-only-existing", "prune {llama} --calib c.txt -o {ro}/old-dir", "old-dir", needs="ro",
      files={"c.txt": TEXT}),
    C("prune/truncated-safetensors", "prune m --calib c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": TRUNCATED_ST}),
    C("prune/garbage-safetensors", "prune m --calib c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": GARBAGE_ST}),
    C("prune/sharded-index-names-missing-shard", "prune m --calib c.txt -o out", "model-00002-of-00002.safetensors",
      files={"c.txt": TEXT, "m": copy_of("llama", overwrite("model.safetensors.index.json", json.dumps(
          {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}).encode()))}),
    C("prune/encoder", "prune {bert} --calib c.txt -o out", "bert", files={"c.txt": TEXT}),
    C("prune/garbage-orz", "prune m.orz --calib c.txt -o out", "m.orz", files={"c.txt": TEXT, "m.orz": GARBAGE_ORZ}),
    C("prune/gguf-input", "prune {gguf} --calib c.txt -o out", "model.gguf", files={"c.txt": TEXT}),
    C("prune/device-cuda", "--device cuda prune {llama} --calib c.txt -o out", "--device cuda",
      files={"c.txt": TEXT}),
    C("prune/sigterm", "prune {llama} --calib c.txt --nsamples 2 --seqlen 16 --recover c.txt --steps 100000 -o out",
      "terminated", code=143, sig=signal.SIGTERM, files={"c.txt": TEXT, "out": OLD_DIR}),
    # ---- awq
    C("awq/missing-model", "awq nope --calib c.txt -o out", "nope", files={"c.txt": TEXT}),
    C("awq/calib-missing", "awq {llama} --calib nope.txt -o out", "nope.txt"),
    C("awq/calib-empty", "awq {llama} --calib c.txt -o out", "c.txt", files={"c.txt": ""}),
    C("awq/calib-is-a-dir", "awq {llama} --calib cdir -o out", "cdir", files={"cdir": DIR}),
    C("awq/heldout-missing", "awq {llama} --calib c.txt --heldout nope.txt -o out", "nope.txt",
      files={"c.txt": TEXT}),
    C("awq/bits-five", "awq {llama} --calib c.txt --bits 5 -o out", "--bits", files={"c.txt": TEXT}),
    C("awq/group-size-malformed", "awq {llama} --calib c.txt --group-size big -o out", "--group-size",
      files={"c.txt": TEXT}),
    C("awq/group-size-not-dividing", "awq {llama} --calib c.txt --group-size 100 -o out", "--group-size",
      files={"c.txt": TEXT}),
    C("awq/out-is-a-file", "awq {llama} --calib c.txt -o out", "out", files={"c.txt": TEXT, "out": "mine\n"}),
    C("awq/out-is-a-user-dir", "awq {llama} --calib c.txt -o out", "out", files={"c.txt": TEXT, "out": USER_DIR}),
    C("awq/out-is-the-model", "awq m --calib c.txt -o m", "m", files={"c.txt": TEXT, "m": copy_of("llama")}),
    C("awq/missing-parent", "awq {llama} --calib c.txt -o nodir/out", "nodir", files={"c.txt": TEXT}),
    C("awq/read-only", "awq {llama} --calib c.txt -o {ro}/out", "out", needs="ro", files={"c.txt": TEXT}),
    C("awq/truncated-safetensors", "awq m --calib c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": TRUNCATED_ST}),
    C("awq/empty-safetensors", "awq m --calib c.txt -o out", "model.safetensors",
      files={"c.txt": TEXT, "m": EMPTY_ST}),
    C("awq/encoder", "awq {bert} --calib c.txt -o out", "bert", files={"c.txt": TEXT}),
    C("awq/truncated-orz", "awq m.orz --calib c.txt -o out", "m.orz", files={"c.txt": TEXT, "m.orz": TRUNCATED_ORZ}),
    C("awq/device-cuda", "--device cuda awq {llama} --calib c.txt -o out", "--device cuda", files={"c.txt": TEXT}),
    # ---- gguf
    C("gguf/missing-model", "gguf nope -o m.gguf", "nope"),
    C("gguf/type-unknown", "gguf {llama} --type q3_z -o m.gguf", "q3_z"),
    C("gguf/prompts-missing", "gguf {llama} --prompts nope.jsonl -o m.gguf", "nope.jsonl"),
    C("gguf/prompts-bad-json", "gguf {llama} --prompts p.jsonl --no-validate -o m.gguf", "p.jsonl:2",
      files={"p.jsonl": BAD_JSON}),
    C("gguf/prompt-is-a-number", "gguf {llama} --prompts p.jsonl --no-validate -o m.gguf", "p.jsonl:1", "prompt",
      files={"p.jsonl": rows({**TASK, "prompt": 5})}),
    C("gguf/text-missing", "gguf {llama} --text nope.txt -o m.gguf", "nope.txt"),
    C("gguf/text-empty", "gguf {llama} --text e.txt -o m.gguf", "e.txt", files={"e.txt": ""}),
    C("gguf/text-is-a-dir", "gguf {llama} --text tdir -o m.gguf", "tdir", files={"tdir": DIR}),
    C("gguf/out-is-a-dir", "gguf {llama} -o out", "out", files={"out": USER_DIR}),
    C("gguf/out-is-an-orstack-dir", "gguf {llama} -o out", "out", files={"out": OLD_DIR}),
    C("gguf/missing-parent", "gguf {llama} -o nodir/m.gguf", "nodir"),
    C("gguf/read-only", "gguf {llama} -o {ro}/m.gguf", "m.gguf", needs="ro"),
    C("gguf/read-only-existing", "gguf {llama} -o {ro}/old.gguf", "old.gguf", needs="ro"),
    C("gguf/disk-full", "gguf {llama} --no-validate -o {full}/m.gguf", "no space left", "m.gguf", code=1,
      needs="full"),
    C("gguf/truncated-safetensors", "gguf m -o m.gguf", "model.safetensors", files={"m": TRUNCATED_ST}),
    C("gguf/garbage-safetensors", "gguf m -o m.gguf", "model.safetensors", files={"m": GARBAGE_ST}),
    C("gguf/encoder", "gguf {bert} -o m.gguf", "bert"),
    C("gguf/garbage-orz", "gguf m.orz -o m.gguf", "m.orz", files={"m.orz": GARBAGE_ORZ}),
    C("gguf/tokens-zero", "gguf {llama} --tokens 0 -o m.gguf", "--tokens"),
    C("gguf/device-cuda", "--device cuda gguf {llama} -o m.gguf", "--device cuda"),
    # ---- zstd-pack
    C("zstd-pack/missing-input", "zstd-pack nope -o p.orz", "nope"),
    C("zstd-pack/out-is-a-dir", "zstd-pack {llama} -o out", "out", files={"out": USER_DIR}),
    C("zstd-pack/out-is-the-input", "zstd-pack f.bin -o f.bin", "f.bin", files={"f.bin": b"\0" * 5000}),
    C("zstd-pack/missing-parent", "zstd-pack {llama} -o nodir/p.orz", "nodir"),
    C("zstd-pack/read-only", "zstd-pack {llama} -o {ro}/p.orz", "p.orz", needs="ro"),
    C("zstd-pack/disk-full", "zstd-pack {llama} -o {full}/p.orz", "no space left", "p.orz", code=1, needs="full"),
    C("zstd-pack/level-out-of-range", "zstd-pack {llama} --level 99 -o p.orz", "--level"),
    C("zstd-pack/chunk-size-malformed", "zstd-pack {llama} --chunk-size huge -o p.orz", "--chunk-size"),
    C("zstd-pack/dict-size-malformed", "zstd-pack {llama} --dict-size -3 -o p.orz", "--dict-size"),
    C("zstd-pack/unpack-garbage", "zstd-pack -d m.orz -o out", "m.orz", files={"m.orz": GARBAGE_ORZ}),
    C("zstd-pack/unpack-truncated", "zstd-pack -d m.orz -o out", "m.orz", files={"m.orz": TRUNCATED_ORZ}),
    C("zstd-pack/unpack-flipped", "zstd-pack -d m.orz -o out", "m.orz", files={"m.orz": FLIPPED_ORZ}),
    C("zstd-pack/unpack-onto-a-file", "zstd-pack -d {orz} -o out", "out", files={"out": "mine\n"}),
    C("zstd-pack/unpack-onto-a-user-dir", "zstd-pack -d {orz} -o out", "out", files={"out": USER_DIR}),
    C("zstd-pack/verify-flipped", "zstd-pack --verify m.orz", "m.orz", files={"m.orz": FLIPPED_ORZ}),
    C("zstd-pack/list-flipped", "zstd-pack --list m.orz", "m.orz", files={"m.orz": FLIPPED_ORZ}),
    C("zstd-pack/list-truncated", "zstd-pack --list m.orz", "m.orz", files={"m.orz": TRUNCATED_ORZ}),
    C("zstd-pack/sigint", "zstd-pack big.bin --level 19 -o big.orz", "interrupted", code=130, sig=signal.SIGINT,
      files={"big.bin": lambda fx, p: p.write_bytes(os.urandom(160 << 20)), "big.orz": "old pack\n"}),
    C("zstd-pack/sigterm", "zstd-pack big.bin --level 19 -o big.orz", "terminated", code=143, sig=signal.SIGTERM,
      files={"big.bin": lambda fx, p: p.write_bytes(os.urandom(160 << 20)), "big.orz": "old pack\n"}),
    # ---- merge
    C("merge/missing-model", "merge nope {llama} --method linear -o out", "nope"),
    C("merge/one-model", "merge {llama} --method linear -o out", "at least two models"),
    C("merge/unknown-method", "merge {llama} {llama} --method average -o out", "--method average"),
    C("merge/weights-count", "merge {llama} {llama} --method linear --weights 1 -o out", "--weights"),
    C("merge/ties-without-base", "merge {llama} {llama} --method ties -o out", "--base"),
    C("merge/architectures-differ", "merge {llama} {bert} --method linear -o out", "architectures differ"),
    C("merge/truncated-safetensors", "merge {llama} m --method linear -o out", "model.safetensors",
      files={"m": TRUNCATED_ST}),
    C("merge/out-is-a-file", "merge {llama} {llama} --method linear -o out", "out", files={"out": "mine\n"}),
    C("merge/out-is-a-user-dir", "merge {llama} {llama} --method linear -o out", "out", files={"out": USER_DIR}),
    C("merge/missing-parent", "merge {llama} {llama} --method linear -o nodir/out", "nodir"),
    # ---- rl
    C("rl/missing-model", "rl nope --tasks t.jsonl --max-steps 1 -o out", "nope", files=T),
    C("rl/tasks-missing", "rl {llama} --tasks nope.jsonl --max-steps 1 -o out", "nope.jsonl"),
    C("rl/tasks-is-a-dir", "rl {llama} --tasks tdir --max-steps 1 -o out", "tdir", files={"tdir": DIR}),
    C("rl/tasks-empty", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl", files={"t.jsonl": ""}),
    C("rl/tasks-bad-json", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:2", files={"t.jsonl": BAD_JSON}),
    C("rl/tasks-not-utf8", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:2", files={"t.jsonl": NOT_UTF8}),
    C("rl/tasks-stdin-bad-json", "rl {llama} --tasks - --max-steps 1 -o out", "<stdin>:2", stdin=BAD_JSON),
    C("rl/prompt-is-a-number", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:1", "prompt",
      files={"t.jsonl": rows({**TASK, "prompt": 12})}),
    C("rl/answer-missing", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:1", "answer",
      files={"t.jsonl": rows({"id": 1, "prompt": "1+1=", "kind": "numeric"})}),
    C("rl/duplicate-ids", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:2", "id",
      files={"t.jsonl": rows(TASK, TASK)}),
    C("rl/huge-prompt", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "t.jsonl:1",
      files={"t.jsonl": HUGE_PROMPT}, isolated=True),
    C("rl/srl-missing", "rl {llama} --tasks t.jsonl --srl nope.jsonl --max-steps 1 -o out", "nope.jsonl", files=T),
    C("rl/srl-bad-json", "rl {llama} --tasks t.jsonl --srl s.jsonl --max-steps 1 -o out", "s.jsonl:2",
      files={**T, "s.jsonl": bad_json(STEPS)}),
    C("rl/reward-unknown", "rl {llama} --tasks t.jsonl --reward luck --max-steps 1 -o out", "--reward", files=T),
    C("rl/one-generation", "rl {llama} --tasks t.jsonl --num-generations 1 --max-steps 1 -o out", "--num-generations",
      files=T),
    C("rl/format-regex-invalid", "rl {llama} --tasks t.jsonl --reward format --format-regex '(' --max-steps 1 -o out",
      "--format-regex", files=T),
    C("rl/out-is-a-file", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "out", files={**T, "out": "mine\n"}),
    C("rl/out-is-a-user-dir", "rl {llama} --tasks t.jsonl --max-steps 1 -o out", "out", files={**T, "out": USER_DIR}),
    C("rl/out-and-log-same", "rl {llama} --tasks t.jsonl --max-steps 1 -o same --log same", "same", files=T),
    C("rl/missing-parent", "rl {llama} --tasks t.jsonl --max-steps 1 -o nodir/out", "nodir", files=T),
    C("rl/read-only", "rl {llama} --tasks t.jsonl --max-steps 1 -o {ro}/out", "out", needs="ro", files=T),
    C("rl/encoder", "rl {bert} --tasks t.jsonl --max-steps 1 -o out", "BertModel", files=T),
    C("rl/truncated-safetensors", "rl m --tasks t.jsonl --max-steps 1 -o out", "model.safetensors",
      files={**T, "m": TRUNCATED_ST}),
    C("rl/garbage-orz", "rl m.orz --tasks t.jsonl --max-steps 1 -o out", "m.orz", files={**T, "m.orz": GARBAGE_ORZ}),
    C("rl/device-cuda", "--device cuda rl {llama} --tasks t.jsonl -o out", "--device cuda", files=T),
    # ---- route train
    C("route-train/results-missing", "route train --results nope.jsonl -o router", "nope.jsonl"),
    C("route-train/results-is-a-dir", "route train --results rdir -o router", "rdir", files={"rdir": DIR}),
    C("route-train/results-empty", "route train --results r.jsonl -o router", "r.jsonl", files={"r.jsonl": ""}),
    C("route-train/results-bad-json", "route train --results r.jsonl -o router", "r.jsonl:2",
      files={"r.jsonl": bad_json(RESULT)}),
    C("route-train/results-not-utf8", "route train --results r.jsonl -o router", "r.jsonl:2",
      files={"r.jsonl": not_utf8(RESULT)}),
    C("route-train/correct-is-a-string", "route train --results r.jsonl -o router", "r.jsonl:3", "correct",
      files={"r.jsonl": lambda fx, p: p.write_text(_edit_row(fx["results"], 2, correct="no"))}),
    C("route-train/signal-not-a-number", "route train --results r.jsonl -o router", "r.jsonl:1", "mean_logprob",
      files={"r.jsonl": lambda fx, p: p.write_text(_edit_row(fx["results"], 0, mean_logprob="low"))}),
    C("route-train/duplicate-ids", "route train --results r.jsonl -o router", "r.jsonl:2", "id",
      files={"r.jsonl": lambda fx, p: p.write_text(_edit_row(fx["results"], 1, id=1))}),
    C("route-train/too-few-rows", "route train --results r.jsonl -o router", "r.jsonl",
      files={"r.jsonl": lambda fx, p: p.write_text("".join(Path(fx["results"]).read_text().splitlines(True)[:5]))}),
    C("route-train/accurate-missing", "route train --results {results} --results-accurate nope.jsonl -o router",
      "nope.jsonl"),
    C("route-train/optimize-without-accurate", "route train --results {results} --optimize -o router", "--optimize"),
    C("route-train/threshold-above-one", "route train --results {results} --threshold 2 -o router", "--threshold"),
    C("route-train/embedder-unknown", "route train --results {results} --embedder nope-model -o router", "nope-model"),
    C("route-train/out-is-a-file", "route train --results {results} -o router", "router", files={"router": "mine\n"}),
    C("route-train/out-is-a-user-dir", "route train --results {results} -o router", "router",
      files={"router": USER_DIR}),
    C("route-train/out-and-plot-same", "route train --results {results} -o same --plot same", "same"),
    C("route-train/out-is-the-results", "route train --results r.jsonl -o r.jsonl", "r.jsonl",
      files={"r.jsonl": copy_of("results")}),
    C("route-train/missing-parent", "route train --results {results} -o nodir/router", "nodir"),
    C("route-train/read-only", "route train --results {results} -o {ro}/router", "router", needs="ro"),
    # ---- route run
    C("route-run/tasks-missing", "route run nope.jsonl --base {llama} --router {router}", "nope.jsonl"),
    C("route-run/tasks-bad-json", "route run t.jsonl --base {llama} --router {router}", "t.jsonl:2",
      files={"t.jsonl": BAD_JSON}),
    C("route-run/tasks-stdin-bad-json", "route run - --base {llama} --router {router}", "<stdin>:2", stdin=BAD_JSON),
    C("route-run/prompt-is-a-number", "route run t.jsonl --base {llama} --router {router}", "t.jsonl:1", "prompt",
      files={"t.jsonl": rows({**TASK, "prompt": 1})}),
    C("route-run/duplicate-ids", "route run t.jsonl --base {llama} --router {router}", "t.jsonl:2", "id",
      files={"t.jsonl": rows(TASK, TASK)}),
    C("route-run/huge-prompt", "route run t.jsonl --base {llama} --mode fast", "t.jsonl:1",
      files={"t.jsonl": HUGE_PROMPT}, isolated=True),
    C("route-run/base-missing", "route run t.jsonl --base nope --router {router} --accurate {llama}", "nope",
      files=T),
    C("route-run/base-truncated-safetensors", "route run t.jsonl --base m --mode fast", "model.safetensors",
      files={**T, "m": TRUNCATED_ST}),
    C("route-run/base-truncated-gguf", "route run t.jsonl --base m.gguf --mode fast", "m.gguf",
      files={**T, "m.gguf": TRUNCATED_GGUF}),
    C("route-run/base-encoder", "route run t.jsonl --base {bert} --mode fast", "BertModel", files=T),
    C("route-run/router-missing", "route run t.jsonl --base {llama} --router nope --accurate {llama}", "nope",
      files=T),
    C("route-run/router-truncated", "route run t.jsonl --base {llama} --router r --accurate {llama}",
      "router.json", files={**T, "r": TRUNCATED_ROUTER}),
    C("route-run/router-wrong-field-type", "route run t.jsonl --base {llama} --router r --accurate {llama}",
      "router.json", files={**T, "r": BROKEN_ROUTER}),
    C("route-run/router-is-a-model", "route run t.jsonl --base {llama} --router {llama} --accurate {llama}",
      "llama", files=T),
    C("route-run/mode-unknown", "route run t.jsonl --base {llama} --mode turbo", "--mode", files=T),
    C("route-run/auto-without-router", "route run t.jsonl --base {llama}", "--router", files=T),
    C("route-run/modifier-malformed", "route run t.jsonl --base {llama} --mode fast --modifier math", "--modifier",
      files=T),
    C("route-run/modifier-missing", "route run t.jsonl --base {llama} --router {router} --modifier math=nope",
      "nope", files=T),
    C("route-run/vote-zero", "route run t.jsonl --base {llama} --mode accurate --vote 0", "--vote", files=T),
    C("route-run/out-is-a-dir", "route run t.jsonl --base {llama} --mode fast -o out", "out",
      files={**T, "out": USER_DIR}),
    C("route-run/out-and-summary-same", "route run t.jsonl --base {llama} --mode fast -o s.json --summary s.json",
      "s.json", files=T),
    C("route-run/missing-parent", "route run t.jsonl --base {llama} --mode fast -o nodir/r.jsonl", "nodir", files=T),
    C("route-run/read-only", "route run t.jsonl --base {llama} --mode fast -o {ro}/r.jsonl", "r.jsonl", needs="ro",
      files=T),
    C("route-run/device-cuda", "--device cuda route run t.jsonl --base {llama} --mode fast", "--device cuda", files=T),
]


def _edit_row(path: str, index: int, **change) -> str:
    lines = Path(path).read_text().splitlines()
    row = json.loads(lines[index])
    row.update(change)
    lines[index] = json.dumps(row)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- fixtures


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return result.returncode == 0


def _unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def _read_only_dir(root: Path) -> tuple[Path | None, str]:
    """A directory no one can write in, holding an earlier output of each kind. Root ignores
    permission bits, so as root it is a tmpfs remounted read-only."""
    ro = root / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        _fill_old_outputs(ro)
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return ro, ""
    if not _mount_tmpfs(ro, "size=4m"):
        return None, "running as root, which ignores permission bits, and a read-only tmpfs cannot be mounted here"
    _fill_old_outputs(ro)
    if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
        _unmount(ro)
        return None, "running as root and the tmpfs cannot be remounted read-only"
    return ro, ""


def _fill_old_outputs(ro: Path) -> None:
    (ro / "old.jsonl").write_text("old results\n")
    (ro / "old.gguf").write_bytes(b"GGUF old")
    (ro / "old-dir").mkdir()
    (ro / "old-dir" / "orstack.json").write_text('{"stage": "prune"}\n')


def _build_bert(out: Path, tokenizer_from: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out


def _fake_results(model: Path, n: int = 40, correct: Callable[[int], bool] = lambda i: i % 3 != 0) -> str:
    return rows(*({**TASK, "id": i + 1, "prompt": f"{i}+{i}=", "answer": str(2 * i), "model": str(model),
                   "output": str(2 * i) if correct(i) else "?", "correct": correct(i), "score": float(correct(i)),
                   "prompt_tokens": 4, "output_tokens": 2 + i % 5, "mean_logprob": -0.1 * (1 + i % 7),
                   "min_logprob": -0.5 * (1 + i % 4), "mean_entropy": 0.2 * (1 + i % 6), "latency_ms": 5.0,
                   "error": None} for i in range(n)))


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    saved_cache = os.environ.get("ORSTACK_CACHE")
    os.environ["ORSTACK_CACHE"] = str(root / "cache")  # .orz unpacks land here, not in ~/.cache
    fx: dict = {"root": root}
    fx["llama"] = build_random_llama(root / "llama")
    fx["bert"] = _build_bert(root / "bert", fx["llama"])
    fx["gguf"] = root / "model.gguf"
    fx["orz"] = root / "model.orz"
    fx["results"] = root / "results.jsonl"
    fx["accurate"] = root / "accurate.jsonl"
    fx["router"] = root / "router"
    fx["results"].write_text(_fake_results(fx["llama"]))
    fx["accurate"].write_text(_fake_results(root / "big", correct=lambda i: True))
    for args in (("gguf", fx["llama"], "--no-validate", "-o", fx["gguf"]),
                 ("zstd-pack", fx["llama"], "-o", fx["orz"]),
                 ("route", "train", "--results", fx["results"], "--embedder", "tfidf", "--max-ece", "1",
                  "-o", fx["router"])):  # fake results, a router to damage
        result = run_orstack(*map(str, args))
        assert result.returncode == 0, (args, result.stderr)
    fx["ro"], fx["ro_reason"] = _read_only_dir(root)
    fx["full"] = root / "full"
    fx["full_reason"] = "" if _mount_tmpfs(fx["full"], "size=256k") else "a small tmpfs cannot be mounted here"
    yield fx
    for name in ("ro", "full"):
        if fx[name] is not None and os.path.ismount(fx[name]):
            _unmount(fx[name])
    if saved_cache is None:
        os.environ.pop("ORSTACK_CACHE", None)
    else:
        os.environ["ORSTACK_CACHE"] = saved_cache


# --------------------------------------------------------------------------- checks


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root: its type and, for files, the SHA-256 of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            out[os.path.relpath(path, root)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fixture_signature(fx: dict) -> dict[str, tuple[int, int]]:
    """The shared fixtures' sizes and mtimes (they are large; a change shows in either)."""
    out = {}
    for key in ("llama", "bert", "gguf", "orz", "results", "accurate", "router"):
        path = Path(fx[key])
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def materialize(case: Case, fx: dict, cwd: Path) -> None:
    for name, content in case.files.items():
        path = cwd / name
        if content == DIR:
            path.mkdir()
        elif content == USER_DIR:
            path.mkdir()
            (path / "notes.txt").write_text("the user's own file\n")
        elif content == OLD_DIR:
            path.mkdir()
            (path / "orstack.json").write_text('{"stage": "earlier run"}\n')
            (path / "model.safetensors").write_bytes(b"old weights")
        elif callable(content):
            content(fx, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def argv(case: Case, fx: dict) -> list[str]:
    paths = {k: str(v) for k, v in fx.items() if isinstance(v, Path)}
    return shlex.split(case.args.format(**paths))


def marked_processes(marker: str) -> list[str]:
    """Live processes whose environment carries `marker` (every descendant of a signal case
    inherits it), as 'pid cmdline'."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (proc / "environ").read_bytes():
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{proc.name} {cmdline}")
    return found


def _busy(pid: int, cwd: Path, stderr_file: Path, marker: str) -> bool:
    """The command is past start-up and working: it wrote to stderr, started a temporary output,
    started a child, or has torch loaded (imported by the command itself, so after orstack's
    signal handling is in place)."""
    if stderr_file.stat().st_size > 0 or any(p.name.startswith(".") and "tmp-" in p.name for p in cwd.iterdir()):
        return True
    if len(marked_processes(marker)) > 1:
        return True
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def run_signal_case(case: Case, fx: dict, cwd: Path) -> tuple[int, str]:
    marker = f"ORSTACK_RELIABILITY_CASE={uuid.uuid4().hex}"
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1", ORSTACK_RELIABILITY_CASE=marker.split("=")[1])
    stderr_file = cwd.parent / f"{cwd.name}.stderr"
    with stderr_file.open("w") as err:
        # SIGINT at its default: a test runner started in the background of a shell has it ignored.
        proc = subprocess.Popen([sys.executable, "-m", "orstack", *argv(case, fx)], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 90
        while not _busy(proc.pid, cwd, stderr_file, marker) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # into the work
        assert proc.poll() is None, f"finished before the signal: {stderr_file.read_text()[-500:]}"
        proc.send_signal(case.signal)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    time.sleep(0.3)
    left = marked_processes(marker)
    assert not left, f"processes left running after orstack exited: {left}"
    # Progress lines end in carriage returns; what remains is the final message.
    text = stderr_file.read_text(errors="replace")
    return code, text.replace("\r", "\n").strip().splitlines()[-1] if text.strip() else ""


def run_isolated_case(case: Case, fx: dict, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "orstack", *argv(case, fx)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=ISOLATED_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still working after {ISOLATED_TIMEOUT} s: the input was not refused before the work")
    return proc.returncode, out, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, fixtures, tmp_path, monkeypatch):
    if case.needs == "ro" and fixtures["ro"] is None:
        pytest.skip(f"read-only output: {fixtures['ro_reason']}")
    if case.needs == "full" and fixtures["full_reason"]:
        pytest.skip(f"full disk: {fixtures['full_reason']}")
    cwd = tmp_path / "case"
    cwd.mkdir()
    materialize(case, fixtures, cwd)
    before, shared = tree_digest(cwd), fixture_signature(fixtures)
    full_before = tree_digest(fixtures["full"]) if case.needs == "full" else None
    if case.signal is not None:
        code, message = run_signal_case(case, fixtures, cwd)
        lines = [message] if message else []
    else:
        if case.isolated:
            code, stdout, stderr = run_isolated_case(case, fixtures, cwd)
        else:
            monkeypatch.chdir(cwd)
            result = run_orstack(*argv(case, fixtures), stdin=case.stdin)
            code, stdout, stderr = result.returncode, result.stdout, result.stderr
        assert stdout == "", f"data written to stdout by a failing command: {stdout[:200]!r}"
        lines = stderr.replace("\r", "\n").strip().splitlines()
        # A disk fills up during the work, after its progress lines: the last line is the message.
        assert len(lines) == 1 or case.needs == "full", f"exit {code}; stderr is not one line: {lines}"
    assert code == case.code, f"exit {code}, expected {case.code}: {lines}"
    assert lines and lines[-1].startswith("orstack: error: "), lines
    for name in case.names:
        assert name in lines[-1], f"{name!r} not named in: {lines[-1]}"
    assert tree_digest(cwd) == before, "the case directory changed"
    assert fixture_signature(fixtures) == shared, "a shared fixture changed"
    if full_before is not None:
        assert tree_digest(fixtures["full"]) == full_before, "the full file system kept a partial output"


def test_table_covers_every_subcommand():
    from typer.main import get_command

    from orstack.cli import app

    def leaves(group, prefix=""):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}"

    def subcommand(case: Case) -> str:
        words = shlex.split(case.args)
        while words[0].startswith("-"):  # global options: --device X
            words = words[2:]
        return " ".join(words[:2]) if words[0] in ("distill", "route") else words[0]

    used = {subcommand(c) for c in CASES}
    missing = [name for name in leaves(get_command(app)) if name not in used]
    assert not missing, f"no case for: {missing}"
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
