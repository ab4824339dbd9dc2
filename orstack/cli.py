"""The orstack command line: global options, subcommand registration, exit codes.

Exit codes (docs/design.md): 0 success; 1 unexpected failure (or a full disk); 2 bad usage or
bad input (one line, never a traceback); 3 a quality gate failed; 130 interrupted (SIGINT);
143 terminated (SIGTERM).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import Annotated

import typer

from orstack import __version__, console
from orstack.errors import BadInput, DiskFull, GateFailed, Terminated, is_disk_full
from orstack.runtime import Runtime, check_device_name

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions

HELP = """Compress, fine-tune and route small language models, one composable step at a time.

Each subcommand reads checkpoints or JSONL and writes checkpoints or JSONL; data goes
to standard output, messages to standard error.

Example:

    orstack tiny -o tiny --tasks-out tasks && orstack bench tiny --tasks tasks/heldout.jsonl -o results.jsonl
"""

app = typer.Typer(
    name="orstack",
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        print(f"orstack {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")] = False,
    seed: Annotated[int, typer.Option("--seed", envvar="ORSTACK_SEED", help="Seed for every random choice.")] = 0,
    device: Annotated[
        str, typer.Option("--device", envvar="ORSTACK_DEVICE", help="auto, cpu, cuda or cuda:N (auto: cuda when "
                          "present).")
    ] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", envvar="ORSTACK_THREADS", min=1,
                                 help="CPU threads for torch (default: torch's choice).")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow loading pickle (.bin) weights; they can run code.")
    ] = False,
    in_memory: Annotated[
        bool, typer.Option("--in-memory", help="Load the whole model instead of reading it layer by layer "
                           "(prune, awq, gguf, vocab-trim; the same output, several times the memory).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    console.set_quiet(quiet)
    # The one place flags and environment become settings; stages receive them as this Runtime.
    # torchrun / accelerate launch say which process this is through RANK and WORLD_SIZE.
    ctx.obj = Runtime(device=check_device_name(device), threads=threads, seed=seed, trust_pickle=trust_pickle,
                      stream=not in_memory, rank=int(os.environ.get("RANK", "0")),
                      world_size=int(os.environ.get("WORLD_SIZE", "1")))


def _command_modules() -> list[str]:
    from orstack import commands

    found = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    found = [m for m in found if m != "options"]
    order = {name: i for i, name in enumerate(commands.PIPELINE_ORDER)}
    return sorted(found, key=lambda m: (order.get(m, len(order)), m))


def _register_commands() -> None:
    for name in _command_modules():
        importlib.import_module(f"orstack.commands.{name}").register(app)


_register_commands()


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (kill, make being stopped, a CI timeout) unwinds like Ctrl-C, so atomic
    # outputs remove their temporary siblings and child process groups are killed.
    raise Terminated()


def _quiet_known_warnings() -> None:
    """Warnings about library internals the user cannot act on, so that stderr starts with
    orstack's own words. transformers >= 5.24 renames the `past_key_values` argument of every
    model's forward to `cache`; orstack passes `past_key_values`, the name every transformers
    5 release accepts."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling, innermost last."""
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _report(e: BaseException) -> int:
    """One line on stderr for a failure; its exit code. An error raised while an interrupt or
    a full disk was unwinding (a library's cleanup failing, say) is reported as what it hides."""
    chain = _chain(e)
    for kind, code, message in ((Terminated, 143, "terminated"), (KeyboardInterrupt, 130, "interrupted"),
                                (typer.Abort, 130, "interrupted")):
        if any(isinstance(x, kind) for x in chain):
            console.error(message)
            return code
    for x in chain:
        if isinstance(x, (BadInput, GateFailed, DiskFull)):
            console.error(_one_line(str(x)))
            return x.exit_code
        if is_disk_full(x):
            where = getattr(x, "filename", None)
            console.error(f"no space left on device writing {where}" if where else "no space left on device")
            return 1
    if os.environ.get("ORSTACK_DEBUG"):
        raise e
    console.error(f"unexpected {type(e).__name__}: {_one_line(str(e))[:500]} (set ORSTACK_DEBUG=1 for a traceback)")
    return 1


def _run(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="orstack", standalone_mode=False)
        # Outside standalone mode typer hands back exit codes instead of exiting; Ctrl-C
        # arrives here as 130 (typer turns KeyboardInterrupt into Exit(130) itself).
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130:
                console.error("interrupted")
            return code
        return 0
    except typer.Exit as e:
        return e.exit_code
    except click_exceptions.NoArgsIsHelpError as e:
        e.show()
        return 0
    except click_exceptions.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None and e.ctx.parent is not None else ""
        console.error(f"{where}{_one_line(e.format_message())} (see --help)")
        return 2
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (Exception, KeyboardInterrupt, Terminated) as e:  # noqa: BLE001 - the last line of defence: one line
        return _report(e)


def main(argv: list[str] | None = None) -> None:
    import signal

    _quiet_known_warnings()
    previous = signal.signal(signal.SIGTERM, _terminated) if threading_is_main() else None
    try:
        code = _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
