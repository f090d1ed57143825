"""Models whose parameters have the shapes of real networks, defined here (no torchvision, no downloads).

The bandwidth benchmark needs gradients laid out as a real model's: DDP buckets them by parameter
size and order, DGC compresses the tensors with ``ndim > 1`` and sends biases and norms dense, and
PowerSGD factorizes every matrix.  Each model is an ordinary ``nn.Module`` with a working
``forward``, so the benchmark can run the real forward/backward on a small batch, or skip it and
write synthetic gradients (:class:`SyntheticGradients`).

==========  ============  =======  ==================================================================
name        parameters    tensors  what
==========  ============  =======  ==================================================================
resnet50    25,557,032    161      ResNet-50 v1.5 (He et al. 2016; torchvision's layout and names):
                                   53 conv weights (no bias), 53 BatchNorm (weight, bias), fc.
vgg16       138,357,544   32       VGG-16 without BatchNorm (torchvision ``vgg16``): 13 conv + 3 fc.
lstm        51,034,000    10       The paper's PTB language model: 2-layer LSTM, 1500 hidden units,
                                   vocabulary 10,000, decoder tied to the embedding (194 MiB, as in
                                   the paper's "194 MB").
tiny        7,224         7        Two conv layers, BatchNorm and a linear layer, for tests.
==========  ============  =======  ==================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "LSTMLanguageModel",
    "ModelSpec",
    "ResNet50",
    "TinyNet",
    "VGG16",
    "build",
    "shape_summary",
    "SyntheticGradients",
    "make_batch",
    "real_loss",
]


# ---------------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's parameter names and shapes (25,557,032 parameters, 161 tensors)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------- VGG-16
class VGG16(nn.Module):
    """VGG-16 (configuration D, no BatchNorm) with torchvision's names: 138,357,544 parameters."""

    CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.CHANNELS:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(c), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(c)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------------------------------ LSTM LM
class LSTMLanguageModel(nn.Module):
    """The paper's language model (Zaremba et al.'s large PTB model, tied weights).

    Embedding ``vocab x hidden``, a ``layers``-layer LSTM, and a decoder whose weight *is* the
    embedding (one parameter, so DDP and DGC see it once) plus its own bias.
    """

    def __init__(self, vocab: int = 10_000, hidden: int = 1500, layers: int = 2) -> None:
        super().__init__()
        # PyTorch's word_language_model initialization: U(-0.1, 0.1) embedding, zero decoder bias.
        weight = torch.empty(vocab, hidden).uniform_(-0.1, 0.1)
        self.encoder = nn.Embedding(vocab, hidden, _weight=weight)
        self.rnn = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.zeros_(self.decoder.bias)
        self.decoder.weight = self.encoder.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.encoder(tokens))
        return self.decoder(out)


# ------------------------------------------------------------------------------------------- tiny
class TinyNet(nn.Module):
    """7,224 parameters: three compressed tensors (>= 1024 elements) and four dense ones."""

    def __init__(self, num_classes: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, padding=2, bias=False)  # 1200: compressed
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # 4608: compressed; bias dense
        self.bn = nn.BatchNorm2d(32)  # dense
        self.fc = nn.Linear(32, num_classes)  # 1280 with 40 classes: compressed; bias dense

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------ registry
@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    """A model of the benchmark: how to build it, what its parameters must total, how to feed it."""

    name: str
    build: Callable[[], nn.Module]
    params: int
    """Expected number of parameters (checked by the tests and by :func:`build`)."""
    tensors: int
    """Expected number of parameter tensors."""
    kind: str
    """"image" (input: batch x 3 x side x side, 1000 classes) or "tokens" (batch x sequence)."""
    classes: int
    """Number of output classes (image) or vocabulary size (tokens)."""
    description: str


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(
        name="resnet50", build=ResNet50, params=25_557_032, tensors=161, kind="image",
        classes=1000, description="ResNet-50 v1.5 (torchvision layout)",
    ),
    "vgg16": ModelSpec(
        name="vgg16", build=VGG16, params=138_357_544, tensors=32, kind="image", classes=1000,
        description="VGG-16 without BatchNorm (torchvision layout)",
    ),
    "lstm": ModelSpec(
        name="lstm", build=LSTMLanguageModel, params=51_034_000, tensors=10, kind="tokens",
        classes=10_000, description="2-layer LSTM LM, 1500 hidden, vocab 10k, tied (paper's PTB)",
    ),
    "tiny": ModelSpec(
        name="tiny", build=TinyNet, params=1200 + 4608 + 32 + 64 + 1280 + 40, tensors=7,
        kind="image", classes=40, description="tiny conv net for tests",
    ),
}


def build(name: str, *, seed: int = 0) -> nn.Module:
    """Build model ``name`` with parameters seeded identically on every rank, checking its size."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown: choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = spec.build()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total != spec.params or len(params) != spec.tensors:
        raise RuntimeError(
            f"model {name!r} has {total:,} parameters in {len(params)} tensors, expected "
            f"{spec.params:,} in {spec.tensors}: its definition in dgc/bench/grad_shapes.py is wrong"
        )
    return model


def make_batch(name: str, batch: int, *, side: int = 32, seq: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random input batch and targets for model ``name`` (images ``side`` x ``side``, or tokens)."""
    spec = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        x = torch.randn(batch, 3, side, side, generator=gen)
        y = torch.randint(spec.classes, (batch,), generator=gen)
    else:
        x = torch.randint(spec.classes, (batch, seq), generator=gen)
        y = torch.randint(spec.classes, (batch, seq), generator=gen)
    return x, y


def real_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the model's real forward pass."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class SyntheticGradients(nn.Module):
    """A cheap stand-in for a model's forward/backward: ``forward(scale)`` returns
    ``scale * sum_i <p_i, d_i>``, so the gradient of each parameter ``p_i`` is ``scale * d_i``
    (``directions``: fixed tensors, one per trainable parameter, e.g. random).

    Wrap *this* module in DDP (DDP only reduces gradients of a backward that followed its own
    forward).  The gradients arrive through autograd tensor by tensor, so DDP's buckets and hooks
    work exactly as in real training, for one multiply-add per element instead of the model's
    compute.  Parameter names get the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, directions: list[Tensor]) -> None:
        super().__init__()
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        if len(params) != len(directions) or any(
            p.shape != d.shape for p, d in zip(params, directions, strict=False)
        ):
            raise ValueError("directions must match the model's trainable parameters in shape")
        self._directions = directions  # a plain list: not buffers, so DDP never broadcasts them

    def forward(self, scale: float | Tensor = 1.0) -> Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return sum((p * d).sum() for p, d in zip(params, self._directions, strict=True)) * scale


def shape_summary(model: nn.Module) -> dict[str, int]:
    """Totals of a model's trainable parameters: all, those DGC compresses (``ndim > 1`` and at
    least ``min_numel`` elements, its defaults), and those that go dense."""
    params = [p for p in model.parameters() if p.requires_grad]
    compressed = [p for p in params if p.dim() > 1 and p.numel() >= 1024]
    return {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "compressed_params": sum(p.numel() for p in compressed),
        "compressed_tensors": len(compressed),
        "dense_params": sum(p.numel() for p in params) - sum(p.numel() for p in compressed),
        "dense_tensors": len(params) - len(compressed),
    }
