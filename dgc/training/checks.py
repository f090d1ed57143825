"""Checks the loop runs before it trains: does the model take the data, does a checkpoint fit."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dgc.training.communication import Communication
from dgc.training.data import Data

__all__ = ["check_pairing", "check_resume"]

log = logging.getLogger(__name__)

# Keys that may differ between a run and the run it resumes (everything else draws a warning).
_RESUME_MAY_DIFFER = ("train.resume", "train.max_steps", "train.out_dir", "train.checkpoint",
                      "train.num_threads", "logger", "hydra")


def check_pairing(model: nn.Module, data: Data) -> None:
    """One forward pass on two training samples: a model/data mismatch fails here, clearly."""
    x = data.train.inputs[:2]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(x)
            model.train(was)
    except Exception as e:
        raise ValueError(f"model {type(model).__name__} cannot take the inputs of data "
                         f"{data.name} (shape {tuple(x.shape)}, {x.dtype}): {e}. Pick a matching "
                         "pair, e.g. experiment=char_lstm, or model=cnn data=digits.") from e
    classes = int(data.train.targets.max()) + 1
    if out.shape[:-1] != data.train.targets[:2].shape or out.shape[-1] < classes:
        raise ValueError(f"model {type(model).__name__} outputs shape {tuple(out.shape)} for "
                         f"targets of shape {tuple(data.train.targets[:2].shape)} with {classes} "
                         "classes: check model.num_classes / model.vocab_size.")


def check_resume(cfg: DictConfig, common: dict[str, Any], model: nn.Module,
                 comm: Communication) -> None:
    """Refuse a checkpoint of another model or compress option; warn about changed settings."""
    saved = {k: tuple(v.shape) for k, v in common["model"].items()}
    live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved != live:
        diff = sorted(k for k in saved.keys() | live.keys() if saved.get(k) != live.get(k))
        raise ValueError(
            "train.resume: the checkpoint holds another model (differs in "
            f"{', '.join(f'{k}: {saved.get(k)} vs {live.get(k)}' for k in diff[:4])}). Resume with "
            "the model (and prune/act) config the checkpoint was written with."
        )
    if common["comm"] != comm.name:
        raise ValueError(
            f"train.resume: the checkpoint was written with compress={common['comm']} and this "
            f"run has compress={comm.name}; resume with the same +compress option."
        )
    before = _flatten(OmegaConf.to_container(OmegaConf.create(common["config"])))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(_RESUME_MAY_DIFFER))
    if changed:
        log.warning("train.resume: these settings differ from the checkpoint's run, so the "
                    "continuation is not exact: %s", ", ".join(changed))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}
