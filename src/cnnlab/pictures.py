"""Pictures of what the network learned: the first layer's filters and the activation maps, as the lecture shows them,
and the test's confusion matrix, readable for 10 classes or 100.

The grids are what cnnlab.inside_view.InsideView logs to TensorBoard while training; `filters_figure` and
`activations_figure` are the same pictures as labelled matplotlib figures for a checkpoint (src/visualize.py).
Imports torch only (no Lightning).
"""

import torch
from torch import nn


def conv_blocks(net: nn.Sequential, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The maps after each conv block (conv · ReLU · pool), for normalised B×C×H×W images."""
    maps, x = [], images
    for name, layer in net.named_children():
        x = layer(x)
        if name.startswith("pool"):
            maps.append((f"after {name}", x.float()))
    return maps


def scale_each(maps: torch.Tensor) -> torch.Tensor:
    """Each map (over its last two dimensions) stretched to 0–1, so that its pattern shows whatever its range."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-8)


def scaled_filters(net: nn.Sequential) -> torch.Tensor:
    """conv1's weights, out × in_channels × k × k, each filter stretched to 0–1 over all its values (its colours
    keep their balance)."""
    weight = net.conv1.weight.detach().float().cpu()
    low = weight.amin(dim=(1, 2, 3), keepdim=True)
    high = weight.amax(dim=(1, 2, 3), keepdim=True)
    return (weight - low) / (high - low).clamp(min=1e-8)


def filter_grid(net: nn.Sequential, pixels: int = 8) -> torch.Tensor:
    """The first conv layer's filters as one RGB image: each out_channel's in_channels × k × k kernel, scaled."""
    from torchvision.utils import make_grid

    kernels = nn.functional.interpolate(scaled_filters(net), scale_factor=pixels, mode="nearest")
    return make_grid(kernels, nrow=8, padding=2, pad_value=1.0)


def map_grid(maps: torch.Tensor, height: int = 30) -> torch.Tensor:
    """B images × C maps → one grey image, a row per image; each map scaled to 0–1 and enlarged."""
    batch, channels = maps.shape[:2]
    return enlarged_grid(scale_each(maps).reshape(batch * channels, 1, *maps.shape[2:]), channels, height)


def map_input_grid(images: torch.Tensor, height: int = 48) -> torch.Tensor:
    """uint8 B×C×H×W images → one image, in a row."""
    return enlarged_grid(images.float() / 255, len(images), height)


def enlarged_grid(tiles: torch.Tensor, per_row: int, height: int) -> torch.Tensor:
    """Tiles (values 0–1) enlarged by a whole factor to about `height` pixels, in rows of `per_row`."""
    from torchvision.utils import make_grid

    scale = max(1, height // tiles.shape[-1])
    enlarged = nn.functional.interpolate(tiles.cpu(), scale_factor=scale, mode="nearest")
    return make_grid(enlarged, nrow=per_row, padding=1, pad_value=1.0)


def filters_figure(net: nn.Sequential):
    """The first layer's filters, labelled by channel, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = scaled_filters(net)  # out × 3 × k × k
    count = len(kernels)
    columns = 8
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.25 + 0.6))
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(as_picture(kernels[index]), cmap="gray", interpolation="nearest")
            axis.set_title(f"channel {index}", fontsize=7)
    channels, k = kernels.shape[1], kernels.shape[-1]
    colours = "RGB" if channels == 3 else "grey" if channels == 1 else "first channel"
    figure.suptitle(f"conv1: {count} filters of {channels}×{k}×{k} ({colours}, each filter scaled to its own range)",
                    fontsize=10)  # fmt: skip
    figure.tight_layout()
    return figure


def activations_figure(net: nn.Sequential, images: torch.Tensor, inputs: torch.Tensor, names: list[str], maps=8):
    """For each image (uint8 C×H×W in `images`, normalised in `inputs`): the image and the first `maps` maps after
    each conv block, labelled by layer and channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        blocks = conv_blocks(net, inputs)
    columns = 1 + maps * len(blocks)
    figure, axes = plt.subplots(len(images), columns, figsize=(columns * 0.9, len(images) * 1.0 + 0.6), squeeze=False)
    for row, (image, name) in enumerate(zip(images, names, strict=True)):
        axes[row, 0].imshow(as_picture(image), cmap="gray")
        axes[row, 0].set_ylabel(name, fontsize=7)
        for b, (block, values) in enumerate(blocks):
            scaled = scale_each(values[row])
            for c in range(min(maps, len(scaled))):
                axis = axes[row, 1 + b * maps + c]
                axis.imshow(scaled[c].numpy(), cmap="viridis", interpolation="nearest")
                if row == 0:
                    axis.set_title(f"{block.removeprefix('after ')}\nch {c}", fontsize=6)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("input, then the first maps after each conv block (conv · ReLU · pool), each scaled", fontsize=9)
    figure.tight_layout()
    return figure


def as_picture(tile: torch.Tensor):
    """C×H×W → what matplotlib shows: H×W×3 for colour, H×W (drawn grey) for one channel (or the first of others)."""
    return tile.permute(1, 2, 0).numpy() if tile.shape[0] == 3 else tile[0].numpy()


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """The confusion matrix (rows: true class, columns: predicted) as torchmetrics draws it, with a count in each
    cell for up to 20 classes; for more (CIFAR-100) the colours alone, larger, and top_confusions as numbers."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    many = len(classes) > 20
    figure, axes = MulticlassConfusionMatrix(len(classes)).plot(confusion, labels=classes, add_text=not many)
    if many:
        axes.tick_params(labelsize=5)
    figure.set_size_inches(16 if many else 8, 16 if many else 8)
    return figure


def top_confusions(confusion: list[list[int]], classes: list[str], count: int = 10) -> list[dict]:
    """The most frequent mistakes, most first: {"true", "predicted", "images"} (a table that stays readable when
    the matrix has 10,000 cells)."""
    cells = [(n, t, p) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n > 0]
    return [{"true": classes[t], "predicted": classes[p], "images": n}
            for n, t, p in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:count]]  # fmt: skip
