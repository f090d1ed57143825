#!/usr/bin/env python3
"""Data-parallel training with optional gradient compression, configured by Hydra (conf/).

    torchrun --standalone --nproc_per_node=2 launch/train.py +compress=dgc     # DGC, 2 ranks
    torchrun --standalone --nproc_per_node=2 launch/train.py                   # dense baseline
    torchrun --standalone --nproc_per_node=2 launch/train.py experiment=char_lstm +compress=dgc
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 --master_addr=HOST --master_port=29500 \\
        launch/train.py +compress=dgc                                           # several machines
    horovodrun -np 2 python launch/train.py +compress=dgc dist=horovod
    python launch/train.py train.max_steps=20                                   # one process

Options: +compress=dgc|topk|fp16|powersgd, model=cnn|char_lstm|resnet,
data=mnist|digits|stdlib_text|synthetic, optim=sgd|adam, scheduler=cosine|constant,
logger=jsonl|wandb, dist=ddp|horovod, +prune=..., +act=..., train.max_steps=N,
train.precision=32|bf16|fp16, train.compile=true, train.resume=PATH.  See docs/training.md.
A run writes its resolved config to <run folder>/config.yaml; `--cfg job` prints it without training.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from dgc.training import format_summary, register_configs, train


def _rank() -> int:
    for var in ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


# Only rank 0 writes Hydra's output folder (.hydra/, train.log): the other ranks would create
# their own, with another timestamp when the clock ticks between their starts.
if _rank() != 0:
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none",
                 "hydra/hydra_logging=none", "hydra.run.dir=."]

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    if _rank() == 0:
        print(format_summary(summary), flush=True)
    return summary.get("test_accuracy")


if __name__ == "__main__":
    main()
