"""What a new user throws at the toolkit in the first hour (issue "Hardening"): devices, text encodings, file names
that are not UTF-8, interruption, outputs checked before work, options checked up front, one-sentence messages,
clean output. Every case at the CLI where the user meets it; one line on stderr, nothing lost or half-written."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import one_line_error

import cosmos
from cosmos.errors import CosmosError
from cosmos.model.cosmos import CosmosConfig, CosmosModel, TextConfig, VisionConfig

try:
    from cosmos_cli import main as cli_main
except ImportError:
    from cli import main as cli_main

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
SMALL = CosmosConfig(embed_dim=64, vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=1, heads=1),
                     text=TextConfig(width=64, layers=1, heads=1), cross_pool_heads=1)


def run(*args):
    return runner.invoke(cli_main.app, [str(a) for a in args])




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    cosmos.save(path, CosmosModel(SMALL), labels=["red", "blue"])
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    return path


# --- 1. devices ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, words", [("cuda", "CUDA is not available"), ("mps", "not available"),
                                           ("tpu", "not a device name"), ("cuda:3", "CUDA")])
def test_unavailable_devices_are_one_line_before_loading(image, tmp_path, device, words):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    missing = tmp_path / "never-read.pt"  # the device is refused before any weights are looked at
    line = one_line_error(run("classify", image, "--labels", "a,b", "--weights", missing, "--device", device), code=2)
    assert repr(device) in line and words in line and "available" in line and "never-read" not in line
    with pytest.raises(CosmosError, match="available"):
        cosmos.load(missing, device=device)


# --- 3. text encodings in sources -----------------------------------------------------------------------------------
def _table_source(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (20, 200, 20)).save(tmp_path / "a.jpg")
    return tmp_path


@pytest.mark.parametrize("suffix, content", [
    (".csv", b"\xef\xbb\xbffilepath,title\na.jpg,a green thing\na.jpg,another one\n"),
    (".tsv", b"\xef\xbb\xbffilepath\ttitle\na.jpg\ta green thing\na.jpg\tanother one\n"),
    (".jsonl", b'\xef\xbb\xbf{"filepath": "a.jpg", "title": "a green thing"}\n{"filepath": "a.jpg", "title": "two"}\n'),
])
def test_a_utf8_bom_is_stripped(tmp_path, suffix, content):
    src = _table_source(tmp_path) / f"table{suffix}"
    src.write_bytes(content)
    result = run("preprocess", src, "--out", tmp_path / "out", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 2}  # the first row kept


def test_other_encodings_are_named(tmp_path):
    src = _table_source(tmp_path) / "table.csv"
    src.write_bytes("filepath,title\na.jpg,a green thing\n".encode("utf-16"))
    line = one_line_error(run("preprocess", src, "--out", tmp_path / "out"))
    assert str(src) in line and "line 1" in line and "UTF-16" in line and "convert" in line
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"filepath,title\na.jpg,caf\xe9 au lait\na.jpg,fine\n")
    result = run("preprocess", latin, "--out", tmp_path / "out2", "--workers", 1)
    assert result.exit_code == 0, result.output
    skipped = json.loads((tmp_path / "out2" / "manifest.json").read_text())["skipped"]
    assert len(skipped) == 1 and "line 2" in skipped[0]["reason"] and "Windows-1252" in skipped[0]["reason"]


# --- 4. file names that are not UTF-8 ---------------------------------------------------------------------------------
def test_latin1_file_names_are_read_listed_written_and_printed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    latin = os.fsdecode(b"caf\xe9")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / f"{latin}.jpg")
    (src / f"{latin}.txt").write_bytes(b"a red cafe")
    Image.new("RGB", (40, 30), (10, 10, 200)).save(src / "ok.jpg")
    (src / "ok.txt").write_text("a blue thing")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cosmos_cli.main", "preprocess", str(src), "--out", str(out),
                           "--workers", "1"], capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON
    assert manifest["counts"]["written"] == 2
    from cosmos.data.shards import iter_samples

    sources = sorted(s["meta"].get("source") for s in iter_samples(str(out)))
    assert sources == ["caf\\xe9.jpg", "ok.jpg"]
    # printed: an unreadable file with a Latin-1 name gets its one line with the name escaped
    bad = src / f"{latin}-broken.png"
    bad.write_bytes(b"not an image")
    done = subprocess.run([sys.executable, "-m", "cosmos_cli.main", "classify", str(bad), "--labels", "a,b",
                           "--weights", str(out / "nothing.pt")], capture_output=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode != 0 and b"Traceback" not in done.stderr


# --- 5. interruption ------------------------------------------------------------------------------------------------
def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_preprocess_interrupted_exits_promptly_and_can_be_rerun(tmp_path, sig):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        Image.new("RGB", (400, 300), (i % 255, 30, 60)).save(src / f"{i:04d}.png")
        (src / f"{i:04d}.txt").write_text(f"picture number {i}")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cosmos_cli.main", "preprocess", str(src), "--out", str(out), "--workers", "2",
               "--shard-size", "20"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    _wait_for(lambda: out.is_dir() and any(out.glob("*.tar")))
    sent = time.time()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.time() - sent < 10, "did not exit promptly"
    assert proc.returncode in (130, 143) and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1].startswith("error: ")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written: the same command simply reruns
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 300


@pytest.mark.slow
def test_synth_interrupted_exits_promptly_without_worker_tracebacks(tmp_path):
    out = tmp_path / "synth"
    command = [sys.executable, "-m", "cosmos_cli.main", "synth", "--out", str(out), "--n", "100000", "--size", "64",
               "--workers", "2"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        _wait_for(lambda: (out / "train").is_dir() and any((out / "train").glob("*")))
        os.killpg(proc.pid, sig)  # as a terminal does: the whole process group, workers included
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert not out.exists() or not any(out.iterdir())


# --- 6. outputs checked before the work -------------------------------------------------------------------------------
def test_outputs_are_checked_before_any_work(tmp_path, image):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    missing = tmp_path / "never-read.pt"  # the output is refused before the model is looked at
    synth = tmp_path / "synth"
    from cosmos.data.synth import write_synth

    write_synth(synth, n=4, n_eval=2, size=32, workers=1)
    line = one_line_error(run("eval", "classification", "--synthetic", synth, "--weights", missing, "--out", folder))
    assert "--out" in line and "is a folder" in line
    line = one_line_error(run("eval", "retrieval", "--synthetic", synth, "--weights", missing, "--out",
                              a_file / "results.json"))
    assert "is a file" in line
    line = one_line_error(run("segment", image, "--labels", "a,b", "--weights", missing, "--out", a_file))
    assert "--out" in line and "not a folder" in line
    line = one_line_error(run("preprocess", tmp_path, "--out", a_file))
    assert "--out" in line and "not a folder" in line


# --- 7. options validated up front ------------------------------------------------------------------------------------
def test_options_are_validated_up_front(tmp_path, image, ckpt):
    (tmp_path / "src").mkdir()
    src = _table_source(tmp_path / "src")
    (src / "t.csv").write_text("filepath,title\na.jpg,green\n")
    out = tmp_path / "shards"
    assert "--shard-size" in one_line_error(run("preprocess", src / "t.csv", "--out", out, "--shard-size", 0))
    assert not out.exists() or not any(out.iterdir())
    assert "--size 100000" in one_line_error(run("synth", "--out", tmp_path / "s", "--n", 1, "--size", 100000))
    assert not (tmp_path / "s").exists()
    for scale in ("0", "-3"):
        assert "--logit-scale" in one_line_error(run("segment", image, "--labels", "a,b", "--weights", ckpt,
                                                     "--logit-scale", scale, "--out", tmp_path / "seg"))
    many = ",".join(f"class{i}" for i in range(300))
    assert "255" in one_line_error(run("segment", image, "--labels", many, "--weights", tmp_path / "never.pt",
                                       "--out", tmp_path / "seg"))
    assert "--weights is empty" in one_line_error(run("classify", image, "--labels", "a,b", "--weights", ""))


# --- 8. messages ----------------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_messages_are_one_sentence_each(tmp_path, image, ckpt):
    cases = {}
    cases["text"] = tmp_path / "notes.pt"
    cases["text"].write_text("these are my notes\n")
    cases["truncated"] = tmp_path / "cut.pt"
    data = ckpt.read_bytes()
    cases["truncated"].write_bytes(data[: len(data) // 3])
    cases["code"] = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, cases["code"])
    cases["newer"] = tmp_path / "newer.pt"
    obj = torch.load(ckpt, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, cases["newer"])
    expected = {"text": "a text file, not a PyTorch checkpoint", "truncated": "damaged or truncated",
                "code": "refused for safety", "newer": "newer cosmos"}
    for kind, path in cases.items():
        result = run("classify", image, "--labels", "a,b", "--weights", path)
        line = one_line_error(result)  # torch's own warnings are not printed before it
        assert str(path) in line and expected[kind] in line, (kind, line)
        assert "pwned" not in result.output


def test_retrieval_json_without_annotations_is_named(tmp_path):
    data = tmp_path / "instances.json"
    (tmp_path / "images").mkdir()
    data.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    line = one_line_error(run("eval", "retrieval", "--data", data, "--weights", tmp_path / "never.pt"))
    assert "without 'annotations'" in line and "split" not in line


def test_a_failed_download_leaves_no_lock(tmp_path, monkeypatch):
    import socket

    from cosmos import checkpoint

    with socket.socket() as s:  # a closed port: the download fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("COSMOS_HUB_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("COSMOS_CACHE", str(tmp_path))
    with pytest.raises(CosmosError, match="cannot download"):
        checkpoint.download("cosmos_vitb16_cc3m", timeout=2)
    assert list(tmp_path.glob("*.lock")) == []


# --- 9. output hygiene ------------------------------------------------------------------------------------------------
def test_json_is_never_nan(tmp_path, image):
    model = CosmosModel(SMALL)
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    cosmos.save(path, model)
    result = run("classify", image, "--labels", "a,b", "--weights", path, "--json")
    assert "non-finite" in one_line_error(result) and result.stdout.strip() == ""


def test_no_blank_lines_when_not_a_terminal_and_version(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cosmos_cli.main", "synth", "--out", str(tmp_path / "s"), "--n", "8",
                           "--n-eval", "2", "--size", "32", "--workers", "1"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0
    assert done.stderr == "" and "\n\n" not in done.stdout and not done.stdout.startswith("\n"), repr(done.stdout)
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cosmos ")


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = cosmos.save(tmp_path / "m.pt", CosmosModel(SMALL))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_trivial_cases_are_scored_by_one_rule(tmp_path):
    from cosmos.zeroshot.retrieval import recall_at_k

    one = recall_at_k(torch.ones(1, 4), torch.ones(2, 4), torch.tensor([0, 0]))
    assert all(v is None for v in one.values())  # retrieval over one image: every recall is trivially 100%
    two = recall_at_k(torch.eye(2, 4), torch.eye(2, 4), torch.tensor([0, 1]), ks=(1, 5))
    assert two == {"i2t_R@1": 1.0, "i2t_R@5": None, "t2i_R@1": 1.0, "t2i_R@5": None}
