"""Building the config's ``_target_`` nodes with errors that name the config key."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dgc.training.communication import Allreduce, Communication
from dgc.training.runtime import Runtime

__all__ = ["build", "build_communication", "build_runtime"]


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a failure becomes a ``ValueError`` or
    ``TypeError`` that names ``key`` (e.g. ``compress``) and the underlying cause."""
    if node is None:
        raise ValueError(f"the config has no {key!r} node: add {key}=<option> (see conf/{key}/).")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        msg = str(cause).strip()
        if isinstance(cause, TypeError) and "unexpected keyword argument" in msg:
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            raise TypeError(f"{key}: {msg} (the keys of conf/{key}/ options are the arguments "
                            f"of {target}; check the spelling)") from e
        raise (TypeError if isinstance(cause, TypeError) else ValueError)(
            f"{key}: {msg}") from e


def build_communication(node: DictConfig | None) -> Communication:
    """The ``compress`` option's :class:`Communication`; no node = plain allreduce."""
    if node is None:
        return Allreduce()
    comm = build(node, "compress")
    if not isinstance(comm, Communication):
        raise TypeError(f"compress._target_ = {OmegaConf.select(node, '_target_')} built a "
                        f"{type(comm).__name__}, not a dgc.training.communication.Communication.")
    return comm


def build_runtime(node: DictConfig | None) -> Runtime:
    """The ``dist`` option's :class:`~dgc.training.runtime.Runtime` (DDP or Horovod)."""
    runtime = build(node, "dist")
    if not isinstance(runtime, Runtime):
        raise TypeError(f"dist._target_ = {OmegaConf.select(node, '_target_')} built a "
                        f"{type(runtime).__name__}, which lacks the methods of "
                        "dgc.training.runtime.Runtime (init, wrap, synchronize, ...).")
    return runtime
