"""Run under torchrun by tests/test_train.py: one COSMOS training step through DDP on 2 gloo processes, each with
its half of a fixed global batch; rank 0 saves the loss parts and the (all-reduced) gradients to argv[1]."""
import sys

import torch

from cosmos.model.cosmos import CosmosModel
from cosmos.train import distributed as D
from cosmos.train.loss import LossConfig
from cosmos.train.step import StudentForward, TrainStep
from tests.test_train_loss import perturbed_teacher, small_config, step_inputs


def main(out: str, accum: int) -> None:
    world = D.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = CosmosModel(small_config())
    teacher = perturbed_teacher(model)
    loss_cfg = LossConfig()
    forward = torch.nn.parallel.DistributedDataParallel(StudentForward(model, loss_cfg.cross()))
    batch = step_inputs(16)
    n = len(batch) // world.world_size
    mine = batch.split(world.world_size)[world.rank]
    assert len(mine) == n
    parts = TrainStep(forward, teacher, loss_cfg, torch.device("cpu"), "fp32")(mine, accum)
    reduced = {k: D.all_reduce_mean(v) for k, v in sorted(parts.items())}
    if world.is_main:
        torch.save({"parts": reduced, "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None}},
                   out)
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
