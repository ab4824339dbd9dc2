"""CLI conventions every subcommand shares: fast help, exit codes, one-line errors, Ctrl-C, --device."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_orstack

ENV = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")


def subcommands() -> list[str]:
    """Every runnable command, groups expanded: 'tiny', ..., 'distill generate', 'route run'."""
    from typer.main import get_command

    from orstack.cli import app

    def leaves(group, prefix=""):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}"

    return sorted(leaves(get_command(app)))


def test_version_and_help():
    result = run_orstack("--version")
    assert result.returncode == 0 and result.stdout.startswith("orstack ")
    result = run_orstack("--help")
    assert result.returncode == 0 and "Example" in result.stdout


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from orstack.cli import app; from typer.main import get_command; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'sklearn', 'trl', 'peft', 'llama_cpp') "
            "if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_help_has_an_example(name):
    result = run_orstack(*name.split(), "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout
    assert "\x1b[" not in result.stdout


def test_unknown_option_is_one_line_exit_2():
    result = run_orstack("--no-such-option")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_device_name_is_one_line_exit_2(tmp_path):
    result = run_orstack("--device", "tpu", "tiny", "-o", tmp_path / "model")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["orstack: error: --device: expected auto, cpu, cuda or cuda:N, "
                                                  "got 'tpu'"]
    assert list(tmp_path.iterdir()) == []


def _device_cases() -> list[tuple[str, str]]:
    """Every subcommand that loads a model, with arguments that are otherwise good."""
    return [
        ("tiny", "tiny -o {out}/model --steps 2"),
        ("bench", "bench {model} --tasks {tasks} -o {out}/r.jsonl"),
        ("vocab-trim", "vocab-trim {model} --corpus {text} -o {out}/trimmed"),
        ("distill generate", "distill generate --failures {failures} --teacher {model} -o {out}/g.jsonl"),
        ("distill train", "distill train {model} --data {examples} --max-steps 1 -o {out}/student"),
        ("distill train --logits", "distill train {model} --data {examples} --logits {model} --max-steps 1 "
                                   "-o {out}/student"),
        ("prune", "prune {model} --calib {text} --nsamples 2 --seqlen 16 -o {out}/pruned"),
        ("awq", "awq {model} --calib {text} --nsamples 2 --seqlen 16 --group-size 64 -o {out}/quant"),
        ("gguf", "gguf {model} --no-validate -o {out}/m.gguf"),
        ("rl", "rl {model} --tasks {tasks} --max-steps 1 -o {out}/rl"),
        ("route run", "route run {tasks} --base {model} --mode fast -o {out}/r.jsonl"),
    ]


@pytest.fixture(scope="module")
def device_inputs(random_llama, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("device-inputs")
    task = {"id": 1, "prompt": "1+1=", "answer": "2", "kind": "numeric"}
    (root / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    (root / "failures.jsonl").write_text(json.dumps({**task, "output": "3", "correct": False, "cluster": 0}) + "\n")
    (root / "examples.jsonl").write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. 12+345=357\n" * 40)
    return {"model": random_llama, "tasks": root / "tasks.jsonl", "failures": root / "failures.jsonl",
            "examples": root / "examples.jsonl", "text": root / "text.txt"}


@pytest.mark.parametrize("name,args", _device_cases(), ids=[n for n, _ in _device_cases()])
def test_device_cuda_without_cuda_is_exit_2_before_any_work(name, args, device_inputs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    out.mkdir()
    result = run_orstack("--device", "cuda", *args.format(out=out, **device_inputs).split())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orstack: error: --device cuda: no CUDA device"), lines
    assert result.stdout == ""
    assert list(out.iterdir()) == []


def test_a_model_loading_command_starts_stderr_with_its_own_words(random_llama, tmp_path):
    """transformers' FutureWarnings (past_key_values) are not shown; run as a real process, since
    pytest records warnings itself."""
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": 1, "prompt": "1+1=", "answer": "2", "kind": "numeric"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "orstack", "bench", str(random_llama), "--tasks", str(tasks),
                             "--max-new-tokens", "4", "-o", str(tmp_path / "r.jsonl")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "past_key_values" not in result.stderr, result.stderr[:500]


def test_interrupts_and_full_disks_behind_a_cleanup_error_are_reported_as_such(capsys):
    from orstack.cli import _report
    from orstack.errors import Terminated

    def raised_while_handling(first: BaseException) -> Exception:
        try:
            try:
                raise first
            except BaseException:
                raise BufferError("cannot close exported pointers exist") from None
        except BufferError as e:
            return e

    assert _report(raised_while_handling(KeyboardInterrupt())) == 130
    assert _report(raised_while_handling(Terminated())) == 143
    assert _report(raised_while_handling(OSError(errno.ENOSPC, "No space left on device", "out.gguf"))) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["orstack: error: interrupted", "orstack: error: terminated",
                     "orstack: error: no space left on device writing out.gguf"]


def interruptible(args: list[str], **kwargs) -> subprocess.Popen:
    """Start orstack with SIGINT at its default even when the test runner was started in the background
    of a non-interactive shell (which makes its children ignore SIGINT; Python then installs no
    KeyboardInterrupt handler, and a Ctrl-C test would measure the shell, not orstack)."""
    return subprocess.Popen([sys.executable, "-m", "orstack", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def test_ctrl_c_while_reading_stdin_exits_130_with_one_line(tmp_path):
    # Training and writing interrupted by SIGINT and SIGTERM: tests/test_reliability.py.
    proc = interruptible(["cluster-failures", "-", "-o", str(tmp_path / "o.jsonl")], stdin=subprocess.PIPE)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["orstack: error: interrupted"]
    assert list(tmp_path.iterdir()) == []
