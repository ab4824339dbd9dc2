"""Generate man pages (man/) and shell completions (completions/) from the CLI itself.

    python scripts/gendocs.py          # write them
    python scripts/gendocs.py --check  # exit 1 if any committed file is out of date

The man pages are built from the same click command objects that print `--help`, so
the two never disagree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELLS = {"bash": "orstack.bash", "zsh": "orstack.zsh", "fish": "orstack.fish"}


def roff_escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def help_to_roff(text: str) -> str:
    """Paragraphs become .PP; indented blocks (examples) are kept verbatim with .nf/.fi."""
    out, block = [], []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = paragraph.splitlines()
        if all(line.startswith("    ") for line in lines):
            block = [roff_escape(line[4:]) for line in lines]
            out += [".PP", ".nf", ".RS 4", *block, ".RE", ".fi"]
        else:
            out += [".PP", roff_escape(" ".join(line.strip() for line in lines))]
    return "\n".join(out)


def option_entries(command, ctx) -> list[str]:
    """The options as `--help` shows them (names, metavar, help and default)."""
    out = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f".B {roff_escape(names)}", roff_escape(" ".join(help_text.split()))]
    return out


def man_page(command, path: list[str], version: str, parent_ctx=None) -> str:
    import typer._click as click

    ctx = click.Context(command, info_name=path[-1], parent=parent_ctx)
    name = "-".join(path)
    help_text = command.help or ""
    summary = help_text.strip().splitlines()[0] if help_text.strip() else name
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [
        f'.TH {name.upper()} 1 "" "orstack {version}" "orstack manual"',
        ".SH NAME",
        f"{name} \\- {roff_escape(summary.rstrip('.'))}",
        ".SH SYNOPSIS",
        f".B {' '.join(path)}",
        roff_escape(usage),
        ".SH DESCRIPTION",
        help_to_roff(help_text),
    ]
    options = option_entries(command, ctx)
    if options:
        lines += [".SH OPTIONS", *options]
    subcommands = getattr(command, "commands", {})
    if subcommands and len(path) > 1:
        for sub_name, sub in sorted(subcommands.items()):
            sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx)
            lines += [f".SH {' '.join(path).upper()} {sub_name.upper()}",
                      f".B {' '.join(path)} {sub_name}", roff_escape(" ".join(sub.collect_usage_pieces(sub_ctx))),
                      help_to_roff(sub.help or ""), *option_entries(sub, sub_ctx)]
    elif subcommands:
        lines += [".SH COMMANDS"]
        for sub_name, sub in sorted(subcommands.items()):
            first = (sub.help or "").strip().splitlines()[0] if sub.help else ""
            lines += [".TP", f".BR orstack\\-{sub_name} (1)", roff_escape(first)]
    see_also = "orstack(1)" if len(path) > 1 else ", ".join(f"orstack-{n}(1)" for n in sorted(subcommands))
    lines += [".SH SEE ALSO", roff_escape(see_also), ""]
    return "\n".join(lines)


def generate() -> dict[Path, str]:
    import typer._click as click
    from typer.main import get_command

    from orstack import __version__
    from orstack.cli import app

    root = get_command(app)
    root_ctx = click.Context(root, info_name="orstack")
    files = {ROOT / "man" / "orstack.1": man_page(root, ["orstack"], __version__)}
    for name, command in sorted(root.commands.items()):
        files[ROOT / "man" / f"orstack-{name}.1"] = man_page(command, ["orstack", name], __version__, root_ctx)
    for shell, filename in SHELLS.items():
        env = dict(os.environ, _ORSTACK_COMPLETE=f"source_{shell}")
        script = subprocess.run([sys.executable, "-m", "orstack"], env=env, capture_output=True, text=True,
                                check=True).stdout
        files[ROOT / "completions" / filename] = script.strip() + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args()
    files = generate()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    generated_dirs = {ROOT / "man", ROOT / "completions"}
    extra = [p for d in generated_dirs if d.exists() for p in d.iterdir() if p not in files]
    if args.check:
        for p in stale + extra:
            print(f"out of date: {p.relative_to(ROOT)} (run `make docs`)")
        return 1 if stale or extra else 0
    for p in extra:
        p.unlink()
    for p, text in files.items():
        p.parent.mkdir(exist_ok=True)
        p.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
