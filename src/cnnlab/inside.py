"""See inside the network, as the lecture does: the shape table, the first layer's filters, activation maps.

Imports torch only (no Lightning), so that src/shapes.py answers in about two seconds.

- `shape_table(net)`: per layer its input and output shape, the output-size formula with its numbers (the
  `SizeStep`s the model was built from: one computation, not two), parameters and multiply-adds per image.
- the grids that `cnnlab.inside_view.InsideView` logs to TensorBoard while training;
- `filters_figure` / `activations_figure`: the same pictures as labelled matplotlib figures, for a checkpoint
  (src/visualize.py).
"""

from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.model import SizeStep, conv_output_size


@dataclass
class Row:
    name: str
    layer: str
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    working: str
    parameters: int
    mult_adds: int


def shape_table(net: nn.Sequential) -> list[Row]:
    """One row per layer, following a C×H×W image through `net` (a SlideCNN: it knows its input shape and the
    formula steps it was built from)."""
    steps: dict[str, SizeStep] = {step.layer: step for step in net.size_steps}
    shape = tuple(net.input_shape)
    rows = []
    for name, layer in net.named_children():
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            step = steps[name]
            channels = layer.out_channels if isinstance(layer, nn.Conv2d) else shape[0]
            out = (channels, step.size_out, step.size_out)
            working = step.working()
        elif isinstance(layer, nn.Flatten):
            out, working = (shape[0] * shape[1] * shape[2],), ""
        elif isinstance(layer, nn.Linear):
            out, working = (layer.out_features,), ""
        else:  # ReLU, Dropout: the shape goes through
            out, working = shape, ""
        parameters = sum(p.numel() for p in layer.parameters())
        if isinstance(layer, nn.Conv2d):  # each output value: in_channels × k × k multiply-adds
            mult_adds = out[0] * out[1] * out[2] * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            mult_adds = layer.in_features * layer.out_features
        else:
            mult_adds = 0
        rows.append(Row(name, describe(layer), shape, out, working, parameters, mult_adds))
        shape = out
    return rows


def describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        extra = "".join(
            f", {k}={v[0]}"
            for k, v in (("stride", layer.stride), ("padding", layer.padding))
            if v[0] != (1 if k == "stride" else 0)
        )
        return f"Conv2d({layer.in_channels}, {layer.out_channels}, {layer.kernel_size[0]}{extra})"
    if isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
        return f"{type(layer).__name__}({layer.kernel_size})"
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features}, {layer.out_features})"
    if isinstance(layer, nn.Dropout):
        return f"Dropout({layer.p})"
    return f"{type(layer).__name__}()"


def format_table(rows: list[Row]) -> str:
    def shape(s: tuple[int, ...]) -> str:
        return "×".join(map(str, s))

    header = ("layer", "", "input", "output", "output size: (in + 2·pad − kernel) / stride + 1", "params", "mult-adds")
    body = [(r.name, r.layer, shape(r.shape_in), shape(r.shape_out), r.working, f"{r.parameters:,}", f"{r.mult_adds:,}")
            for r in rows]  # fmt: skip
    total = ("total", "", "", "", "", f"{sum(r.parameters for r in rows):,}", f"{sum(r.mult_adds for r in rows):,}")
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(header))]
    right = {5, 6}  # numbers

    def line(cells) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, body), rule, line(total)])


def quiz(size: int, kernel: int, stride: int = 1, padding: int = 0) -> str:
    """The lecture's question: what size comes out of a layer? With the working."""
    out = conv_output_size(size, kernel, stride, padding)
    step = SizeStep("", size, kernel, stride, padding, out)
    answer = f"in {size}, kernel {kernel}, stride {stride}, padding {padding}: {step.working()}"
    return answer if out >= 1 else f"{answer}: the kernel does not fit, no output"


# ------------------------------------------------------------------------------------------ pictures


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
            axis.imshow(kernels[index].permute(1, 2, 0).numpy(), interpolation="nearest")
            axis.set_title(f"channel {index}", fontsize=7)
    k = kernels.shape[-1]
    figure.suptitle(f"conv1: {count} filters of 3×{k}×{k} (RGB, each filter scaled to its own range)", fontsize=10)
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
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
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


def visualize(cfg) -> list:
    """src/visualize.py: filters.png and activations.png beside the checkpoint; returns their paths."""
    from pathlib import Path

    import numpy as np

    from cnnlab import UserError, write_atomically
    from cnnlab.checks import check
    from cnnlab.inference import deployable_from_checkpoint, evaluation_set, read_images, resolve_model_path, trained_on
    from cnnlab.resume import load_checkpoint

    check(cfg)
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=... is required: python src/visualize.py ckpt_path=<checkpoint> [image=<file>]")
    path = resolve_model_path(str(cfg.ckpt_path), cfg.outputs_root)
    if path.suffix.lower() != ".ckpt":
        raise UserError(f"ckpt_path={path}: visualize reads a Lightning checkpoint (.ckpt)")
    model, description = deployable_from_checkpoint(load_checkpoint(path), path)
    size = tuple(description["input_shape"][1:])
    if cfg.get("image"):
        kept, images, skipped = read_images([Path(cfg.image).expanduser()], size)
        if not kept:
            raise UserError(f"image={cfg.image}: {skipped[0][1] if skipped else 'no such file'}")
        names = [Path(cfg.image).name]
    else:
        all_images, labels, classes = evaluation_set(cfg.data, description["classes"], size, trained_on(description))
        first = [int(np.flatnonzero(labels == c)[0]) for c in sorted(set(labels.tolist()))]
        images, names = all_images[first], [classes[labels[i]] for i in first]
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    inputs = (pixels.float() / 255 - model.mean) / model.std
    figures = {
        "filters.png": filters_figure(model.net),
        "activations.png": activations_figure(model.net, pixels, inputs, names, cfg.maps),
    }
    written = []
    for name, figure in figures.items():
        target = path.parent / name
        write_atomically(target, lambda file, figure=figure: figure.savefig(file, format="png", dpi=120))
        written.append(target)
    import matplotlib.pyplot as plt

    plt.close("all")
    return written
