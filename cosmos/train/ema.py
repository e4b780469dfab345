"""The EMA teacher (paper section 3.2): a CLIP copy of the student that sees only the global views.

teacher <- m * teacher + (1 - m) * student, over every tensor the teacher has, once per step, right AFTER the
optimizer step (so the teacher follows the weights that step produced). The official code updates between
backward() and optimizer.step(), which makes its teacher lag one step behind (COSMOS_METHOD.md quirk 1); the
difference is one step of a momentum-0.99+ average.

- Momentum: fixed, as in every released run (0.999 at a global batch of about 1k, 0.99 at 4k); optionally DINO's
  cosine ramp from m to 1.0 over training (`ramp=True`).
- The teacher holds only what it uses: the two towers and `logit_scale`, no cross-attention poolers or token
  mappings (the official teacher is a full copy, quirk 6). It is never wrapped in DDP, never gets gradients, and
  stays in float32 whatever precision the student computes in, so small updates are not rounded away.
"""
from __future__ import annotations

import copy
import math

import torch

from ..model.cosmos import CosmosModel


def default_momentum(global_batch: int) -> float:
    """The official momenta: 0.999 at a global batch of 1,024 (CC3M), 0.99 at 4,096 (the larger data sets)."""
    return 0.999 if global_batch < 2048 else 0.99


class Teacher:
    """Holds the EMA model (`self.model`) and updates it from a student with `update(student, step)`."""

    def __init__(self, student: CosmosModel, momentum: float, total_steps: int = 0, ramp: bool = False):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        config = copy.deepcopy(student.config)
        config.cosmos = False  # no poolers, token mappings or distill_logit_scale
        with torch.device("meta"):
            model = CosmosModel(config)
        sd = {k: v.detach().float().clone() for k, v in student.clip_state_dict().items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.labels = student.labels
        self.model = model.requires_grad_(False).eval()
        self.momentum, self.total_steps, self.ramp = float(momentum), int(total_steps), bool(ramp)
        names = dict(self.model.named_parameters())
        self._names = list(names)  # the student tensors the teacher follows, by name
        self._params = list(names.values())

    def momentum_at(self, step: int) -> float:
        """m, or with the ramp DINO's schedule 1 - (1 - m) * (cos(pi * step / total) + 1) / 2."""
        if not self.ramp or self.total_steps <= 0:
            return self.momentum
        progress = min(1.0, step / self.total_steps)
        return 1.0 - (1.0 - self.momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update(self, student: CosmosModel, step: int) -> float:
        """One EMA step from the student's current weights; returns the momentum used."""
        m = self.momentum_at(step)
        source = dict(student.named_parameters())
        student_params = [source[name].detach().float() for name in self._names]
        torch._foreach_mul_(self._params, m)
        torch._foreach_add_(self._params, student_params, alpha=1.0 - m)
        return m

    def to(self, device) -> "Teacher":
        self.model.to(device)
        self._params = [p for _, p in self.model.named_parameters()]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(sd[name])

    @torch.no_grad()
    def encode(self, global_crops: torch.Tensor, global_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's targets: global crops [B, Vg, 3, G, G] and global captions [B, G, ctx] -> normalized
        float32 "image" [Vg, B, E] and "text" [G, B, E] (view-major, as the student's)."""
        b, vg = global_crops.shape[:2]
        image = self.model.encode_image(global_crops.transpose(0, 1).reshape(vg * b, *global_crops.shape[2:]))
        g = global_text.shape[1]
        ids = global_text.transpose(0, 1).reshape(g * b, -1)  # [G*B, ctx]
        text = self.model.encode_text_bucketed(ids, keep=0)[0]  # length buckets, as the student's captions
        return {"image": torch.nn.functional.normalize(image.float().view(vg, b, -1), dim=-1),
                "text": torch.nn.functional.normalize(text.float().view(g, b, -1), dim=-1)}
