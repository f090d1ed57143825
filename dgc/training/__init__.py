"""The training launcher's building blocks (``launch/train.py``, ``pip install -e .[train]``).

The loop (:func:`train`) is configured by Hydra (``conf/``); the components it builds from the
config each live in one file: :mod:`.models`, :mod:`.data`, :mod:`.batches`, :mod:`.communication`
(+ :mod:`.dgc_communication`, :mod:`.torch_hooks`), :mod:`.runtime` (+ :mod:`.horovod_runtime`),
:mod:`.schedule`, :mod:`.checkpoint`, :mod:`.rng`, :mod:`.metrics`, :mod:`.logger`,
:mod:`.summary`; :mod:`.schema` holds the structured config.  See docs/training.md.
"""

from dgc.training.loop import evaluate, train
from dgc.training.schema import CheckpointConfig, Config, TrainConfig, register_configs
from dgc.training.summary import format_summary

__all__ = [
    "CheckpointConfig",
    "Config",
    "TrainConfig",
    "evaluate",
    "format_summary",
    "register_configs",
    "train",
]
