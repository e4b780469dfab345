"""One loader for every checkpoint flavour, its errors, and the download path (against a local HTTP server)."""
import http.server
import os
import socket
import threading
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import cosmos
from cosmos.checkpoint import RELEASED, download, infer_config, load_model, save
from cosmos.errors import CosmosError
from cosmos.model.cosmos import CosmosConfig, CosmosModel, TextConfig, VisionConfig, get_config, is_cosmos_extra

SMALL = CosmosConfig(
    embed_dim=64,
    vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
    text=TextConfig(context_length=77, vocab_size=49408, width=64, layers=2, heads=1),
    cross_pool_heads=1,  # head width 64, the rule a config inferred from tensors follows
)


def small_openclip():
    return open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
    ).eval()


def batch():
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, 40000, (2, 77), generator=g)
    text[:, 9] = 49407
    text[:, 10:] = 0
    return torch.randn(2, 3, 32, 32, generator=g), text


def test_config_is_inferred_from_tensors():
    for name in ("ViT-B-16", "ViT-B-32", "tiny"):
        cfg = get_config(name)
        sd = CosmosModel(cfg).state_dict()
        assert infer_config(sd) == cfg, name
        clip_only = {k: v for k, v in sd.items() if not is_cosmos_extra(k)}
        assert infer_config(clip_only).cosmos is False


def test_released_cosmos_file_loads_strictly_teacher_and_student(tmp_path):
    torch.manual_seed(0)
    student, teacher = CosmosModel(SMALL), CosmosModel(SMALL)
    extras = [k for k in student.state_dict() if is_cosmos_extra(k)]
    assert len(extras) == 21
    path = tmp_path / "cosmos_release.pt"
    torch.save({
        "epoch": 32,
        "student": {"module." + k: v for k, v in student.state_dict().items()},  # DDP-wrapped student
        "teacher": teacher.state_dict(),
    }, path)
    images, text = batch()
    got_t, meta = load_model(path)  # teacher by default
    got_s, _ = load_model(path, which="student")
    assert meta["which"] == "teacher" and meta["epoch"] == 32
    assert got_t.config.cosmos and got_t.config == SMALL
    for got, ref in ((got_t, teacher), (got_s, student)):
        for k, v in ref.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    with torch.no_grad():
        e_t, e_s = got_t.encode_image(images), got_s.encode_image(images)
        assert torch.allclose(e_t, teacher.eval().encode_image(images), atol=1e-6)
        assert (e_t - e_s).abs().max() > 1e-3  # different weights, different embeddings
    with pytest.raises(CosmosError, match="which must be"):
        load_model(path, which="ema")


def test_openclip_state_dict_and_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = small_openclip()
    images, text = batch()
    raw = tmp_path / "raw.pt"
    torch.save(ref.state_dict(), raw)
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    sd["module.logit_scale"] = sd["module.logit_scale"].reshape(1)  # older files store [1]
    trained = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": sd, "optimizer": {"state": {}}}, trained)
    with torch.no_grad():
        want = ref.encode_image(images), ref.encode_text(text)
        for path in (raw, trained):
            model, _ = load_model(path)
            assert model.config.cosmos is False
            assert (model.encode_image(images) - want[0]).abs().max() <= 1e-5
            assert (model.encode_text(text) - want[1]).abs().max() <= 1e-5
            assert model.logit_scale.shape == ()


def test_our_format_round_trips_with_tokenizer_and_labels(tmp_path):
    from cosmos.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train(["a red circle", "a blue square on the left", "two green stars"] * 20, vocab_size=600)
    cfg = CosmosConfig(**{**SMALL.__dict__, "text": TextConfig(context_length=32, vocab_size=tok.vocab_size,
                                                                width=64, layers=2, heads=1)})
    student, teacher = CosmosModel(cfg), CosmosModel(cfg)
    path = save(tmp_path / "run" / "last.pt", student, tokenizer=tok, labels=["circle", "square"], teacher=teacher,
                extra={"step": 7})
    assert not list((tmp_path / "run").glob("*.tmp"))  # atomic write leaves no temporary file behind
    model, preprocess, tokenizer = cosmos.load(path)
    assert model.labels == ["circle", "square"]
    assert tokenizer.vocab_size == tok.vocab_size and tokenizer.context_length == 32
    assert torch.equal(tokenizer(["a red circle"]), tok(["a red circle"], context_length=32))
    assert torch.equal(model.state_dict()["visual.proj"], teacher.state_dict()["visual.proj"])
    assert preprocess.transforms[1].size == (32, 32)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["format"] == "cosmos"


def test_clip_checkpoint_gives_clip_tokenizer(tmp_path):
    torch.save(small_openclip().state_dict(), tmp_path / "clip.pt")
    model, preprocess, tokenizer = cosmos.load(tmp_path / "clip.pt", device="cpu")
    assert torch.equal(tokenizer("a photo of a cat."), open_clip.tokenize("a photo of a cat."))
    assert not model.training


@pytest.mark.parametrize("kind, message", [
    ("text", "a text file, not a PyTorch checkpoint"),
    ("truncated", "a damaged or truncated checkpoint"),
    ("empty", "an empty file, not a checkpoint"),
    ("list", "holds a list"),
    ("missing", "missing keys"),
    ("unexpected", "unexpected keys"),
    ("shape", "shape mismatches"),
    ("nonsense", "not a CLIP/COSMOS state dict"),
])
def test_bad_files_get_clear_errors(tmp_path, kind, message):
    path = tmp_path / f"{kind}.pt"
    sd = CosmosModel(SMALL).state_dict()
    if kind == "text":
        path.write_text("this is a caption file, not weights\n")
    elif kind == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "missing":
        sd.pop("visual.ln_post.weight")
        torch.save({"format": "cosmos", "config": SMALL.to_dict(), "student": sd}, path)
    elif kind == "unexpected":
        sd["visual.extra_head.weight"] = torch.zeros(3)
        torch.save({"format": "cosmos", "config": SMALL.to_dict(), "student": sd}, path)
    elif kind == "shape":
        sd["visual.proj"] = torch.zeros(128, 32)
        torch.save({"format": "cosmos", "config": SMALL.to_dict(), "student": sd}, path)
    elif kind == "nonsense":
        torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CosmosError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_name():
    with pytest.raises(CosmosError, match="no such file, and not a known checkpoint name"):
        load_model("/nonexistent/weights.pt")


