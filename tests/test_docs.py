"""Man pages and shell completions are generated from the CLI, committed, and current."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", NO_COLOR="1")


def subcommands() -> list[str]:
    from typer.main import get_command

    from orstack.cli import app

    return sorted(get_command(app).commands)


def test_generated_docs_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gendocs.py"), "--check"], capture_output=True,
                            text=True, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_every_man_page_renders_without_warnings():
    pages = sorted((ROOT / "man").glob("*.1"))
    assert {p.name for p in pages} == {"orstack.1"} | {f"orstack-{n}.1" for n in subcommands()}
    for page in pages:
        result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", f"{page.name}: {result.stderr}"


def bash_complete(words: list[str]) -> list[str]:
    script = (f"source {ROOT / 'completions' / 'orstack.bash'}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_orstack_completion orstack\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completion_offers_subcommands_and_options():
    names = subcommands()
    offered = bash_complete(["orstack", ""])
    for name in names:
        assert name in offered
    for name in names:
        prefix = name[:2]
        assert name in bash_complete(["orstack", prefix])
    if "prune" in names:
        assert bash_complete(["orstack", "pr"]) == ["prune"]
        options = bash_complete(["orstack", "prune", "--"])
        assert "--sparsity" in options and "--output" in options
