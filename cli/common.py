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

# The shipped tiny model (weights/cosmos_tiny_synth.pt: synthetic shapes and colours) unless $COSMOS_WEIGHTS says
# otherwise, so every command works on a fresh install with no network.
DEFAULT_WEIGHTS = os.environ.get("COSMOS_WEIGHTS") or "cosmos_tiny_synth"


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
        except KeyboardInterrupt as e:
            if str(e) == "SIGTERM":
                fail("terminated (SIGTERM); partial output was removed or can be resumed", code=143)
            fail("interrupted; partial output was removed or can be resumed", code=130)

    return wrapper


def check_output(path, option: str, kind: str = "file") -> None:
    """Before any work: `path` (a file, or a folder when kind="folder") can be written, so an hour of evaluation is
    not lost at the end. Missing parent folders are fine (they are created) if the nearest existing one is a
    writable folder."""
    import os
    from pathlib import Path

    path = Path(path)
    if str(path).strip() == "":
        raise CosmosError(f"{option} is empty; give a {kind} path")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise CosmosError(f"{option} {path}: is a folder; give a file path, e.g. {path / 'results.json'}")
        if kind == "folder" and not path.is_dir():
            raise CosmosError(f"{option} {path}: exists and is not a folder")
        target = path if kind == "folder" else path.parent
        if not os.access(target, os.W_OK):
            raise CosmosError(f"{option} {path}: not writable (check the permissions of {target})")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CosmosError(f"{option} {path}: {ancestor} is a file, so no folder can be made under it")
    if not os.access(ancestor, os.W_OK):
        raise CosmosError(f"{option} {path}: cannot create it, {ancestor} is not writable")


WHICH_HELP = "which weights of a COSMOS checkpoint: teacher (the paper's evaluation) or student"


def make_progress(*columns, console: Console | None = None) -> Progress:
    """A transient rich progress display; switched off when its stream is not a terminal (a pipe, a file, CI), so
    redirected output holds no bar remnants or blank lines."""
    console = console or err_console
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator:
    """A rich progress bar on stderr (stdout stays clean for --json); yields update(done, total)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with make_progress(*columns) as progress:
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
