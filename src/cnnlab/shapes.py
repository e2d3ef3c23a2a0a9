"""The lecture's shape table (each layer's output size by the slides' formula, checked against PyTorch) and its quiz."""

from dataclasses import dataclass

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


def configured_network(cfg) -> nn.Sequential:
    """The network of a shapes config (conf/shapes.yaml: data + model), checked, sized for its data (data=folder:
    the tree is read for its image size and classes): what src/shapes.py and cnnlab.api.shape_table show."""
    from hydra.utils import instantiate

    from cnnlab.checks import check
    from cnnlab.data.sources import follow_the_data

    check(cfg, builds=("model",))  # the data is read, not built: no Lightning
    follow_the_data(cfg)
    net = instantiate(cfg.model)
    net.contract()  # model.expand, model.batchnorm: training-time forms; what is tested and saved is the slides' net
    return net


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
