"""CLI conventions every subcommand shares: fast help, exit codes, one-line errors, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ENV = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")


def orstack(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orstack", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=300)


def subcommands() -> list[str]:
    from typer.main import get_command

    from orstack.cli import app

    return sorted(get_command(app).commands)


def test_version_and_help():
    result = orstack("--version")
    assert result.returncode == 0 and result.stdout.startswith("orstack ")
    result = orstack("--help")
    assert result.returncode == 0 and "Example" in result.stdout


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from orstack.cli import app; from typer.main import get_command; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'sklearn', 'trl', 'peft', 'llama_cpp') "
            "if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_help_has_an_example(name):
    result = orstack(name, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout
    assert "\x1b[" not in result.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_rejects_a_missing_input(name, tmp_path):
    out = tmp_path / "out"
    result = orstack(name, str(tmp_path / "missing-input"), "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert 0 < len(result.stderr.strip().splitlines()) <= 3
    assert result.stdout == ""
    assert not out.exists()


def test_unknown_option_is_one_line_exit_2():
    result = orstack("--no-such-option")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_device_is_exit_2():
    result = orstack("--device", "tpu", "--help")
    assert result.returncode in (0, 2)  # --help is eager; a real command must reject it
    names = subcommands()
    if names:
        result = orstack("--device", "tpu", names[0], "whatever")
        assert result.returncode == 2 and "--device" in result.stderr


def interruptible(args: list[str], **kwargs) -> subprocess.Popen:
    """Start orstack with SIGINT at its default even when the test runner was started in the background
    of a non-interactive shell (which makes its children ignore SIGINT; Python then installs no
    KeyboardInterrupt handler, and a Ctrl-C test would measure the shell, not orstack)."""
    return subprocess.Popen([sys.executable, "-m", "orstack", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def test_ctrl_c_exits_130_without_traceback(tmp_path):
    # A command that waits on stdin is interrupted with SIGINT.
    names = subcommands()
    target = "cluster-failures" if "cluster-failures" in names else None
    if target is None:
        pytest.skip("no stdin-reading command registered yet")
    proc = interruptible([target, "-", "-o", str(tmp_path / "o.jsonl")], stdin=subprocess.PIPE)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_ctrl_c_during_training_leaves_no_output(tmp_path):
    proc = interruptible(["tiny", "-o", str(tmp_path / "model"), "--steps", "100000"])
    time.sleep(10)  # well into training (it would run for hours)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_output(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "orstack", "tiny", "-o", str(out), "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(10)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
