"""The model stacks the whole-model cases run, built here from their published shapes (no
downloads): a ResNet-50-like CNN, a ViT-B/16-like encoder and a GPT-2-small-like decoder,
scaled by a preset. Each comes with a batch maker and a task loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import Preset

MODELS = ("resnet50", "vit_b16", "gpt2")


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand, shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet50_like(p: Preset) -> nn.Module:
    w = p.width
    layers: list[nn.Module] = [nn.Conv2d(3, w(64), 7, 2, 3, bias=False), nn.BatchNorm2d(w(64)),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = w(64)
    for stage, blocks in enumerate(p.resnet_blocks):
        width = w(64 * 2 ** stage)
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 4 * width, 2 if b == 0 and stage > 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, p.classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm transformer block: qkv and output projections, 4x MLP with GELU."""

    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """ViT-B/16-like (patch embedding, bidirectional, mean-pooled class head) or
    GPT-2-like (token embedding, causal, language-model head), 768 wide, 12 heads."""

    def __init__(self, p: Preset, kind: str) -> None:
        super().__init__()
        d, heads = p.width(768), max(1, 12 // p.width_div)
        tokens = p.vit_tokens if kind == "vit_b16" else p.gpt_seq
        self.kind = kind
        self.embed = nn.Linear(768, d) if kind == "vit_b16" else nn.Embedding(p.vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, d))
        self.blocks = nn.Sequential(*(Block(d, heads, kind == "gpt2") for _ in range(p.depth)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, p.classes if kind == "vit_b16" else p.vocab,
                              bias=kind == "vit_b16")

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.blocks(self.embed(x) + self.pos))
        return self.head(h.mean(1) if self.kind == "vit_b16" else h)


def build(name: str, p: Preset) -> nn.Module:
    if name == "resnet50":
        return resnet50_like(p)
    if name in ("vit_b16", "gpt2"):
        return Transformer(p, name)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def batch(name: str, p: Preset, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input, target) of one training batch: images and labels, patches (16x16x3 = 768
    values each) and labels, or tokens and next tokens."""
    if name == "resnet50":
        x = torch.randn(p.resnet_images, 3, p.image_side, p.image_side, device=device)
        return x, torch.randint(p.classes, (p.resnet_images,), device=device)
    if name == "vit_b16":
        x = torch.randn(p.vit_batch, p.vit_tokens, 768, device=device)
        return x, torch.randint(p.classes, (p.vit_batch,), device=device)
    tokens = torch.randint(p.vocab, (p.gpt_batch, p.gpt_seq + 1), device=device)
    return tokens[:, :-1], tokens[:, 1:]


def task_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())

