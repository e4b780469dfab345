"""What every command shares: one-line errors instead of tracebacks, the console, device and weights options."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from cosmos.errors import CosmosError

console = Console()
err_console = Console(stderr=True)

DEFAULT_WEIGHTS = os.environ.get("COSMOS_WEIGHTS", "cosmos_vitb16_merged30m")


def print_error(message: str) -> None:
    """`error: message` on stderr; the message is plain text (a path like `x[/tmp]` is printed as is, not as markup)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    print_error(message)
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
            fail(f"{e.filename}: no such file" if e.filename else str(e))
        except OSError as e:  # e.g. an output folder that is read-only, a full disk
            reason = e.strerror or str(e)
            fail(f"{e.filename}: {reason}" if e.filename else reason)
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


WHICH_HELP = "which weights of a COSMOS checkpoint: teacher (the paper's evaluation) or student"


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator:
    """A rich progress bar on stderr (stdout stays clean for --json); yields update(done, total)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(escape(description), total=total)

        def update(done: int, total_: int | None = None) -> None:
            progress.update(task, completed=done, total=total_ if total_ is not None else total)

        yield update


QUICK_GELU_HELP = "use QuickGELU (OpenAI-trained CLIP weights); COSMOS and LAION models use GELU"


def load_model(weights: str, device: Optional[str], which: str, quick_gelu: bool = False):
    """(model, preprocess, tokenizer) via cosmos.checkpoint.load, with a download bar for registry names."""
    from cosmos.checkpoint import load
    from cosmos.device import resolve_device

    resolve_device(device)  # one line naming the device and what is available, before any loading
    if which not in ("teacher", "student"):
        raise CosmosError(f"--which must be 'teacher' or 'student', got {which!r}")
    with progress_bar(f"loading {weights}") as update:
        return load(weights, device=device, which=which, quick_gelu=quick_gelu, progress=lambda done, total: update(done, total))


PRECISION_HELP = "auto (bf16 autocast where bf16 is native: CUDA, AVX-512 BF16 / AMX CPUs; else fp32), fp32 or bf16"


def check_precision(precision: str) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise CosmosError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def model_labels(model, where: str = "--labels") -> list[list[str]]:
    """The checkpoint's own label set, or a clear error asking for --labels."""
    from cosmos.zeroshot.templates import parse_class_names

    if not getattr(model, "labels", None):
        raise CosmosError(f"this checkpoint carries no class names; give them with {where} (e.g. --labels cat,dog)")
    return [names for names in (parse_class_names(label) for label in model.labels) if names]


# Options every command that loads a model shares (typer option objects can be reused across commands).
WEIGHTS = typer.Option(DEFAULT_WEIGHTS, "--weights", "-w", help="checkpoint file or released name")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
PRECISION = typer.Option("auto", "--precision", help=PRECISION_HELP)
WHICH = typer.Option("teacher", "--which", help=WHICH_HELP)
QUICK_GELU = typer.Option(False, "--quick-gelu", help=QUICK_GELU_HELP)
