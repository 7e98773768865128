"""Small reference networks for the training CLI: an MLP, a small CNN, the CIFAR-style
ResNet-20/56 of He et al. (option A shortcut: identity, subsampled and zero-padded where
the shape changes, so every conv of the network is a 3x3 conv that SVD training can
factorize, as in the official SVD-training and TRP code) and a character-level LSTM
language model (the official code's word-level LSTM, at character level)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MODELS = ("mlp", "cnn", "resnet20", "resnet56", "lstm")
IMAGE_MODELS = MODELS[:4]


class MLP(nn.Module):
    """Flattened input -> two hidden ReLU layers -> classes."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    """Three 3x3 conv + BN + ReLU stages (one 2x2 max-pool), global average pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        chans = (in_channels, width, 2 * width, 2 * width)
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)
                                   for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[1:])
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i == 0:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; option-A shortcut (stride-2 subsampling, zero channel padding)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16/32/64 channels, n blocks per stage."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class CharLSTM(nn.Module):
    """Embedding -> 2-layer LSTM -> linear decoder over the vocabulary: next-token logits
    (N, T, vocab) for token sequences (N, T). Each sequence starts from a zero state."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.lstm(self.embed(tokens))[0])


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The named model for inputs of shape (channels, height, width), or (tokens,) for the
    language model (`num_classes` then is the vocabulary)."""
    if (name == "lstm") != (len(input_shape) == 1):
        raise ValueError(f"model {name!r} does not fit inputs of shape {tuple(input_shape)}: "
                         f"lstm reads text (--data text), {', '.join(IMAGE_MODELS)} read "
                         "images (--data digits or cifar10)")
    if name == "lstm":
        return CharLSTM(num_classes)
    c, h, w = input_shape
    if name == "mlp":
        return MLP(c * h * w, num_classes)
    if name == "cnn":
        return SmallCNN(c, num_classes)
    if name in ("resnet20", "resnet56"):
        return CifarResNet(int(name[6:]), c, num_classes)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
