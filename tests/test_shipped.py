"""The shipped tiny COSMOS model (weights/cosmos_tiny_synth.pt) and `cosmos demo`: the default of every command, with
no network, no `--weights` and no `$COSMOS_WEIGHTS`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmos.checkpoint import SHIPPED_FILE
from cosmos.data.synth import SHAPES, write_synth
from cosmos.paths import find_shipped

REPO = Path(__file__).resolve().parent.parent


def offline_env(tmp_path: Path) -> dict:
    """No network (the hub is a closed port), an empty download cache, no $COSMOS_WEIGHTS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, COSMOS_HUB_URL=f"http://127.0.0.1:{port}", COSMOS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    env.pop("COSMOS_WEIGHTS", None)
    return env


def test_the_shipped_file_is_small_safe_and_complete():
    path = find_shipped(SHIPPED_FILE)
    assert path.stat().st_size < 8 * 2**20  # fp16, a few MB
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["format"] == "cosmos" and obj["config"]["vision"]["stem"] == "conv"
    assert obj["labels"] == list(SHAPES) and obj["templates"] == "synth" and obj["tokenizer"]["kind"] == "bpe"
    assert all(t.dtype == torch.float16 for t in obj["teacher"].values() if t.is_floating_point())
    import cosmos

    model, _, tokenizer = cosmos.load("cosmos_tiny_synth", device="cpu")
    assert model.labels == list(SHAPES) and model.templates == "synth"
    assert tokenizer.vocab_size == model.config.text.vocab_size


@pytest.mark.slow
def test_classify_and_segment_work_offline_with_no_weights(tmp_path):
    data = tmp_path / "synth"
    write_synth(data, n=8, n_eval=40, size=64, workers=1, seed=7)
    env = offline_env(tmp_path)
    images = sorted((data / "eval" / "classify_shape").rglob("*.png"))
    done = subprocess.run([sys.executable, "-m", "cosmos_cli.main", "classify", *map(str, images), "--json",
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(images) == 40
    hits = sum(Path(r["image"]).parent.name == r["labels"][0]["label"] for r in results)
    assert hits / len(results) >= 0.25, hits  # 8 shapes: chance is 12.5%
    image = sorted((data / "eval" / "segment_shape" / "images").iterdir())[0]
    done = subprocess.run([sys.executable, "-m", "cosmos_cli.main", "segment", str(image), "--out", str(tmp_path / "seg"),
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "seg" / f"{image.stem}_mask.png").is_file()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing downloaded


@pytest.mark.slow
def test_demo_writes_every_file_of_the_report(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "cosmos_cli.main", "demo", "--out", str(out), "--minutes", "0.15", "--scenes",
               "256", "--eval-images", "16"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("report.md", "results.json", "loss.png", "segmentation/scene_0.png", "run/model.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"fresh", "shipped"} and results["train"]["steps"] >= 1
    report = (out / "report.md").read_text()
    assert "| shape top-1 |" in report and "shipped model" in report
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=offline_env(tmp_path))
    assert again.returncode == 2 and "--overwrite" in again.stderr
