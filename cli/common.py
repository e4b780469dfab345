"""What every command shares: one-line errors instead of tracebacks, the console, device and weights options."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, NoReturn

import typer
from rich.console import Console

from cosmos.errors import CosmosError

console = Console()
err_console = Console(stderr=True)

DEFAULT_WEIGHTS = os.environ.get("COSMOS_WEIGHTS", "cosmos_vitb16_merged30m")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing errors into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CosmosError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"no such file: {e.filename or e}")
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper
