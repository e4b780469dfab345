"""The Typer app: `cosmos COMMAND --help` lists each command's options.

Each command lives in its own module and only parses options and calls the library.
"""
from __future__ import annotations

import importlib
import signal

import typer

app = typer.Typer(
    name="cosmos",
    help="COSMOS vision-language models: prepare data (preprocess, synth), train, and evaluate zero-shot (classify, segment, eval).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command module defines `register(app)`; add a module's name here to put its commands on the app.
COMMAND_MODULES = [
    "preprocess", "train",
    "classify", "segment", "evaluate",
    "embed", "synth", "demo",
]

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("cosmos-vlp")
        except PackageNotFoundError:  # a source checkout used without installing
            number = "unknown (not installed)"
        typer.echo(f"cosmos {number}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """COSMOS vision-language models: prepare data (preprocess, synth), train, and evaluate zero-shot (classify,
    segment, eval); `cosmos demo` runs the whole job on a CPU in minutes."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


def main() -> None:
    import sys

    # File names that are not valid UTF-8 (Latin-1 names from old archives) reach Python as lone surrogates: print
    # them as \xNN escapes instead of failing on them, in every command's output and messages.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # SIGTERM (a job scheduler, `kill`) ends a command like Ctrl-C does: one line, outputs cleaned up or resumable.
    # `cosmos train` installs its own handlers for the time it trains (checkpoint, then stop).
    signal.signal(signal.SIGTERM, _terminate)
    app()


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    main()
