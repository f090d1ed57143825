"""Static weight pruning: masks as buffers, kept exactly zero, never sent by DGC.

- Granularities (one per file): ``Unstructured`` (layer/global), ``Block``,
  ``BankBalanced``, ``NM`` (2:4), ``Channel``.
- Schedules: ``OneShot``, ``AGP`` (Zhu & Gupta's cubic).
- ``Pruner``: owns the masks and enforces them through optimizer and DGC.
- ``build_pruner``: the Hydra builder of the ``prune`` config group.
- ``layer_sensitivity``: per-layer accuracy under pruning.

The end-of-training report of all three sparsities is ``dgc.sparsity_report``.
"""

from dgc.pruning.bank_balanced import BankBalanced
from dgc.pruning.block import Block
from dgc.pruning.build import build_pruner
from dgc.pruning.channel import Channel
from dgc.pruning.granularity import Granularity, LayerwiseGranularity
from dgc.pruning.nm import NM
from dgc.pruning.pruner import MASK_SUFFIX, Pruner, unwrap_model
from dgc.pruning.schedule import AGP, OneShot, Schedule
from dgc.pruning.sensitivity import SensitivityResult, layer_sensitivity
from dgc.pruning.unstructured import Unstructured

__all__ = [
    "AGP",
    "MASK_SUFFIX",
    "NM",
    "BankBalanced",
    "Block",
    "Channel",
    "Granularity",
    "LayerwiseGranularity",
    "OneShot",
    "Pruner",
    "Schedule",
    "SensitivityResult",
    "Unstructured",
    "build_pruner",
    "layer_sensitivity",
    "unwrap_model",
]
