"""The Typer app: `cosmos COMMAND --help` lists each command's options.

Each command lives in its own module and only parses options and calls the library.
"""
from __future__ import annotations

import importlib

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
    "synth",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
