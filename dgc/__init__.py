"""dgc: Deep Gradient Compression for PyTorch DDP and Horovod, with static pruning and activation sparsity.

One line adds DGC to a DDP script::

    state = dgc.register(ddp_model, optimizer, dgc.DGCConfig(density=0.001))
    # or, by hand: ddp_model.register_comm_hook(dgc.DGCState(cfg, model.named_parameters()), dgc.ddp_comm_hook)
"""

from __future__ import annotations

import logging

from .agreement import RankMismatchError
from .compressor import CompressedTensor
from .config import DGCConfig
from .ddp_hook import ddp_comm_hook
from .errors import NonFiniteGradientError
from .optim import DGCSGD, check_optimizer, register
from .reshard import reshard_state_dicts
from .selection import Selection, topk_select
from .state import DGCState
from .stats import CompressionStats

__all__ = [
    "DGCSGD",
    "CompressedTensor",
    "CompressionStats",
    "DGCConfig",
    "DGCState",
    "NonFiniteGradientError",
    "RankMismatchError",
    "Selection",
    "check_optimizer",
    "ddp_comm_hook",
    "register",
    "reshard_state_dicts",
    "topk_select",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
