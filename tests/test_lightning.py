"""dgc.lightning.DGCStrategy on 2 real CPU (gloo) processes: DGC runs, logs, refuses a second momentum,
and a run resumed from a Lightning checkpoint equals the straight run bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from _dist import run_distributed  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import dgc  # noqa: E402
import dgc.lightning  # noqa: E402

STEPS_PER_EPOCH = 4  # 64 samples, 2 ranks, batch 8


class _Net(pl.LightningModule):
    def __init__(self, seed: int, momentum: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.momentum = momentum

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


class _Recorder(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _config() -> dgc.DGCConfig:
    # net.0.weight (2048 elements) is compressed at 5% after 2 dense steps; the rest goes dense.
    return dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=2, min_compress_numel=1024)


def _trainer(root: str, epochs: int, strategy: Any, logger: Any = False, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=logger,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **kw,
    )


def _result(model: _Net, strategy: Any) -> dict[str, Any]:
    state = strategy.dgc_state
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "dgc": state.state_dict(),
        "step": state.step,
    }


def _straight_and_resumed(rank: int, world: int, root: str) -> dict[str, Any]:
    os.environ["LOCAL_RANK"] = str(rank)  # Lightning: the processes exist already
    out: dict[str, Any] = {}
    # 1. Two epochs straight, logged.
    model, strategy, rec = _Net(seed=0), dgc.lightning.DGCStrategy(_config()), _Recorder()
    trainer = _trainer(root, 2, strategy, logger=rec)
    trainer.fit(model, _data())
    out["straight"] = _result(model, strategy)
    out["stats"] = strategy.dgc_state.stats.to_dict()
    out["logged"] = rec.metrics
    # 2. One epoch, checkpoint, a fresh model (other weights) resumed from it for the second epoch.
    ckpt = os.path.join(root, "one_epoch.ckpt")
    model, strategy = _Net(seed=0), dgc.lightning.DGCStrategy(_config())
    trainer = _trainer(root, 1, strategy)
    trainer.fit(model, _data())
    out["residual_at_checkpoint"] = strategy.dgc_state.state_dict()["net.0.weight"]["residual"]
    trainer.save_checkpoint(ckpt)
    model, strategy = _Net(seed=123), dgc.lightning.DGCStrategy(_config())
    _trainer(root, 2, strategy).fit(model, _data(), ckpt_path=ckpt)
    out["resumed"] = _result(model, strategy)
    # 3. The same resume from a checkpoint without the DGC states: must not be exact.
    if rank == 0:
        saved = torch.load(ckpt, weights_only=False)
        out["saved_ranks"] = [s["rank"] for s in saved[dgc.lightning.CHECKPOINT_KEY]]
        del saved[dgc.lightning.CHECKPOINT_KEY]
        torch.save(saved, ckpt + ".nodgc")
    torch.distributed.barrier()
    model, strategy = _Net(seed=123), dgc.lightning.DGCStrategy(_config())
    _trainer(root, 2, strategy).fit(model, _data(), ckpt_path=ckpt + ".nodgc")
    out["resumed_without_dgc"] = _result(model, strategy)
    return out


def _refusals(rank: int, world: int, root: str) -> list[str]:
    os.environ["LOCAL_RANK"] = str(rank)
    errors = []
    for cfg, opt_momentum in ((_config(), 0.9), (dgc.DGCConfig(weight_decay=1e-4), 0.0)):
        model = _Net(seed=0, momentum=opt_momentum)
        if cfg.weight_decay:
            model.configure_optimizers = lambda m=model: torch.optim.SGD(
                m.parameters(), lr=0.1, weight_decay=1e-4)
        try:
            _trainer(root, 1, dgc.lightning.DGCStrategy(cfg)).fit(model, _data())
        except ValueError as exc:
            errors.append(str(exc))
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("lightning"))
    return run_distributed(_straight_and_resumed, 2, root, timeout=280)


def test_dgc_runs_on_cpu_and_logs_its_traffic(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert r["straight"]["step"] == 2 * STEPS_PER_EPOCH  # one communication step per batch
        stats = r["stats"]
        assert stats["sparse_buckets"] >= 1
        assert 0 < stats["bytes_sent"] < stats["dense_bytes"] / 2
    # The two ranks agree on the model (DGC averaged the same sparse sums on both).
    for name, p in runs[0]["straight"]["params"].items():
        assert torch.equal(p, runs[1]["straight"]["params"][name]), name
    logged = [m for m in runs[0]["logged"] if "dgc/bytes_sent" in m]
    assert len(logged) == 2 * STEPS_PER_EPOCH
    assert logged[0]["dgc/density"] == 1.0  # the dense steps
    assert logged[-1]["dgc/density"] == pytest.approx(0.05)
    assert logged[-1]["dgc/compression_ratio"] > 2
    assert logged[-1]["dgc/bytes_sent"] == runs[0]["stats"]["bytes_sent"]


def test_resume_from_checkpoint_is_exact(runs: list[dict[str, Any]]) -> None:
    assert runs[0]["saved_ranks"] == [0, 1]  # every rank's own state, in rank order
    residuals = [r["residual_at_checkpoint"] for r in runs]
    assert residuals[0].abs().sum() > 0 and not torch.equal(*residuals)  # per-rank, not trivial
    for r in runs:
        straight, resumed = r["straight"], r["resumed"]
        assert resumed["step"] == straight["step"]
        for name, p in straight["params"].items():
            assert torch.equal(resumed["params"][name], p), name
        for name, entry in straight["dgc"].items():
            if isinstance(entry, dict) and "residual" in entry:
                assert torch.equal(resumed["dgc"][name]["residual"], entry["residual"]), name
                assert torch.equal(resumed["dgc"][name]["momentum"], entry["momentum"]), name
        # Without the saved residuals and momenta the run differs: the test can see a lost state.
        lost = r["resumed_without_dgc"]["params"]["net.0.weight"]
        assert not torch.equal(lost, straight["params"]["net.0.weight"])


def test_refuses_second_momentum_and_second_weight_decay(tmp_path: Path) -> None:
    errors = run_distributed(_refusals, 2, str(tmp_path), timeout=200)
    for rank_errors in errors:
        assert len(rank_errors) == 2
        assert "momentum would be applied twice" in rank_errors[0]
        assert "weight decay would be applied twice" in rank_errors[1]


def test_rejects_other_hooks_and_non_config() -> None:
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        dgc.lightning.DGCStrategy(dgc.DGCConfig(), ddp_comm_hook=dgc.ddp_comm_hook)
    with pytest.raises(TypeError, match="DGCConfig"):
        dgc.lightning.DGCStrategy({"density": 0.001})  # type: ignore[arg-type]


def test_import_dgc_does_not_import_lightning() -> None:
    code = "import sys, dgc; assert 'lightning' not in sys.modules, 'lightning imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr



def test_fp16_with_grad_scaler_needs_nonfinite_propagate() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    def strategy(nonfinite: str) -> dgc.lightning.DGCStrategy:
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        return dgc.lightning.DGCStrategy(dgc.DGCConfig(nonfinite=nonfinite), precision_plugin=plugin)

    with pytest.raises(ValueError, match="nonfinite='propagate'"):
        strategy("raise")._check_precision()
    strategy("propagate")._check_precision()
