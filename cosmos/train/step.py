"""One training step: views -> student (through DDP) and teacher -> the objective -> gradients.

The student's forward goes through the module DDP wraps (`StudentForward`, whose forward is
`CosmosModel.forward_train`), so DDP sees every parameter the loss uses, the temperatures included, and all-reduces
their gradients. Calling the bare model's methods instead would bypass DDP and leave the ranks' gradients apart.

Gradient accumulation is exact for the contrastive loss (the GradCache idea, Gao et al. 2021, as OpenCLIP's
`accum_freq`): with `accum` micro-batches the step first computes every micro-batch's features without a graph,
then the loss over ALL of them (N = accum x B samples per process) and its gradient with respect to the features,
then re-runs each micro-batch with its graph and back-propagates that slice of the feature gradient. The result
equals one step on the whole batch (same loss, same gradients), with the activation memory of one micro-batch.
The official code has no accumulation (quirk 4).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..device import autocast
from ..model.cosmos import CosmosModel
from .ema import Teacher
from .loss import LossConfig, cosmos_loss

FEATURES = ("image", "text", "h_image", "h_text")  # per-view outputs of forward_train
SCALES = ("logit_scale", "distill_logit_scale")


class StudentForward(nn.Module):
    """What DDP wraps: forward(global_crops, global_text, local_crops, local_text) = student.forward_train(...)."""

    def __init__(self, model: CosmosModel, cross: tuple[str, ...], text_padding_mask: bool = True):
        super().__init__()
        self.model = model
        self.cross = cross
        self.text_padding_mask = text_padding_mask

    def forward(self, global_crops: torch.Tensor, global_text: torch.Tensor, local_crops: torch.Tensor | None = None,
                local_text: torch.Tensor | None = None):
        return self.model.forward_train(global_crops, global_text, local_crops, local_text, self.cross,
                                        self.text_padding_mask)


def unused_extras(model: CosmosModel, cfg: LossConfig) -> list[str]:
    """Prefixes of the COSMOS extras the objective does not use (frozen, so DDP does not wait for their gradients)."""
    if not model.config.cosmos:
        return []
    unused = []
    cross = cfg.cross()
    if "image" not in cross:  # h_I: C^T over mapped text tokens
        unused += ["text_attn_cross_pool.", "text_token_mapping."]
    if "text" not in cross:  # h_T: C^I over mapped image tokens
        unused += ["visual.attn_cross_pool.", "image_token_mapping."]
    if not cfg.distills:
        unused.append("distill_logit_scale")
    return unused


@dataclass
class Batch:
    """One optimizer step's inputs, sample-major as collated: global_crops [B, Vg, 3, G, G], global_text
    [B, G, ctx], local_crops [B, Vl, 3, L, L] or None, local_text [B, Lt, ctx] or None."""

    global_crops: torch.Tensor
    global_text: torch.Tensor
    local_crops: torch.Tensor | None = None
    local_text: torch.Tensor | None = None

    @classmethod
    def from_views(cls, views: dict, device: torch.device, use_local: bool) -> "Batch":
        def move(t):
            return t.to(device, non_blocking=True)

        local_text = views.get("local_text")
        local_text = move(local_text) if local_text is not None and local_text.shape[1] else None
        local = views.get("local_crops")
        local = move(local) if use_local and local is not None and local.shape[1] else None
        return cls(move(views["global_crops"]), move(views["global_text"]), local, local_text)

    def inputs(self) -> tuple:
        """The student forward's arguments."""
        return self.global_crops, self.global_text, self.local_crops, self.local_text

    def __len__(self) -> int:
        return self.global_crops.shape[0]

    def split(self, parts: int) -> list["Batch"]:
        size = -(-len(self) // parts)
        out = []
        for start in range(0, len(self), size):
            part = slice(start, start + size)
            out.append(Batch(*(t[part] if t is not None else None for t in self.inputs())))
        return out


class TrainStep:
    """forward + loss + backward for one optimizer step (the caller steps the optimizer and the teacher).

    forward: the StudentForward (DDP-wrapped or not); teacher: the EMA teacher for cosmos mode, else None.
    scaler: a torch.amp.GradScaler for fp16, or None. Returns the loss parts as floats (this rank's values)."""

    def __init__(self, forward: nn.Module, teacher: Teacher | None, loss_cfg: LossConfig, device: torch.device,
                 precision: str = "fp32", scaler=None):
        self.forward = forward
        self.bare = forward.module if hasattr(forward, "no_sync") else forward  # the StudentForward itself
        self.teacher = teacher
        self.loss_cfg = loss_cfg
        self.device = device
        self.precision = precision
        self.scaler = scaler

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return autocast(self.device, self.precision)

    def _teacher(self, batch: Batch) -> dict | None:
        if self.teacher is None or not self.loss_cfg.distills:
            return None
        with torch.no_grad(), self._autocast():
            return self.teacher.encode(batch.global_crops, batch.global_text)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self, batch: Batch, accum: int = 1) -> dict[str, float]:
        n_global = batch.global_crops.shape[1]
        if accum <= 1:
            with self._autocast():
                student = self.forward(*batch.inputs())
            parts = cosmos_loss(student, self._teacher(batch), self.loss_cfg, n_global)
            self._backward(parts["loss"])
            return {k: float(v.detach()) for k, v in parts.items()}
        return self._accumulated(batch, accum, n_global)

    def _accumulated(self, batch: Batch, accum: int, n_global: int) -> dict[str, float]:
        micro = batch.split(accum)
        # 1. Features of every micro-batch, without a graph.
        cached, targets = [], []
        with torch.no_grad():
            for part in micro:
                with self._autocast():
                    cached.append(self.bare(*part.inputs()))
                targets.append(self._teacher(part))
        features = {k: torch.cat([c[k] for c in cached], dim=1).detach().requires_grad_()
                    for k in FEATURES if k in cached[0]}  # [V, accum*B, E]
        scales = {k: cached[0][k].detach().requires_grad_() for k in SCALES if k in cached[0]}
        teacher = None
        if targets[0] is not None:
            teacher = {k: torch.cat([t[k] for t in targets], dim=1) for k in targets[0]}
        # 2. The loss over the whole batch and its gradient with respect to the features and the temperatures.
        parts = cosmos_loss({**features, **scales}, teacher, self.loss_cfg, n_global)
        self._backward(parts["loss"])
        # 3. Each micro-batch again, with its graph, back-propagating its slice of the feature gradients (the
        #    temperatures' gradients once). DDP all-reduces on the last micro-batch only.
        start = 0
        for i, part in enumerate(micro):
            stop = start + len(part)
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") else self.forward.no_sync()
            with sync:
                with self._autocast():
                    out = self.forward(*part.inputs())
                tensors, grads = [], []
                for k, leaf in features.items():
                    tensors.append(out[k])
                    grads.append(leaf.grad[:, start:stop])
                for k, leaf in scales.items():
                    tensors.append(out[k])
                    grads.append(leaf.grad if i == 0 else torch.zeros_like(leaf.grad))
                torch.autograd.backward(tensors, grads)
            start = stop
        return {k: float(v.detach()) for k, v in parts.items()}
