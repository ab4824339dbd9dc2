"""Shared fixtures: tiny real checkpoints built on the spot (nothing is downloaded)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 12+345=357\n"
    "rev abc=cba\nsort dcba=abcd\n3*4=12\ncmp 17 9=>\n"
    "Pack my box with five dozen liquor jugs. 0123456789\n"
) * 20


def build_random_llama(out: Path, *, hidden: int = 256, layers: int = 2, vocab_size: int = 300, seed: int = 0,
                       tie: bool = False) -> Path:
    """A random Llama with a byte-level BPE tokenizer, saved as a Hugging Face checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 256) with its tokenizer: for mechanics, not quality."""
    return build_random_llama(tmp_path_factory.mktemp("random-llama") / "model")


@pytest.fixture(scope="session")
def random_llama_gguf(random_llama, tmp_path_factory):
    """`random_llama_gguf("q8_0")`: random_llama exported to that GGUF type (not validated),
    once per session and type; skipped where llama-cpp-python is missing."""
    pytest.importorskip("llama_cpp")
    made: dict[str, Path] = {}

    def export(qtype: str) -> Path:
        if qtype not in made:
            from orstack.gguf import GgufConfig, run
            from orstack.runtime import Runtime

            out = tmp_path_factory.mktemp(f"gguf-{qtype}") / f"model-{qtype}.gguf"
            run(str(random_llama), out, GgufConfig(type=qtype, validate=False), Runtime(device="cpu"))
            made[qtype] = out
        return made[qtype]

    return export


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(SAMPLE_TEXT, encoding="utf-8")
    return p


# --- the tiny default (orstack tiny), cached across test sessions --------------------------

TINY_TEST_STEPS = 400  # fewer than the default 1000: enough for clearly non-zero easy-level accuracy
TINY_TEST_SEED = 0


@dataclass(frozen=True)
class TinyBuild:
    """A tiny default checkpoint (`model`) and its task directory (`tasks`: train.jsonl,
    heldout.jsonl, corpus.txt, heldout.txt)."""

    model: Path
    tasks: Path


def _tiny_cache_root() -> Path:
    return Path(os.environ.get("ORSTACK_CACHE") or Path.home() / ".cache" / "orstack")


def _tiny_source_digest() -> str:
    import hashlib

    import orstack.tiny

    h = hashlib.sha256()
    for f in sorted(Path(orstack.tiny.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_tiny_cached(*, steps: int, seed: int = TINY_TEST_SEED, untrained: bool = False) -> TinyBuild:
    """Build the tiny default once per (orstack/tiny source, seed, steps) and reuse it.

    Concurrent test sessions wait on a lock instead of building twice; the cache entry
    appears atomically, so an interrupted build leaves nothing behind."""
    import fcntl

    from orstack.io.atomic import atomic_path
    from orstack.tiny import TinyConfig, build

    kind = "untrained" if untrained else f"steps{steps}"
    entry = _tiny_cache_root() / f"tiny-{_tiny_source_digest()}-seed{seed}-{kind}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "model" / "orstack.json").exists():
            with atomic_path(entry, directory=True) as tmp:
                build(TinyConfig(seed=seed, steps=steps, untrained=untrained), tmp / "model", tmp / "tasks")
    return TinyBuild(model=entry / "model", tasks=entry / "tasks")


@pytest.fixture(scope="session")
def tiny_trained() -> TinyBuild:
    """The trained tiny default (seed 0, TINY_TEST_STEPS steps), cached under $ORSTACK_CACHE or
    ~/.cache/orstack: a few minutes the first time, instant afterwards. Treat it as read-only."""
    return build_tiny_cached(steps=TINY_TEST_STEPS)


@pytest.fixture(scope="session")
def tiny_untrained() -> TinyBuild:
    """A random model with the tiny default's tokenizer and task files (fast; for mechanics)."""
    return build_tiny_cached(steps=1, untrained=True)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_orstack(*args: str, stdin: str | bytes | None = None) -> CliResult:
    """Run the CLI in this process (no interpreter start-up), capturing stdout, stderr and
    the exit code, as a subprocess would see them; `stdin` is what the command reads from `-`."""
    import contextlib
    import io
    import sys

    from orstack.cli import main

    out, err = io.StringIO(), io.StringIO()
    data = stdin.encode("utf-8") if isinstance(stdin, str) else (stdin or b"")
    code = 0
    saved_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = saved_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


def tree_hash(path: Path) -> str:
    """SHA-256 over a path: a file's bytes, or a directory tree's names, kinds and bytes (absent
    paths hash too). Equal before and after a command means it changed nothing there."""
    import hashlib

    h = hashlib.sha256()
    if not (path.exists() or path.is_symlink()):
        return "absent"
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(b"d" if p.is_dir() else b"f" + p.read_bytes())
    return h.hexdigest()


def run_orstack_read_only(directory: Path, *args: str) -> CliResult:
    """`python -m orstack ARGS` in a subprocess that sees `directory` as a read-only mount (a bind
    mount in a user and mount namespace: EROFS even for root, who ignores permission bits).
    Skips the test where the machine allows no unprivileged namespaces."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace (unshare -rm) for a read-only location")
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(directory), sys.executable, "-m", "orstack",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def cli_defaults(*command: str) -> dict[str, object]:
    """{parameter name: default} of an orstack subcommand (`cli_defaults("distill", "train")`), as
    typer builds it; `cli_defaults()` gives the global options. For CLI-defaults = config-defaults tests."""
    import typer.main

    from orstack.cli import app

    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    return {p.name: p.default for p in cmd.params}


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """A factory: family_checkpoint("gemma2") -> a tiny random-init checkpoint of that family
    (tests/families.py), built once per session and shared; treat it as read-only."""
    from families import build_family

    built: dict[tuple, Path] = {}

    def make(model_type: str, **options) -> Path:
        key = (model_type, tuple(sorted(options.items())))
        if key not in built:
            name = model_type + "".join(f"-{k}{v}" for k, v in key[1])
            built[key] = build_family(model_type, tmp_path_factory.mktemp("families") / name, **options)
        return built[key]

    return make
