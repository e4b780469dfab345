"""`cosmos train` end to end on `cosmos synth` shards (CPU): the loss goes down, checkpoints and model.pt load,
resume is exact, SIGTERM leaves a resumable checkpoint, a NaN stops the run, bad input is one line; and the
distributed paths under torchrun (2 gloo processes against 1, two --nnodes invocations on 127.0.0.1)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import one_line_error

from cosmos.data.synth import write_synth

try:
    from cosmos_cli import main as cli_main
except ImportError:
    from cli import main as cli_main

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
# Small and fast: tiny model, batch 8, fp32 (exact comparisons), no loader worker processes.
FAST = ("--model", "tiny", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--workers", "0",
        "--log-every", "1", "--lr", "1e-3", "--wd", "0.1")


def invoke(*args):
    return runner.invoke(cli_main.app, [str(a) for a in args])




def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synth(root, n=96, seed=0, size=64, n_eval=16, workers=1, maxcount=48)
    return root


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory) -> Path:
    """One 16-step run shared by several tests (checkpoints at 8 and 16, all kept)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    result = invoke("train", "--data", synth, "--out", out, "--steps", 16, "--save-every", 8, "--keep", 5, *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_train_writes_a_run_that_loads_and_learns(trained, synth):
    curve = losses(trained)
    assert sorted(curve) == list(range(1, 17))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.3, curve  # the loss goes down
    for name in ("config.json", "metrics.jsonl", "loss.png", "model.pt", "checkpoints/step_00000008.pt",
                 "checkpoints/step_00000016.pt"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["total_steps"] == 16 and config["mode"] == "cosmos" and config["views"]["hflip_p"] == 0.0
    row = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "clip", "distill", "distill_hi_ti", "lr", "logit_scale", "distill_logit_scale",
                "samples_per_s", "data_wait_s"):
        assert key in row, key
    import cosmos

    model, _, _ = cosmos.load(trained / "model.pt")  # the teacher by default
    assert not model.config.cosmos  # the teacher holds no poolers
    student, _, _ = cosmos.load(trained / "model.pt", which="student")
    assert student.config.cosmos and model.labels == student.labels and "star" in model.labels
    ckpt = torch.load(trained / "checkpoints/step_00000016.pt", weights_only=True)
    assert ckpt["train"]["step"] == 16 and "optimizer" in ckpt["train"] and len(ckpt["train"]["loaders"]) == 1
    # every CLI command takes model.pt
    image = synth / "eval" / "classify_shape" / "star"
    first_image = sorted(image.iterdir())[0]
    result = invoke("classify", first_image, "--weights", trained / "model.pt", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    probs = json.loads(result.stdout)[0]["labels"]
    assert {p["label"] for p in probs} == set(model.labels) and math.isclose(sum(p["prob"] for p in probs), 1, rel_tol=1e-4)


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_reproduces_the_losses(trained, synth, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    result = invoke("train", "--data", synth, "--out", out, "--steps", 16, "--save-every", 8, "--keep", 5,
                    "--resume", trained / "checkpoints/step_00000008.pt", *FAST)
    assert result.exit_code == 0, result.output
    again, original = losses(out), losses(trained)
    assert sorted(again) == list(range(9, 17))
    assert all(again[s] == original[s] for s in again), (again, original)  # exactly, not approximately
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(trained / "model.pt", weights_only=True)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in b["teacher"])


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(trained, synth, tmp_path):
    import shutil

    out = tmp_path / "branch"
    shutil.copytree(trained, out)
    result = invoke("train", "--data", synth, "--out", out, "--steps", 16, "--save-every", 4, "--keep", 1,
                    "--resume", out / "checkpoints/step_00000008.pt", *FAST)
    assert result.exit_code == 0, result.output
    assert "set aside" in " ".join(result.output.split())  # rich wraps lines
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the abandoned step 16 was renamed (not lost), so the rotation (--keep 1) pruned this branch's step 12 only
    # after its own step 16 (without the renaming, the old step 16 sorts last and step 12 goes at once)
    assert names == ["step_00000016.pt", "step_00000016.pt.abandoned"], names
    assert invoke("train", "--data", synth, "--out", out, "--steps", 16, "--save-every", 4, "--keep", 1,
                  "--resume", "auto", *FAST).exit_code == 0  # auto picks the branch's step 16: nothing left to do
    assert sorted(losses(out)) == list(range(1, 17))


def test_a_time_limited_run_stops_logs_its_last_step_and_resumes_its_schedule(synth, tmp_path):
    from cosmos.train.loop import learning_rate

    def timed(out, log_every, *more):
        return invoke("train", "--data", synth, "--out", out, "--steps", 100000, "--time-limit", 0.2, "--save-every",
                      6, "--keep", 100, *FAST, "--log-every", log_every, *more)  # the later --log-every wins

    def lrs(run):
        return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "lr" in r}

    out = tmp_path / "timed"
    result = timed(out, 4)
    assert result.exit_code == 0, result.output
    final = torch.load(out / "model.pt", weights_only=True)["step"]
    assert 8 <= final < 100000  # 12 s: about 20 steps of this size on 2 cores
    assert max(losses(out)) == final  # the step that ended the run is logged, even off the --log-every grid
    # a checkpoint after the first fit (step 5) holds the fitted schedule (not the 100,000-step cap) and the time
    mid = torch.load(out / "checkpoints/step_00000006.pt", weights_only=True)["train"]
    total, warmup = mid["config"]["total_steps"], mid["config"]["warmup"]
    assert total < 100000 and warmup <= total // 10 and 0 < mid["elapsed_s"] < 12
    branch = tmp_path / "branch"
    result = timed(branch, 1, "--resume", out / "checkpoints/step_00000006.pt")
    assert result.exit_code == 0, result.output
    # the schedule continues from the saved fit (until the resumed part refits after its 5th step); without it the
    # run would restart a warmup against the 100,000-step cap
    resumed, original = lrs(branch), lrs(out)
    assert resumed[7] == pytest.approx(learning_rate(6, 1e-3, warmup, total), rel=1e-9)
    assert resumed[8] == pytest.approx(original[8], rel=1e-9)


@pytest.mark.slow
def test_resume_auto_continues_and_refuses_changed_settings(synth, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--data", synth, "--out", out, "--steps", 4, "--save-every", 2, *FAST).exit_code == 0
    # an --out holding a run is refused without --resume
    assert "holds another run" in one_line_error(invoke("train", "--data", synth, "--out", out, "--steps", 4, *FAST))
    # --resume auto on a finished run: nothing left to do, same model
    assert invoke("train", "--data", synth, "--out", out, "--steps", 4, "--resume", "auto", *FAST).exit_code == 0
    assert sorted(losses(out)) == [1, 2, 3, 4]
    # other settings are refused, naming the setting
    line = one_line_error(invoke("train", "--data", synth, "--out", out, "--steps", 4, "--resume", "auto",
                                 *FAST[:-2], "--wd", "0.2"))
    assert "weight_decay" in line
    other = tmp_path / "other-data"
    write_synth(other, n=64, seed=1, size=64, n_eval=0, workers=1)
    line = one_line_error(invoke("train", "--data", other, "--out", out, "--steps", 4, "--resume", "auto", *FAST))
    assert "shard list" in line
    # --resume auto into an empty folder starts fresh
    fresh = tmp_path / "fresh"
    assert invoke("train", "--data", synth, "--out", fresh, "--steps", 2, "--resume", "auto", *FAST).exit_code == 0
    assert sorted(losses(fresh)) == [1, 2]


@pytest.mark.slow
def test_bad_input_gets_one_line_and_writes_nothing(synth, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert "no .tar shards" in one_line_error(invoke("train", "--data", empty, "--out", out, "--steps", 2, *FAST))
    assert "no such" in one_line_error(invoke("train", "--data", tmp_path / "missing", "--out", out, "--steps", 2, *FAST))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert "a text file, not a PyTorch checkpoint" in one_line_error(
        invoke("train", "--data", synth, "--out", out, "--steps", 2, "--init", text, *FAST))
    line = one_line_error(invoke("train", "--data", synth, "--out", out, "--steps", 2, *FAST[:2], "--batch-size",
                                 "200", *FAST[4:]))
    assert "200" in line and "96" in line
    assert "exactly one of --steps and --epochs" in one_line_error(invoke("train", "--data", synth, "--out", out, *FAST))
    assert "--mode" in one_line_error(invoke("train", "--data", synth, "--out", out, "--steps", 2, "--mode", "dino", *FAST))
    assert "multiple of --accum" in one_line_error(
        invoke("train", "--data", synth, "--out", out, "--steps", 2, "--accum", "3", *FAST))
    assert "fp16 needs a CUDA" in one_line_error(
        invoke("train", "--data", synth, "--out", out, "--steps", 2, *FAST[:4], "--precision", "fp16", *FAST[6:]))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_init_from_a_clip_checkpoint_and_the_clip_modes(synth, tmp_path, trained):
    # start COSMOS from the teacher of a run (a CLIP-only model): its extras are freshly initialized
    out = tmp_path / "init"
    result = invoke("train", "--data", synth, "--out", out, "--steps", 2, "--init", trained / "model.pt", *FAST)
    assert result.exit_code == 0, result.output
    for mode in ("clip", "clip-textcrops"):
        out = tmp_path / mode
        result = invoke("train", "--data", synth, "--out", out, "--steps", 3, "--mode", mode, *FAST)
        assert result.exit_code == 0, result.output
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert "distill" not in row and math.isfinite(row["loss"])
        sd = torch.load(out / "model.pt", weights_only=True)
        assert sd["teacher"] is None and not any(k.startswith("text_attn_cross_pool") for k in sd["student"])


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step(synth, tmp_path, monkeypatch):
    from cosmos.train import step as step_module

    real = step_module.cosmos_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            parts = {k: v * float("nan") for k, v in parts.items()}
        return parts

    monkeypatch.setattr(step_module, "cosmos_loss", poisoned)
    out = tmp_path / "nan"
    line = one_line_error(invoke("train", "--data", synth, "--out", out, "--steps", 6, "--save-every", 2, *FAST))
    assert "nan" in line and "step 3" in line and "step_00000002.pt" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    assert sorted(losses(out)) == [1, 2]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_and_resume_continues(synth, tmp_path):
    out = tmp_path / "sig"
    args = ["train", "--data", synth, "--out", out, "--steps", 20, "--save-every", 1000, *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_cli.main", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 3:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped by a signal" in stdout
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    step = torch.load(saved[0], weights_only=True)["train"]["step"]
    assert 3 <= step < 20
    result = invoke(*args, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert sorted(losses(out)) == list(range(1, 21))  # the run went on from where it stopped, to the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_torchrun_processes_match_one_process(tmp_path, accum):
    from cosmos.model.cosmos import CosmosModel
    from cosmos.train.loss import LossConfig
    from cosmos.train.step import StudentForward, TrainStep
    from tests.test_train_loss import perturbed_teacher, small_config, step_inputs

    out = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "tests.dist_step", str(out), str(accum)]
    done = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = CosmosModel(small_config())
    teacher = perturbed_teacher(model)
    loss_cfg = LossConfig()
    parts = TrainStep(StudentForward(model, loss_cfg.cross()), teacher, loss_cfg, torch.device("cpu"), "fp32")(
        step_inputs(16))
    for k, v in parts.items():
        assert math.isclose(ddp["parts"][k], v, rel_tol=1e-5), k
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ddp["grads"])
    for k, g in grads.items():
        err = float((ddp["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err <= 1e-4, (k, err)


@pytest.mark.slow
def test_nproc_2_trains_and_two_nnodes_invocations_rendezvous(synth, tmp_path):
    # `cosmos train --nproc 2` launches torchrun on this node
    out = tmp_path / "nproc"
    command = [sys.executable, "-m", "cosmos_cli.main", "train", "--data", str(synth), "--out", str(out),
               "--steps", "3", "--save-every", "2", "--nproc", "2", *FAST]
    done = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 16
    ckpt = torch.load(out / "checkpoints/step_00000003.pt", weights_only=True)
    assert len(ckpt["train"]["loaders"]) == 2 and [s["rank"] for s in ckpt["train"]["loaders"]] == [0, 1]
    # two "nodes" of one process each, rendezvous over c10d on 127.0.0.1
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test", "-m", "cosmos_cli.main",
                   "train", "--data", str(synth), "--out", str(out), "--steps", "2", *FAST]
        procs.append(subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and sorted(losses(out)) == [1, 2]


@pytest.mark.slow
def test_torchrun_max_restarts_recovers_a_killed_worker_with_resume_auto(synth, tmp_path):
    out = tmp_path / "elastic"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "-m", "cosmos_cli.main", "train", "--data", str(synth), "--out", str(out), "--steps", "24",
               "--save-every", "4", "--keep", "100", "--resume", "auto", *FAST]
    agent = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list((out / "checkpoints").glob("step_*.pt")):
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)  # a crash: no handler of ours runs in that worker
        stdout, stderr = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr  # torchrun saw the killed worker (and restarted the group)
    # the surviving worker stopped with one line, no traceback of the failed collective
    assert "another process of this run failed" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 24
    # the restarted workers resumed from the last checkpoint: every step is in the log once, none twice
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 25)), steps


@pytest.mark.slow
def test_val_metrics_epochs_and_synthetic_data(synth, tmp_path):
    out = tmp_path / "val"
    result = invoke("train", "--data", synth, "--out", out, "--epochs", "0.25", "--val", synth, "--val-every", 3,
                    "--accum", 2, *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    assert config["steps_per_epoch"] == 12 and config["total_steps"] == 3  # 96 scenes / batch 8, a quarter epoch
    val = [r for r in rows if "val_shape_top1" in r]
    assert len(val) == 1 and val[0]["step"] == 3
    for key in ("val_shape_top1", "val_colour_top1", "val_i2t_R@1", "val_t2i_R@1"):
        assert 0.0 <= val[0][key] <= 1.0
    # random views of the configured sizes, nothing decoded: for timing steps
    out = tmp_path / "speed"
    result = invoke("train", "--data", "synthetic", "--out", out, "--steps", 2, *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(losses(out)) == [1, 2]
