"""See inside the network: the shape table against the lecture and against the built model, the quiz, the
TensorBoard pictures while training (read back with TensorBoard's own reader), the PNG files for a checkpoint."""

import io
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.shapes import quiz, shape_table
from cnnlab.train import train
from cnnlab.visualize import visualize
from tests.conftest import BOTH_WAYS, ROOT, Ran, compose_config, run_in_process


def table_for(*overrides: str):
    net = instantiate(compose_config("train", list(overrides)).model)
    return net, shape_table(net)


def shapes_cli(*args: str, run_script=run_in_process) -> Ran:
    return run_script("shapes.py", *args)


def test_the_default_table_is_the_lectures():
    _, rows = table_for()
    chain = [rows[0].shape_in] + [row.shape_out for row in rows]
    assert chain == [(3, 32, 32), (32, 30, 30), (32, 30, 30), (32, 15, 15), (64, 12, 12), (64, 12, 12), (64, 6, 6),
                     (2304,), (2304,), (10,)]  # fmt: skip
    working = {row.name: row.working for row in rows if row.working}
    assert working == {
        "conv1": "(32 + 2·0 − 3) / 1 + 1 = 30",
        "pool1": "(30 + 2·0 − 2) / 2 + 1 = 15",
        "conv2": "(15 + 2·0 − 4) / 1 + 1 = 12",
        "pool2": "(12 + 2·0 − 2) / 2 + 1 = 6",
    }
    assert sum(row.parameters for row in rows) == 56_778
    mult_adds = {row.name: row.mult_adds for row in rows if row.mult_adds}
    assert mult_adds == {"conv1": 32 * 30 * 30 * 3 * 3 * 3, "conv2": 64 * 12 * 12 * 32 * 4 * 4, "fc1": 2304 * 10}


@pytest.mark.parametrize(
    "overrides", [["model.stride=2"], ["model.padding=1"], ["model.pool=avg", "model.conv1_kernel=5"]]
)
def test_a_variant_table_is_what_the_built_model_produces(overrides):
    net, rows = table_for(*overrides)
    seen = {}
    for name, layer in net.named_children():

        def record(module, inputs, output, name=name) -> None:  # None: the output is left as it is
            seen[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))

        layer.register_forward_hook(record)
    net.eval()(torch.zeros(1, 3, 32, 32))
    assert {row.name: (row.shape_in, row.shape_out) for row in rows} == {
        n: tuple(map(tuple, s)) for n, s in seen.items()
    }
    assert {row.name: row.parameters for row in rows} == {
        n: sum(p.numel() for p in m.parameters()) for n, m in net.named_children()
    }


def test_the_quiz_of_the_lecture():
    assert quiz(7, 3, 1) == "in 7, kernel 3, stride 1, padding 0: (7 + 2·0 − 3) / 1 + 1 = 5"
    assert quiz(7, 3, 2) == "in 7, kernel 3, stride 2, padding 0: (7 + 2·0 − 3) / 2 + 1 = 3"
    assert quiz(8, 3, 2).endswith("⌊(8 + 2·0 − 3) / 2⌋ + 1 = 3")  # PyTorch rounds down
    assert quiz(2, 5).endswith("the kernel does not fit, no output")


@BOTH_WAYS
def test_the_command_line_table_and_quiz(run_script):
    table = shapes_cli("model.padding=1", run_script=run_script)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[2].split()[:5] == ["conv1", "Conv2d(3,", "32,", "3,", "padding=1)"]
    assert "(32 + 2·1 − 3) / 1 + 1 = 32" in lines[2] and lines[-1].split()[0] == "total"
    answer = shapes_cli("size=7", "kernel=3", "stride=2", run_script=run_script)
    assert answer.returncode == 0 and answer.stdout.strip().endswith("(7 + 2·0 − 3) / 2 + 1 = 3")
    wrong = shapes_cli("model.conv2_kernel=20", run_script=run_script)
    assert wrong.returncode == 1 and wrong.stderr.strip().startswith("error: model: conv2 (kernel 20")
    assert len(wrong.stderr.strip().splitlines()) == 1


def images_of(run, tag: str) -> list[Image.Image]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return [Image.open(io.BytesIO(event.encoded_image_string)) for event in events.Images(tag)]


def datamodule_of(overrides: list[str]):
    datamodule = instantiate(compose_config("train", overrides).data, _convert_="all")
    datamodule.setup("fit")
    return datamodule


def test_training_logs_filters_and_activation_maps_every_epoch(tiny_trained):
    _, run, tiny_overrides = tiny_trained  # 2 epochs
    filters = images_of(run, "view/conv1_filters")
    assert len(filters) == 2 and filters[0].mode == "RGB"
    assert filters[0].size == (8 * (24 + 2) + 2, 4 * (24 + 2) + 2)  # 32 filters of 3×3, ×8 pixels, 8 a row
    assert filters[0].tobytes() != filters[1].tobytes()  # they changed as the network learned
    (inputs, _) = images_of(run, "view/inputs")
    classes = len(set(datamodule_of(tiny_overrides).splits["val"][1].tolist()))  # the tiny split lacks one
    assert inputs.size == (classes * 33 + 1, 33 + 1)  # the first validation image of each class, in a row
    pool1 = images_of(run, "view/maps_pool1")
    assert pool1[0].size == (32 * 31 + 1, classes * 31 + 1)  # a row per image, 32 maps of 15×15 shown ×2
    pool2 = images_of(run, "view/maps_pool2")
    assert pool2[0].size == (64 * 31 + 1, classes * 31 + 1)  # 64 maps of 6×6 shown ×5
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    # TensorBoard sorts its groups by name: the pictures come after the learning rate, train/ and val/.
    assert all(tag > "val/\uffff" for tag in events.Tags()["images"] if not tag.startswith("test/"))


@pytest.mark.slow
def test_the_pictures_can_be_turned_off(tiny_overrides, tmp_path):
    train(compose_config("train", [*tiny_overrides, "callbacks.inside=null", "trainer.max_epochs=1"]))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert not [tag for tag in events.Tags()["images"] if tag.startswith("view/")]


@pytest.mark.slow
def test_visualize_writes_the_pictures_beside_the_checkpoint(tiny_overrides, tmp_path, tree_archive):
    best = train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1", "callbacks.inside=null"]))[
        "best_checkpoint"
    ]
    photo = tmp_path / "photo.png"
    Image.new("RGBA", (64, 48), (200, 30, 30, 255)).save(photo)
    data = [f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}"]
    folder = tmp_path / "run" / "checkpoints"
    done = subprocess.run(  # as a user runs it
        [sys.executable, str(ROOT / "src" / "visualize.py"), f"ckpt_path={best}", *data],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"wrote {folder / 'filters.png'}", f"wrote {folder / 'activations.png'}"]
    with Image.open(folder / "activations.png") as picture:
        assert picture.size[1] > 1000  # ten test images, one per class
    assert Image.open(folder / "filters.png").size[0] > 500
    # the same, for one image of the user's (in this process: a start-up costs seconds)
    written = visualize(compose_config("visualize", [f"ckpt_path={best}", *data, f"image={photo}"]))
    assert written == [folder / "filters.png", folder / "activations.png"]
    with Image.open(folder / "activations.png") as picture:
        assert picture.size[1] < 1000  # the one image given
