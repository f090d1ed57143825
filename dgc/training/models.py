"""The three models of the training launcher, small enough for a CPU and shaped like the paper's.

- :class:`CNN`: a small convolutional classifier for MNIST (28x28) or sklearn's digits (8x8).
- :class:`CharLSTM`: a 2-layer character-level LSTM language model, the paper's PTB model
  (Zaremba et al.'s recipe: embedding, stacked LSTM, dropout, linear decoder) scaled down.
- :class:`ResNet`: the CIFAR ResNet of He et al. (depth 6n+2, basic blocks) for 32x32 images.

Every model maps a batch of inputs to logits whose last dimension is the class (or vocabulary)
dimension, so one loss, ``cross_entropy(logits.flatten(0, -2), targets.flatten())``, serves all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CNN", "CharLSTM", "ResNet"]


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name} = {value!r} is invalid: it must be an integer >= 1.")


def _dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"model.dropout = {value!r} is invalid: it must be in [0, 1) (0 = off).")


class CNN(nn.Module):
    """Two 3x3 convolutions, each followed by ReLU and 2x2 max-pooling, then two linear layers.

    Args:
        num_classes: output classes.
        in_channels: image channels (1 for MNIST and digits).
        image_size: side of the square input image, divisible by 4 (28 for MNIST, 8 for digits).
        channels: output channels of the two convolutions.
        hidden: width of the hidden linear layer.
        dropout: dropout before each linear layer; 0 = off.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size), ("hidden", hidden)):
            _positive(name, value)
        _dropout(dropout)
        if image_size % 4:
            raise ValueError(f"model.image_size = {image_size} is invalid: the CNN pools twice, so "
                             "it must be divisible by 4 (28 for MNIST, 8 for digits).")
        c1, c2 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * side * side, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CharLSTM(nn.Module):
    """Character-level language model: embedding, a stacked LSTM, dropout, a linear decoder.

    Inputs are ``(batch, time)`` token ids; outputs ``(batch, time, vocab_size)`` logits of the
    next token.  Each batch starts from a zero hidden state (windows are shuffled).

    Args:
        vocab_size: number of token ids.
        embed_dim: embedding width.
        hidden: LSTM hidden width.
        num_layers: stacked LSTM layers.
        dropout: dropout on the embedding, between LSTM layers and before the decoder; 0 = off.
        bias: give the LSTM its bias vectors (PyTorch keeps two per layer, ``b_ih`` and
            ``b_hh``).  DGC sends 1-D tensors dense, so on a small model these biases cost
            more bytes than the compressed matrices; see docs/parity.md.
        init_range: weights of the embedding and the decoder start uniform in +-init_range
            (Zaremba et al. use 0.05 to 0.1).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 128,
        embed_dim: int = 64,
        hidden: int = 256,
        num_layers: int = 2,
        dropout: float = 0.1,
        bias: bool = True,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                            ("hidden", hidden), ("num_layers", num_layers)):
            _positive(name, value)
        _dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, bias=bias, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.drop(self.embedding(tokens)))
        return self.decoder(self.drop(out))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): depth 6n+2, three stages of n blocks.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        depth: 6n+2 (20, 32, 44, 56, 110).
        width: channels of the first stage (the others double it twice); 16 in the paper.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, depth: int = 20,
                 width: int = 16) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("width", width)):
            _positive(name, value)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model.depth = {depth!r} is invalid: it must be 6n+2 with n >= 1 "
                             "(20, 32, 44, 56, 110).")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))
