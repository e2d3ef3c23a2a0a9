"""Training-time forms of the slides' network, multiplied back into its layers after training.

Two levers give training more to learn with and leave nothing of themselves behind: each adds only linear maps
next to a convolution, which the convolution absorbs exactly once training is over. What is tested, saved,
exported and shown in the shape table is the slides' network, with its 56,778 parameters.
- model.expand (ExpandNets, Guo et al., NeurIPS 2020): conv2 trained as a (k−1)×(k−1) and a 2×2 convolution;
- model.batchnorm (folded as RepVGG folds its branches): a BatchNorm after conv1 and after conv2. In eval mode a
  BatchNorm is a fixed affine map per channel, y = γ · (x − mean) / √(var + ε) + β, with the mean and variance
  it tracked while training: the convolution before it takes it into its weights and bias.
A checkpoint keeps the training-time entries beside the contracted ones, for a resumed run to train on with.
"""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

BATCHNORM_EPS = 1e-5  # BatchNorm2d's ε: a state dict does not hold it, the folding needs it
FORMS = (("conv1", "norm1"), ("conv2", "norm2"))  # each convolution and the BatchNorm after it (model.batchnorm)


class ExpandedConv2d(nn.Sequential):
    """A k×k convolution trained as two with nothing between them (model.expand): a (k−1)×(k−1) convolution to
    `width` channels, then a 2×2 one. Two linear maps make one, so the pair computes exactly what one k×k
    convolution can; it only gives training more parameters to find it with.

    The padding is applied once, before the first; the stride is the second's: out = (in + 2·pad − k) / stride + 1,
    as for the one k×k convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, width: int):
        super().__init__(
            OrderedDict(
                first=nn.Conv2d(in_channels, width, kernel - 1, padding=padding),
                second=nn.Conv2d(width, out_channels, 2, stride=stride),
            )
        )
        self.stride, self.padding = stride, padding

    def contracted_shape(self) -> nn.Conv2d:
        """The one k×k convolution of the same shape, its weights still to be set (contract_state computes them)."""
        first, second = self.first, self.second
        conv = nn.Conv2d(first.in_channels, second.out_channels, first.kernel_size[0] + 1, stride=self.stride,
                         padding=self.padding)  # fmt: skip
        return conv.to(second.weight)


@torch.no_grad()
def contract(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The one convolution that a (k−1)×(k−1) convolution (w1, b1) followed by a 2×2 one (w2, b2) computes:
    y = w2 ⋆ (w1 ⋆ x + b1) + b2, so kernel[o, i, a + u, b + v] = Σ_m w2[o, m, a, b] · w1[m, i, u, v], and the first
    bias passes through the second kernel's sum: bias = b2 + Σ_m (Σ_ab w2[o, m, a, b]) · b1[m]. In float64."""
    dtype, device = w1.dtype, w1.device  # in float64 on the CPU (an Apple GPU has no float64)
    w1, b1, w2, b2 = (t.detach().cpu().double() for t in (w1, b1, w2, b2))
    inner = w1.shape[-1]
    kernel = w1.new_zeros(w2.shape[0], w1.shape[1], inner + 1, inner + 1)
    for a in range(2):
        for b in range(2):
            kernel[:, :, a : a + inner, b : b + inner] += torch.einsum("om,mihw->oihw", w2[:, :, a, b], w1)
    bias = b2 + w2.sum((2, 3)) @ b1
    return kernel.to(device, dtype), bias.to(device, dtype)


@torch.no_grad()
def fold(weight: torch.Tensor, bias: torch.Tensor, norm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution followed by an eval-mode BatchNorm → the one convolution: w' = w · s, b' = (b − mean) · s + β,
    with s = γ / √(var + ε) per output channel (torch's fuse_conv_bn_weights), in float64."""
    dtype, device = weight.dtype, weight.device
    double = {name: t.detach().cpu().double() for name, t in norm.items()}
    w, b = fuse_conv_bn_weights(weight.detach().cpu().double(), bias.detach().cpu().double(), double["running_mean"],
                                double["running_var"], BATCHNORM_EPS, double["weight"], double["bias"])  # fmt: skip
    return w.data.to(device, dtype), b.data.to(device, dtype)


def contract_state(state: dict, prefix: str = "net.") -> tuple[dict, dict]:
    """A state dict of a training-time form → (the slides' network's state dict, the training-time entries that it
    replaced: those of each layer that changed). The state dict of the slides' network itself is returned as it is."""

    def entries(layer: str) -> dict:  # the layer's own state dict
        start = f"{prefix}{layer}."
        return {key.removeprefix(start): value for key, value in state.items() if key.startswith(start)}

    contracted, replaced = dict(state), {}
    for conv, norm in FORMS:
        own, norm_state = entries(conv), entries(norm)
        if "first.weight" not in own and not norm_state:
            continue
        layers = (f"{prefix}{conv}.", f"{prefix}{norm}.")
        replaced.update({key: value for key, value in state.items() if key.startswith(layers)})
        contracted = {key: value for key, value in contracted.items() if not key.startswith(layers)}
        if "first.weight" in own:  # model.expand
            weight, bias = contract(own["first.weight"], own["first.bias"], own["second.weight"], own["second.bias"])
        else:
            weight, bias = own["weight"], own["bias"]
        if norm_state:  # model.batchnorm
            weight, bias = fold(weight, bias, norm_state)
        contracted[f"{prefix}{conv}.weight"], contracted[f"{prefix}{conv}.bias"] = weight, bias
    return contracted, replaced


def training_state(state: dict, replaced: dict, prefix: str = "net.") -> dict:
    """contract_state's inverse, for a resumed run that trains on in the training-time form: the layers that
    `replaced` holds entries of are taken from it."""
    layers = tuple({prefix + key[len(prefix) :].split(".")[0] + "." for key in replaced})
    if not layers:
        return state
    return {**{key: value for key, value in state.items() if not key.startswith(layers)}, **replaced}


def saved_training_form(checkpoint: dict) -> dict:
    """A checkpoint's training-time entries (under the name of the time when model.expand was the only form)."""
    return checkpoint.get("training_form", checkpoint.get("expanded_conv2", {}))


def form_overrides(replaced: dict, prefix: str = "net.") -> dict[str, str]:
    """The model.* settings a checkpoint's training-time entries were trained with, and the value that drops each."""
    overrides = {}
    if f"{prefix}conv2.first.weight" in replaced:
        overrides[f"model.expand={replaced[f'{prefix}conv2.first.weight'].shape[0]}"] = "model.expand=null"
    if any(key.startswith((f"{prefix}norm1.", f"{prefix}norm2.")) for key in replaced):
        overrides["model.batchnorm=true"] = "model.batchnorm=false"
    return overrides
