"""Pixels → the network's input: the one normalisation, (x / 255 − mean) / std, for training, evaluation and export.

The data's mean and std (conf/data) are per channel. The formula is computed as x · scale + shift, with scale and
shift computed once in float64 and rounded once to float32; on one float copy of the uint8 images, in place: on a
CPU a new batch-sized tensor costs more than the arithmetic, and the formula as written makes three.
"""

import torch


def scale_and_shift(mean: list[float], std: list[float], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 − mean) / std as x · scale + shift: two 1×C×1×1 float32 tensors (computed in float64 on the CPU:
    an MPS device has no float64)."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    return tuple(t.float().to(device) for t in (1 / (255 * std), -mean / std))


def normalise(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 images N×C×H×W → float32 network input, normalised per channel."""
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)