# --- downloads, against a server on 127.0.0.1 ------------------------------------------------------------------
class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    honour_range = True
    wrong_start = False  # answer a Range request with 206 from byte 0 (a broken server or CDN)
    cut_after = None  # send only this many bytes of the body, then close (a broken download)
    seen_ranges: list = []

    def do_GET(self):
        body, status, start = self.payload, 200, 0
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        if rng and self.honour_range:
            start = 0 if self.wrong_start else int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            body, status = body[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if self.cut_after is not None:
            body = body[: self.cut_after]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    handler = type("Handler", (RangeHandler,), {"seen_ranges": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("COSMOS_HUB_URL", f"http://127.0.0.1:{httpd.server_address[1]}/files")
    monkeypatch.setenv("COSMOS_CACHE", str(tmp_path / "cache"))
    yield handler
    httpd.shutdown()
    httpd.server_close()


NAME = "cosmos_vitb16_merged30m"


def test_download_once_into_cache(server):
    server.payload = os.urandom(3_000_000)
    seen = []
    path = download(NAME, progress=lambda done, total: seen.append((done, total)))
    assert path.name == RELEASED[NAME] and path.read_bytes() == server.payload
    assert seen[-1] == (3_000_000, 3_000_000) and len(seen) > 2
    assert download(NAME) == path and len(server.seen_ranges) == 1  # cached: no second request


def test_broken_download_resumes(server):
    server.payload = os.urandom(2_500_000)
    server.cut_after = 1_000_000
    with pytest.raises(CosmosError, match="stopped at|no network"):
        download(NAME)
    part = _part()
    assert part.stat().st_size == 1_000_000
    server.cut_after = None
    path = download(NAME)
    assert path.read_bytes() == server.payload
    assert server.seen_ranges[-1] == "bytes=1000000-"
    assert not part.exists()


def test_server_without_ranges_restarts_cleanly(server):
    server.payload = os.urandom(500_000)
    part = Path(os.environ["COSMOS_CACHE"]) / (RELEASED[NAME] + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes")
    server.honour_range = False
    assert download(NAME).read_bytes() == server.payload


def _part() -> Path:
    return Path(os.environ["COSMOS_CACHE"]) / (RELEASED[NAME] + ".part")


def test_part_file_larger_than_remote_is_discarded(server):
    # a 416 answer means "nothing past your bytes": complete only if the sizes agree, else start again
    server.payload = os.urandom(100_000)
    _part().parent.mkdir(parents=True)
    _part().write_bytes(os.urandom(200_000))
    assert download(NAME).read_bytes() == server.payload


def test_complete_part_file_is_promoted_on_416(server):
    server.payload = os.urandom(100_000)
    _part().parent.mkdir(parents=True)
    _part().write_bytes(server.payload)
    assert download(NAME).read_bytes() == server.payload
    assert server.seen_ranges == ["bytes=100000-"]


def test_206_from_the_wrong_offset_is_not_appended(server):
    server.payload = os.urandom(100_000)
    server.wrong_start = True
    _part().parent.mkdir(parents=True)
    _part().write_bytes(server.payload[:30_000])
    assert download(NAME).read_bytes() == server.payload


def test_concurrent_downloads_share_one_file(server):
    server.payload = os.urandom(2_000_000)
    results, errors = [], []

    def fetch():
        try:
            results.append(download(NAME).read_bytes())
        except Exception as e:  # noqa: BLE001 - any failure is the test's failure
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and results == [server.payload] * 3
    assert len(server.seen_ranges) == 1


def test_no_network_says_so(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("COSMOS_HUB_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("COSMOS_CACHE", str(tmp_path))
    with pytest.raises(CosmosError, match="no network") as info:
        load_model(NAME)
    assert "--weights" in str(info.value)


def test_registry_name_loads_a_downloaded_checkpoint(server):
    torch.manual_seed(0)
    teacher = CosmosModel(SMALL)
    path = Path(os.environ["COSMOS_CACHE"]) / "src.pt"
    path.parent.mkdir(parents=True)
    torch.save({"student": teacher.state_dict(), "teacher": teacher.state_dict()}, path)
    server.payload = path.read_bytes()
    model, _ = load_model(NAME)
    assert torch.equal(model.state_dict()["visual.proj"], teacher.state_dict()["visual.proj"])


def test_wide_vision_towers_infer_openclip_head_counts(tmp_path):
    # ViT-H/g/bigG use a vision head width other than 64; a wrong head count would load strictly but compute wrong
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=1, width=1280, head_width=80, patch_size=14, image_size=28),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "wide.pt")
    model, _ = load_model(tmp_path / "wide.pt")
    assert model.config.vision.heads == 16
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-5


def test_loaded_model_deep_copies_into_an_independent_teacher(tmp_path):
    import copy

    torch.save({"student": CosmosModel(SMALL).state_dict()}, tmp_path / "s.pt")
    student, _ = load_model(tmp_path / "s.pt", which="student")
    teacher = copy.deepcopy(student)
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    with torch.no_grad():
        teacher.visual.proj.add_(1.0)
    assert not torch.equal(teacher.visual.proj, student.visual.proj)
