"""Saving and loading: one loader for every checkpoint flavour, and the registry of released COSMOS weights.

Accepted files (always read with `torch.load(weights_only=True)`: a checkpoint is untrusted pickle otherwise):
- ours: {"format": "cosmos", "config", "student", "teacher"?, "tokenizer"?, "labels"?, ...}
- a released COSMOS file: {"student", "teacher", "epoch", ...}; student keys may carry `module.` (DDP)
- an OpenCLIP training checkpoint: {"state_dict", "epoch", "optimizer", ...}, keys possibly `module.`-prefixed
- a raw OpenCLIP / CLIP state dict
`logit_scale` may be 0-dim or [1]. When a file carries no config it is inferred from the tensor shapes; QuickGELU
cannot be seen in tensors, so it is a load option (off: COSMOS and LAION models use GELU). A plain CLIP file loads
into the CLIP part of the model (the COSMOS extras are then absent: `model.config.cosmos` is False).
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CosmosError
from .model.cosmos import CosmosConfig, CosmosModel, TextConfig, VisionConfig, is_cosmos_extra
from .paths import atomic_write, cache_dir

FORMAT = "cosmos"
FORMAT_VERSION = 1

# --- the registry of released checkpoints ----------------------------------------------------------------------
HUB_URL = "https://huggingface.co/sankim2/cosmos/resolve/main"
RELEASED = {
    f"cosmos_vitb{patch}_{data}": f"cosmos_vitb{patch}_{data}.pt"
    for patch in (16, 32)
    for data in ("cc3m", "cc12m", "yfcc15m", "merged30m", "pixelprose")
}


# The tiny COSMOS model trained on `cosmos synth` scenes, shipped in weights/ (the CLI's default model).
SHIPPED_NAME = "cosmos_tiny_synth"
SHIPPED_FILE = "cosmos_tiny_synth.pt"


def hub_url(name: str) -> str:
    """Download address of a released checkpoint; $COSMOS_HUB_URL replaces the Hugging Face base (mirrors, tests)."""
    base = os.environ.get("COSMOS_HUB_URL", HUB_URL).rstrip("/")
    return f"{base}/{RELEASED[name]}"


ProgressFn = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def download(name: str, progress: ProgressFn | None = None, timeout: float = 30.0) -> Path:
    """Fetch a released checkpoint into the cache once; resume a broken download from its `.part` file.

    Several processes (e.g. DDP ranks) may call this at once: a lock file lets one download while the others wait.
    """
    if name not in RELEASED:
        raise CosmosError(f"unknown checkpoint name {name!r}; known: {', '.join(RELEASED)}")
    target = cache_dir() / RELEASED[name]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    with _file_lock(lock):
        try:
            if not target.is_file():  # another process may have finished it while we waited
                _fetch(name, hub_url(name), target, progress, timeout)
        finally:
            lock.unlink(missing_ok=True)  # no stale .lock left behind, whether the download worked or not
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: concurrent downloads are the caller's business
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a Content-Range header: "bytes 100-199/1000" -> (100, 1000), "bytes */1000" -> (None, 1000);
    an unknown part is None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _fetch(name: str, url: str, target: Path, progress: ProgressFn | None, timeout: float) -> None:
    part = target.with_name(target.name + ".part")
    for attempt in range(2):  # a second attempt only after discarding a .part file that does not fit the remote file
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 206:
                    start, total = _content_range(response.headers.get("Content-Range"))
                    if start != have:  # not the continuation we asked for: start again from zero
                        part.unlink()
                        continue
                else:  # 200: the whole file (the server ignored or did not need the range)
                    have = 0
                    length = response.headers.get("Content-Length")
                    total = int(length) if length is not None else None
                done = have
                with open(part, "ab" if have else "wb") as out:
                    if progress:
                        progress(done, total)
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left past our bytes: complete only if the sizes agree
                _, total = _content_range(e.headers.get("Content-Range"))
                if total == have:
                    os.replace(part, target)
                    return
                part.unlink()
                continue
            raise CosmosError(f"downloading {name} from {url} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            kept = f"; {part} keeps the {part.stat().st_size} bytes received, the next try resumes" if part.exists() else ""
            raise CosmosError(
                f"cannot download {name} from {url} ({reason}): no network? Download the file by hand and pass its "
                f"path with --weights, or put it at {target}{kept}"
            ) from None
        if total is not None and done != total:
            raise CosmosError(f"download of {name} stopped at {done} of {total} bytes; run again to resume")
        os.replace(part, target)
        return
    raise CosmosError(f"downloading {name} from {url}: the server's file does not match the partial download; "
                      f"delete {part} and try again")


# --- reading files -----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with errors that say what the file is not."""
    path = Path(path)
    if not path.exists():
        raise CosmosError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CosmosError(f"{path}: is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's own warnings would print before our one-line message
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; say what this file is instead
        raise CosmosError(_unreadable(path, e)) from None
    if not isinstance(obj, dict):
        raise CosmosError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    version = obj.get("format_version")
    if obj.get("format") == FORMAT and isinstance(version, int) and version > FORMAT_VERSION:
        raise CosmosError(f"{path}: written by a newer cosmos (checkpoint format version {version}; this one reads up "
                          f"to {FORMAT_VERSION}); upgrade cosmos to load it")
    return obj


def _unreadable(path: Path, error: Exception) -> str:
    """One sentence saying what a file that torch.load(weights_only=True) refused is."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return f"{path}: an empty file, not a checkpoint"
    try:  # checked before torch's own verdict: newer torch reports a text file as an unsafe pickle
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at byte 512 is fine
        printable = all(c >= 32 or c in (9, 10, 13) for c in head)
    except UnicodeDecodeError:
        printable = False
    if printable and not head.startswith(b"PK"):
        return f"{path}: a text file, not a PyTorch checkpoint; pass a .pt / .bin / .pth file written by torch.save"
    if "Weights only load failed" in str(error):
        return (f"{path}: a pickle holding Python objects other than tensors (loading it could run code), refused "
                "for safety; if you trust it, load it yourself and re-save its state dict with torch.save")
    if head.startswith(b"PK\x03\x04"):
        return f"{path}: a damaged or truncated checkpoint (its zip archive cannot be read: {text}); copy or download it again"
    if head[:1] == b"\x80":
        return f"{path}: a damaged or truncated legacy (non-zip) PyTorch checkpoint ({text}); copy or download it again"
    return f"{path}: not a PyTorch checkpoint (unknown format: {text})"


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def split_checkpoint(obj: dict, which: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict of the chosen weights, metadata) from any accepted flavour."""
    if which not in ("teacher", "student"):
        raise CosmosError(f"which must be 'teacher' or 'student', got {which!r}")
    if "student" in obj or "teacher" in obj:  # ours, or a released COSMOS file
        sd = obj.get(which)
        if sd is None:
            other = "student" if which == "teacher" else "teacher"
            if obj.get(other) is None:
                raise CosmosError(f"{name}: has neither 'student' nor 'teacher' weights")
            if which == "teacher":  # a student-only checkpoint (e.g. a CLIP baseline run): its student is the model
                sd, which = obj[other], other
            else:
                raise CosmosError(f"{name}: has no 'student' weights (keys: {', '.join(map(str, obj))})")
    elif "state_dict" in obj:  # OpenCLIP training checkpoint
        sd = obj["state_dict"]
    else:
        sd = obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CosmosError(f"{name}: does not contain a state dict of tensors (top-level keys: {list(obj)[:8]})")
    meta = {k: v for k, v in obj.items() if k not in ("student", "teacher", "state_dict", "optimizer", "scaler")}
    meta["which"] = which
    return _strip_module(sd), meta


def _count_blocks(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


# Head counts cannot be read off tensors. OpenCLIP's ViTs use a head width of 64 except these vision widths
# (ViT-H-14: 1280 / 80, ViT-g-14: 1408 / 88, ViT-bigG-14: 1664 / 104); every text tower uses 64.
VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}


def infer_config(sd: dict[str, torch.Tensor], quick_gelu: bool = False, name: str = "checkpoint") -> CosmosConfig:
    """Read a model config off the tensor shapes; head counts follow OpenCLIP's head widths (VISION_HEAD_WIDTH)."""
    try:
        pos = sd["visual.positional_embedding"]
        width = pos.shape[1]
        if "visual.conv1.weight" in sd:
            patch, stem = sd["visual.conv1.weight"].shape[-1], "patch"
        else:
            n_convs = sum(1 for k in sd if re.fullmatch(r"visual\.stem\.\d+\.weight", k))
            patch, stem = 2**n_convs, "conv"
        grid = int(round((pos.shape[0] - 1) ** 0.5))
        if grid * grid + 1 != pos.shape[0]:
            raise CosmosError(f"{name}: visual.positional_embedding {tuple(pos.shape)} is not 1 + a square grid")
        vision = VisionConfig(
            image_size=grid * patch, patch_size=patch, width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=max(1, width // VISION_HEAD_WIDTH.get(width, 64)),
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width, stem=stem,
        )
        t_width = sd["token_embedding.weight"].shape[1]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
            width=t_width, layers=_count_blocks(sd, "transformer.resblocks."), heads=max(1, t_width // 64),
            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width,
        )
        embed_dim = sd["visual.proj"].shape[1]
    except KeyError as e:
        raise CosmosError(f"{name}: not a CLIP/COSMOS state dict (no tensor {e.args[0]!r})") from None
    cosmos = any(is_cosmos_extra(k) for k in sd)
    heads = 8
    if "visual.attn_cross_pool.attn.in_proj_weight" in sd:
        heads = max(1, embed_dim // 64)
    return CosmosConfig(embed_dim, vision, text, quick_gelu=quick_gelu, cosmos=cosmos, cross_pool_heads=heads)


def load_state(model: CosmosModel, sd: dict[str, torch.Tensor], name: str, assign: bool = False) -> None:
    """Strict load with an error that names missing, unexpected and mis-shaped keys.

    assign=True makes the file's tensors the model's parameters (for a model built on the meta device); keep it off
    for a model an optimizer already holds.
    """
    sd = dict(sd)
    for key in ("logit_scale", "distill_logit_scale"):  # OpenCLIP has saved both [] and [1]
        if key in sd and sd[key].dim() == 1 and sd[key].numel() == 1:
            sd[key] = sd[key].reshape(())
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbrev(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_abbrev(shapes)} (file vs model)")
    if problems:
        raise CosmosError(f"{name}: does not fit the model: " + "; ".join(problems))
    if assign:  # floating tensors become float32: a file saved in half precision loads as fp32
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)


def _abbrev(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def resolve_weights(weights: str | Path, progress: ProgressFn | None = None) -> Path:
    """A path as given, the shipped model's name, or a released name downloaded into the cache."""
    if not str(weights).strip():
        raise CosmosError(f"--weights is empty; give a checkpoint file, {SHIPPED_NAME} (the shipped model) or a "
                          f"released name ({', '.join(RELEASED)})")
    path = Path(weights).expanduser()
    if path.exists():
        return path
    if str(weights) == SHIPPED_NAME:
        from .paths import find_shipped

        return find_shipped(SHIPPED_FILE)
    if str(weights) in RELEASED:
        return download(str(weights), progress=progress)
    raise CosmosError(
        f"{weights}: no such file, and not a known checkpoint name (known: {SHIPPED_NAME}, {', '.join(RELEASED)})"
    )


def load_model(
    weights: str | Path,
    device: str | torch.device | None = None,
    which: str = "teacher",
    quick_gelu: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[CosmosModel, dict]:
    """The model in eval mode on `device`, and the checkpoint's metadata (tokenizer state, labels, epoch ...)."""
    from .device import resolve_device

    target = resolve_device(device)  # a bad device is refused before anything is read or downloaded
    path = resolve_weights(weights, progress)
    try:
        obj = read_checkpoint(path)
    except CosmosError as e:
        if str(weights) in RELEASED and not Path(weights).exists():  # a damaged file in the download cache
            raise CosmosError(f"{e}; delete {path} to download it again") from None
        raise
    sd, meta = split_checkpoint(obj, which, str(path))
    if isinstance(meta.get("config"), dict):
        config = CosmosConfig.from_dict(meta["config"])
        config.quick_gelu = config.quick_gelu or quick_gelu
    else:
        config = infer_config(sd, quick_gelu=quick_gelu, name=str(path))
    if not any(is_cosmos_extra(k) for k in sd):
        config.cosmos = False  # a plain CLIP file (or a teacher saved without extras) loads into the CLIP part
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = CosmosModel(config)
    load_state(model, sd, str(path), assign=True)
    labels = meta.get("labels")
    model.labels = list(labels) if labels else None
    model.templates = meta.get("templates") if isinstance(meta.get("templates"), (str, list)) else None
    return model.to(target).eval(), meta


def save(
    path: str | Path,
    model: CosmosModel,
    tokenizer=None,
    labels: list[str] | None = None,
    teacher: CosmosModel | None = None,
    extra: dict | None = None,
) -> Path:
    """Write our checkpoint format atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "student": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items()} if teacher is not None else None,
        "tokenizer": tokenizer.state_dict() if tokenizer is not None else None,
        "labels": list(labels) if labels else (model.labels or None),
    }
    obj.update(extra or {})
    return _atomic_torch_save(obj, path)


def load(
    weights: str | Path,
    device: str | torch.device | None = None,
    which: str = "teacher",
    quick_gelu: bool = False,
    progress: ProgressFn | None = None,
):
    """(model, preprocess, tokenizer): the counterpart of `open_clip.create_model_and_transforms`.

    weights: a checkpoint path of any accepted flavour, or a released name such as "cosmos_vitb16_merged30m".
    which: "teacher" (default: COSMOS evaluates its teacher) or "student", for files that hold both.
    """
    from .tokenizer import Tokenizer
    from .transforms import eval_transform

    model, meta = load_model(weights, device, which, quick_gelu, progress)
    tok_state = meta.get("tokenizer")
    tokenizer = Tokenizer.from_state_dict(tok_state) if tok_state else Tokenizer.clip()
    if tokenizer.vocab_size != model.config.text.vocab_size:
        raise CosmosError(
            f"{weights}: the tokenizer has {tokenizer.vocab_size} ids but the text tower expects "
            f"{model.config.text.vocab_size}; the checkpoint needs its own tokenizer (a 'tokenizer' entry)"
        )
    if tokenizer.context_length != model.context_length:
        tokenizer = copy.copy(tokenizer)  # never change the shared CLIP instance
        tokenizer.context_length = model.context_length
    return model, eval_transform(model.image_size), tokenizer


# --- export -------------------------------------------------------------------------------------------------------
def _atomic_torch_save(obj: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def openclip_name(config: CosmosConfig) -> str:
    """The `open_clip.create_model` name of a config (ViT-B-16, ViT-B-32, with -quickgelu), or, for any other size,
    the JSON of the `open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)` arguments."""
    from .model.cosmos import CONFIGS

    for name in ("ViT-B-16", "ViT-B-32"):
        ref = CONFIGS[name]
        if (config.embed_dim, config.vision, config.text) == (ref.embed_dim, ref.vision, ref.text):
            return name + ("-quickgelu" if config.quick_gelu else "")
    v, t = config.vision, config.text
    import json

    return json.dumps({
        "embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu,
        "vision_cfg": {"layers": v.layers, "width": v.width, "head_width": v.width // v.heads,
                       "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size, "image_size": v.image_size},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
    })


def export_openclip(weights: str | Path, out: str | Path, which: str = "teacher",
                    quick_gelu: bool = False) -> tuple[str, bool]:
    """Write the CLIP state dict OpenCLIP loads with strict=True; returns (model name or CLIP kwargs JSON, QuickGELU)."""
    model, _ = load_model(weights, "cpu", which, quick_gelu)
    if model.config.vision.stem != "patch":
        raise CosmosError(f"{weights}: this model has a convolutional stem (the tiny config), which OpenCLIP's ViT "
                          "does not have; it can only be used with cosmos (export it with --format cosmos)")
    sd = {k: v.detach().clone() for k, v in model.clip_state_dict().items()}
    _atomic_torch_save(sd, out)
    return openclip_name(model.config), model.config.quick_gelu


def export_cosmos(weights: str | Path, out: str | Path) -> Path:
    """Write the released COSMOS layout {"epoch", "student", "teacher"} (both with the 21 COSMOS tensors; a teacher
    saved without them, as ours are, gets the student's, as the official teacher is a full copy)."""
    path = resolve_weights(weights)
    obj = read_checkpoint(path)
    try:
        student, meta = split_checkpoint(obj, "student", str(path))
    except CosmosError:
        raise CosmosError(f"{weights}: has no student weights; the COSMOS layout needs a trained COSMOS student "
                          "(export a CLIP model with --format openclip)") from None
    if not any(is_cosmos_extra(k) for k in student):
        raise CosmosError(f"{weights}: a CLIP model without COSMOS's cross-attention poolers; export it with "
                          "--format openclip")
    teacher = dict(obj.get("teacher") or student)
    teacher = {k[len("module."):] if k.startswith("module.") else k: v for k, v in teacher.items()}
    for key, value in student.items():
        if is_cosmos_extra(key) and key not in teacher:
            teacher[key] = value
    epoch = meta.get("epoch", 0)  # the official code resumes from "epoch": never a step count here
    return _atomic_torch_save({"epoch": epoch, "student": dict(student), "teacher": teacher}, out)
