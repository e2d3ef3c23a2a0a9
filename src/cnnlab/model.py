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
from cnnlab.training_form import BATCHNORM_EPS, ExpandedConv2d, contract_state


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
INITS = ("default", "whitened")
WHITENING_EPS = 5e-4  # airbench's: keeps the scale of the faintest directions (λ → 0) finite


@torch.no_grad()
def whiten_(conv: nn.Conv2d, images: torch.Tensor, chunk: int = 500) -> None:
    """Whitened initialisation (airbench, Page's cifar10-fast): conv's filters become the principal directions of
    the image patches it sees, each scaled by 1/√(λ + ε), so its outputs start decorrelated with unit variance.

    `images` are normalised training images, N×C×H×W. Each k×k patch is a vector of C·k·k numbers (27 for conv1
    on colour images); the eigenvectors of their second-moment matrix, largest eigenvalue first, are the filters.
    Each one is paired with its negative, so that the ReLU after the layer keeps both signs: 32 filters take the
    16 strongest directions. Filters beyond 2·C·k·k keep their default initialisation; the biases start at 0.
    The patches are the images' own (with model.padding conv1 also sees border patches with zeros: not counted).
    """
    out_channels, in_channels, kh, kw = conv.weight.shape
    images = images.cpu()  # the sums in float64, which an Apple GPU (MPS) has not
    moment = torch.zeros(in_channels * kh * kw, in_channels * kh * kw, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):  # N×C×H'×W'×kh×kw → one C·kh·kw vector per position
        batch = images[start : start + chunk].float()
        patches = batch.unfold(2, kh, conv.stride[0]).unfold(3, kw, conv.stride[1])
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, in_channels * kh * kw)
        moment += (patches.T @ patches).double()  # float32 within a chunk (4× faster), float64 across them
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)  # ascending
    strongest = eigenvalues.argsort(descending=True)[: (out_channels + 1) // 2]
    filters = (eigenvectors[:, strongest] / (eigenvalues[strongest] + WHITENING_EPS).sqrt()).T  # one filter a row
    filters = torch.stack([filters, -filters], 1).reshape(-1, in_channels, kh, kw)[:out_channels]  # v1, −v1, v2, …
    conv.weight[: len(filters)] = filters.to(conv.weight)
    if conv.bias is not None:
        conv.bias.zero_()


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


def conv2_parameters(in_channels: int, out_channels: int, kernel: int, expand: int | None) -> int:
    """conv2's parameters as it trains: one k×k convolution, or (model.expand) a (k−1)×(k−1) and a 2×2 one."""
    if not expand:
        return out_channels * (in_channels * kernel * kernel + 1)
    return expand * (in_channels * (kernel - 1) ** 2 + 1) + out_channels * (expand * 4 + 1)


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
        init: str = "default",  # (defaults for checkpoints saved before these keys: conf/model has them all)
        conv1_frozen: bool = False,
        expand: int | None = None,
        batchnorm: bool = False,
    ):
        if pool not in POOLS:
            raise UserError(f"model.pool={pool!r} is not a pooling layer: use one of {sorted(POOLS)}")
        if expand and conv2_kernel < 2:
            raise UserError(f"model.expand={expand} trains conv2 as a (k−1)×(k−1) and a 2×2 convolution, which needs "
                            f"model.conv2_kernel ≥ 2 (it is {conv2_kernel}): leave model.expand=null")  # fmt: skip
        if init not in INITS:
            raise UserError(f"model.init={init!r} is not an initialisation: use one of {list(INITS)}")
        steps = size_steps(image_size, conv1_kernel, conv2_kernel, stride, padding, pool_size)
        size = steps[-1].size_out
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, conv1_channels, conv1_kernel, stride=stride, padding=padding),
                **({"norm1": nn.BatchNorm2d(conv1_channels, BATCHNORM_EPS)} if batchnorm else {}),
                relu1=nn.ReLU(),
                pool1=POOLS[pool](pool_size),
                conv2=nn.Conv2d(conv1_channels, conv2_channels, conv2_kernel, stride=stride, padding=padding)
                if not expand
                else ExpandedConv2d(conv1_channels, conv2_channels, conv2_kernel, stride, padding, expand),
                **({"norm2": nn.BatchNorm2d(conv2_channels, BATCHNORM_EPS)} if batchnorm else {}),
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
        self.init = init
        self.conv1.weight.requires_grad_(not conv1_frozen)  # frozen: conv1's filters stay as initialised

    @property
    def expanded(self) -> bool:
        """Whether conv2 is still in its training-time form (model.expand), not yet contracted."""
        return isinstance(self.conv2, ExpandedConv2d)

    @property
    def in_training_form(self) -> bool:
        """Whether the network still has its training-time layers (model.expand, model.batchnorm)."""
        return self.expanded or "norm1" in self._modules

    def contract(self) -> None:
        """The training-time form becomes the slides' network again (cnnlab.training_form): an expanded conv2 the
        one convolution it computes, each BatchNorm folded into the convolution before it (with the mean and
        variance it tracked: as in eval mode)."""
        if not self.in_training_form:
            return
        state, _ = contract_state(self.state_dict(), prefix="")
        if self.expanded:
            self.conv2 = self.conv2.contracted_shape()
        for norm in ("norm1", "norm2"):
            if norm in self._modules:
                delattr(self, norm)
        self.load_state_dict(state)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def initialise(self, train_images: torch.Tensor) -> None:
        """The initialisations that need the data, before training (LitClassifier.setup): model.init=whitened
        computes conv1's filters from a sample of normalised training images."""
        if self.init == "whitened":
            whiten_(self.conv1, train_images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return super().forward(images)
