"""Size presets of the benchmark suite: one place decides how big every case is.

"gpu" holds the real model sizes (they fill an H100), "cpu" scales widths and batches down
so that anyone can run the report on a laptop, "smoke" is the tiny CI size where every case
runs once. Pick one with `--preset` or `SVDKERN_BENCH_PRESET`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preset:
    name: str
    width_div: int            # every channel / hidden width is divided by this
    image_side: int           # ResNet input side (224 on ImageNet)
    resnet_images: int        # images per batch of the ResNet training / inference cases
    layer_images: int         # images behind the ResNet layer cases' GEMM rows (B = N H W)
    resnet_blocks: tuple[int, int, int, int]
    vit_batch: int
    vit_tokens: int           # 196 patches for ViT-B/16 at 224
    gpt_batch: int
    gpt_seq: int
    depth: int                # transformer blocks
    vocab: int
    classes: int
    dtype: torch.dtype        # layer and training-step dtype (bf16 under autocast on GPU)
    compile_dynamic: bool     # one dynamic-shape graph instead of one graph per shape
    compile_backend: str      # "inductor"; the smoke run traces with "aot_eager" (no codegen)
    min_time_s: float         # CPU timing: measure each alternative for at least this long
    crossover_rows: int       # the dispatch-crossover sweep runs batches 16, 64, ... up to it

    def width(self, w: int) -> int:
        return max(1, w // self.width_div)


PRESETS = {
    "gpu": Preset("gpu", 1, 224, 32, 32, (3, 4, 6, 3), 64, 196, 16, 1024, 12, 50257, 1000,
                  torch.bfloat16, False, "inductor", 0.0, 65536),
    "cpu": Preset("cpu", 4, 64, 2, 16, (3, 4, 6, 3), 2, 64, 2, 64, 12, 2048, 100,
                  torch.float32, True, "inductor", 0.2, 4096),
    "smoke": Preset("smoke", 16, 32, 2, 1, (1, 1, 1, 1), 1, 16, 1, 16, 2, 256, 10,
                    torch.float32, True, "aot_eager", 0.0, 64),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preset_from_env(default: str = "smoke") -> Preset:
    """The preset the pytest suite runs (`SVDKERN_BENCH_PRESET`, smoke by default)."""
    name = os.environ.get("SVDKERN_BENCH_PRESET", default)
    if name not in PRESETS:
        raise ValueError(f"SVDKERN_BENCH_PRESET={name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]
