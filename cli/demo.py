"""`cosmos demo --out demo/`: synthetic data -> a few minutes of tiny COSMOS training -> a report beside the shipped
model (cosmos/demo.py)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from .common import cli_errors, console, err_console


@cli_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="report folder (refused if it holds a demo, unless "
                             "--overwrite)"),
    minutes: float = typer.Option(3.5, "--minutes", help="training budget in minutes"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier demo in --out"),
    seed: int = typer.Option(0, "--seed"),
    scenes: int = typer.Option(4000, "--scenes", min=64, help="synthetic training scenes to generate"),
    eval_images: int = typer.Option(100, "--eval-images", min=10, help="images per evaluation set"),
) -> None:
    """The main job on a CPU in about 5 minutes: make data, train tiny COSMOS, evaluate it next to the shipped model,
    write OUT/report.md."""
    from cosmos.demo import run_demo

    from .train import _Bar

    def note(text: str) -> None:
        err_console.print(Text(text), highlight=False)

    results = run_demo(out, minutes=minutes, overwrite=overwrite, n_train=scenes, n_eval=eval_images, seed=seed,
                       note=note, reporter=_Bar(enabled=True))
    m = results["metrics"]
    console.print(Text(f"fresh run: shape {100 * m['fresh']['shape_top1']:.1f}%, colour "
                       f"{100 * m['fresh']['colour_top1']:.1f}%, R@1 {100 * m['fresh']['i2t_R@1']:.1f}% / "
                       f"{100 * m['fresh']['t2i_R@1']:.1f}%; shipped model: shape "
                       f"{100 * m['shipped']['shape_top1']:.1f}%, R@1 {100 * m['shipped']['i2t_R@1']:.1f}%"),
                  highlight=False)
    console.print(Text(f"report: {out / 'report.md'} (with results.json, loss.png, segmentation/)"), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
