"""The slides' CNN, sized for its data by the output-size formula; for CIFAR-10's 3×32×32 images, as in the slides:

input                 3×32×32
conv1 3→32, k3        32×30×30   (32 + 2·0 − 3) / 1 + 1 = 30
relu, pool 2          32×15×15
conv2 32→64, k4       64×12×12   (15 + 2·0 − 4) / 1 + 1 = 12
relu, pool 2          64×6×6
flatten, dropout 0.5  2304
fc1 2304→10           10 logits  (softmax only for probabilities: the loss takes logits)
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab import UserError


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """The lecture's formula: out = (in + 2·pad − kernel) / stride + 1, rounded down as PyTorch does.

    It holds for convolutions and for pooling (a pooling layer is a kernel with stride = kernel size).
    """
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class SizeStep:
    """One use of the formula: how a layer changed the spatial size, as the network was built from it."""

    layer: str
    size_in: int
    kernel: int
    stride: int
    padding: int
    size_out: int

    def working(self) -> str:
        """The formula with its numbers, e.g. (32 + 2·0 − 3) / 1 + 1 = 30; ⌊ ⌋ where PyTorch rounds down."""
        inner = f"({self.size_in} + 2·{self.padding} − {self.kernel}) / {self.stride}"
        exact = (self.size_in + 2 * self.padding - self.kernel) % self.stride == 0
        return f"{inner if exact else f'⌊{inner}⌋'} + 1 = {self.size_out}"


POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def size_steps(image_size: int, conv1_kernel: int, conv2_kernel: int, stride: int, padding: int,
               pool_size: int) -> list[SizeStep]:  # fmt: skip
    """Follow the spatial size through the network with the formula, layer by layer, so that fc1's input size is
    computed, never typed in; a config whose shapes don't fit is refused here (cnnlab.checks calls this too)."""
    size, steps = image_size, []
    for layer, kernel, kernel_key, layer_stride, layer_padding in [
        ("conv1", conv1_kernel, "model.conv1_kernel", stride, padding),
        ("pool1", pool_size, "model.pool_size", pool_size, 0),
        ("conv2", conv2_kernel, "model.conv2_kernel", stride, padding),
        ("pool2", pool_size, "model.pool_size", pool_size, 0),
    ]:
        out = conv_output_size(size, kernel, layer_stride, layer_padding)
        if out < 1:
            raise UserError(
                f"model: {layer} (kernel {kernel}, stride {layer_stride}, padding {layer_padding}) does not fit its "
                f"{size}×{size} input: (in + 2·pad − kernel) / stride + 1 = {out}. Use a smaller {kernel_key}, "
                f"model.stride or model.pool_size, more model.padding (e.g. model.padding=1), or larger images "
                f"(data.image_size, it is {image_size})."
            )
        steps.append(SizeStep(layer, size, kernel, layer_stride, layer_padding, out))
        size = out
    return steps


class SlideCNN(nn.Sequential):
    """conv · ReLU · pool · conv · ReLU · pool · dropout · fc, with every size taken from the config.

    The defaults of conf/model/slide_cnn.yaml give the slides' network: 56,778 parameters.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        conv1_channels: int,
        conv1_kernel: int,
        conv2_channels: int,
        conv2_kernel: int,
        stride: int,
        padding: int,
        pool: str,
        pool_size: int,
        dropout: float,
        channels_last: bool = False,
    ):
        if pool not in POOLS:
            raise UserError(f"model.pool={pool!r} is not a pooling layer: use one of {sorted(POOLS)}")
        steps = size_steps(image_size, conv1_kernel, conv2_kernel, stride, padding, pool_size)
        size = steps[-1].size_out
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, conv1_channels, conv1_kernel, stride=stride, padding=padding),
                relu1=nn.ReLU(),
                pool1=POOLS[pool](pool_size),
                conv2=nn.Conv2d(conv1_channels, conv2_channels, conv2_kernel, stride=stride, padding=padding),
                relu2=nn.ReLU(),
                pool2=POOLS[pool](pool_size),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc1=nn.Linear(conv2_channels * size * size, num_classes),
            )
        )
        self.input_shape = (in_channels, image_size, image_size)
        self.size_steps = steps  # what the shape table shows (cnnlab.shapes): one computation, not two
        # channels_last stores B×C×H×W tensors with the channels innermost (as B×H×W×C in memory): the same math,
        # and on CPUs the convolution kernels (oneDNN) run faster on it, most of all in bf16.
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return super().forward(images)
