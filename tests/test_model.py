import pytest
import torch

from cnnlab import UserError, make
from cnnlab.model import SlideCNN, conv_output_size
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [
        (7, 3, 1, 0, 5),  # the lecture's quiz
        (7, 3, 2, 0, 3),  # the lecture's quiz
        (32, 3, 1, 1, 32),  # "same" padding keeps the size
        (30, 2, 2, 0, 15),  # a 2×2 pool halves
        (15, 2, 2, 0, 7),  # odd sizes round down, as PyTorch does
    ],
)
def test_output_size_formula(size, kernel, stride, padding, expected):
    assert conv_output_size(size, kernel, stride, padding) == expected
    # ... and it is what PyTorch computes.
    conv = torch.nn.Conv2d(1, 1, kernel, stride=stride, padding=padding)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == expected


def slide_cnn(*overrides: str) -> SlideCNN:
    return make(compose_config("train", list(overrides)).model)


def test_slide_network_shapes_and_parameters():
    net = slide_cnn()
    assert sum(p.numel() for p in net.parameters()) == 56_778
    shapes, x = {}, torch.zeros(2, 3, 32, 32)
    for name, layer in net.named_children():
        x = layer(x)
        shapes[name] = tuple(x.shape[1:])
    assert shapes["conv1"] == (32, 30, 30)
    assert shapes["pool1"] == (32, 15, 15)
    assert shapes["conv2"] == (64, 12, 12)
    assert shapes["pool2"] == (64, 6, 6)
    assert shapes["flatten"] == (2304,)
    assert shapes["fc1"] == (10,)
    assert net.fc1.in_features == 64 * 6 * 6


def test_fc1_input_follows_the_config():
    net = slide_cnn("model.padding=1", "model.pool=avg", "model.conv1_channels=8")
    # conv1: 32 → 32, pool: 16, conv2 (k4, pad 1): 15, pool: 7
    assert net.fc1.in_features == 64 * 7 * 7
    assert isinstance(net.pool1, torch.nn.AvgPool2d)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_shapes_that_do_not_fit_are_refused_naming_the_layer():
    with pytest.raises(UserError, match=r"conv2 \(kernel 20.*15×15"):
        slide_cnn("model.conv2_kernel=20")
    with pytest.raises(UserError, match="conv1"):
        slide_cnn("model.image_size=2")


def test_unknown_pool_is_refused():
    with pytest.raises(UserError, match="model.pool='min'"):
        slide_cnn("model.pool=min")


def test_channels_last_is_the_same_network_in_another_memory_layout():
    torch.manual_seed(0)
    plain = slide_cnn().eval()
    fast = slide_cnn("model.channels_last=true").eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-5)
