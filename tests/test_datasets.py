"""Every data set of conf/data/ from fixtures in its own on-disk format (MNIST's idx files, CIFAR-100's pickles,
SVHN's .mat, a folder of 50×40 JPEGs), through `data=…`: the network follows the data, one short epoch trains,
the normalisation is the data's, and a grey model predicts and exports."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cnnlab.data.sources import follow_the_data, load_dataset
from cnnlab.shapes import shape_table
from cnnlab.train import train
from tests.conftest import BOTH_WAYS, compose_config

PER_CLASS = {"train": 6, "test": 2}  # images per class and split: a few seconds an epoch


def pictures(count: int, classes: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of `shape` whose brightness follows their class (something to learn), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    brightness = (labels * (130 // classes)).astype(np.uint8).reshape(-1, *[1] * len(shape))
    images = rng.integers(0, 120, (count, *shape), dtype=np.uint8) + brightness
    return images, labels


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's idx format: a big-endian magic number (0x0803: unsigned bytes, 3 dimensions), the sizes, the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    header = np.array([0x0803, *images.shape], dtype=">i4").tobytes()
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
    header = np.array([0x0801, len(labels)], dtype=">i4").tobytes()
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.astype(np.uint8).tobytes())


def mnist_like(root: Path, folder: str) -> Path:
    """torchvision's MNIST (or FashionMNIST) layout: <root>/<folder>/raw/{train,t10k}-{images,labels}-idx?-ubyte."""
    for prefix, split, seed in (("train", "train", 0), ("t10k", "test", 1)):
        write_idx(root / folder / "raw", prefix, *pictures(10 * PER_CLASS[split], 10, (28, 28), seed))
    return root


def cifar100(root: Path) -> Path:
    """torchvision's CIFAR-100 layout: cifar-100-python/{train,test,meta}, pickled; rows are C×H×W, flattened."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, seed in (("train", 2), ("test", 3)):
        images, labels = pictures(100 * PER_CLASS[split] // 2, 100, (3, 32, 32), seed)
        entry = {"data": images.reshape(len(images), -1), "fine_labels": labels.tolist(),
                 "coarse_labels": [0] * len(labels)}  # fmt: skip
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i:02d}" for i in range(100)]}))
    return root


def svhn(root: Path) -> Path:
    """torchvision's SVHN files: {train,test}_32x32.mat, X as H×W×C×N, y as N×1 with 10 standing for the digit 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 4), ("test", 5)):
        images, labels = pictures(10 * PER_CLASS[split], 10, (32, 32, 3), seed)
        digits = np.where(labels == 0, 10, labels)[:, None]
        savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": digits})
    return root


def photo_folder(root: Path) -> Path:
    """Your own photos: three classes of 50×40 JPEGs (width × height), one grey, one 64×64 PNG among them."""
    for split, seed in (("train", 6), ("test", 7)):
        images, labels = pictures(3 * PER_CLASS[split], 3, (40, 50, 3), seed)
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / ["cats", "dogs", "owls"][label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    Image.fromarray(images[0]).convert("L").save(root / "train" / "cats" / "grey.jpg")
    Image.new("RGB", (64, 64), "white").save(root / "train" / "dogs" / "large.png")
    return root


@pytest.fixture
def accept_fixture_files(monkeypatch):
    """torchvision checks CIFAR-100's and SVHN's files against the md5 sums of the real ones, which fixtures cannot
    match; everything else is torchvision's own reading."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


# data=… → (fixture, the shape table's fc1, the classes' count, channels)
DATASETS = {
    "mnist": (lambda root: mnist_like(root, "MNIST"), "Linear(1600, 10)", 10, 1),
    "fashion_mnist": (lambda root: mnist_like(root, "FashionMNIST"), "Linear(1600, 10)", 10, 1),
    "cifar100": (cifar100, "Linear(2304, 100)", 100, 3),
    "svhn": (svhn, "Linear(2304, 10)", 10, 3),
    "folder": (photo_folder, "Linear(4096, 3)", 3, 3),  # 40×40: 38 → 19 → 16 → 8, 64 × 8 × 8
}


def overrides(name: str, root: Path, tmp_path: Path) -> list[str]:
    return [f"data={name}", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=0.2",
            "data.batch_size=16", "data.eval_batch_size=64", "trainer=cpu", "trainer.max_epochs=1",
            f"output_dir={tmp_path / 'run'}", "data.download=false"]  # fmt: skip


# The fast tier trains one grey set, one colour set and an image folder; the full tier every set.
@pytest.mark.parametrize(
    "name", [name if name in ("mnist", "svhn", "folder") else pytest.param(name, marks=pytest.mark.slow)
             for name in DATASETS]
)  # fmt: skip
def test_each_data_set_trains_an_epoch_with_the_network_following_it(name, tmp_path, accept_fixture_files):
    make, fc1, classes, channels = DATASETS[name]
    root = make(tmp_path / name)
    cfg = compose_config("train", overrides(name, root, tmp_path))
    follow_the_data(cfg)
    rows = {row.name: row for row in shape_table(instantiate(cfg.model))}
    assert rows["fc1"].layer == fc1 and rows["conv1"].shape_in[0] == channels

    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1 and metrics["epochs"] == 1
    assert len(metrics["confusion_matrix"]) == classes
    description = torch.load(metrics["best_checkpoint"], weights_only=True)["cnnlab"]
    arrays = load_dataset(name, root, False, tmp_path / "cache", cfg.data.image_size, cfg.data.channels)
    assert description["input_shape"][0] == channels and len(description["classes"]) == classes
    assert description["classes"] == arrays.classes
    assert description["run"]["data"]["name"] == name


def test_the_normalisation_is_computed_from_the_training_images(tmp_path):
    root = mnist_like(tmp_path / "mnist", "MNIST")
    cfg = compose_config("train", overrides("mnist", root, tmp_path))
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    arrays = load_dataset("mnist", root, False, tmp_path, 28, "L")
    train_images = arrays.train_images.astype(np.float64) / 255  # train + validation: the data set's training set
    assert datamodule.mean == pytest.approx([train_images.mean()], abs=1e-12)
    assert datamodule.std == pytest.approx([train_images.std()], abs=1e-12)
    cifar10 = compose_config("train", [])  # CIFAR-10's constants stay what the slides use
    assert list(cifar10.data.mean) == [0.4914, 0.4822, 0.4465] and list(cifar10.data.std) == [0.2470, 0.2435, 0.2616]


def test_an_rgb_data_sets_normalisation_is_per_channel(tmp_path, accept_fixture_files):
    root = svhn(tmp_path / "svhn")
    datamodule = instantiate(compose_config("train", overrides("svhn", root, tmp_path)).data, _convert_="all")
    datamodule.setup("fit")
    images = load_dataset("svhn", root, False, tmp_path, 32, "RGB").train_images.astype(np.float64) / 255
    assert datamodule.mean == pytest.approx(images.mean(axis=(0, 1, 2)).tolist(), abs=1e-12)
    assert datamodule.std == pytest.approx(images.std(axis=(0, 1, 2)).tolist(), abs=1e-12)


def test_a_folder_is_resized_to_its_most_common_size_and_converted(tmp_path):
    root = photo_folder(tmp_path / "photos")
    arrays = load_dataset("folder", root, False, tmp_path / "cache", None, "RGB")
    assert arrays.train_images.shape == (3 * PER_CLASS["train"] + 2, 40, 40, 3)  # the grey one and the large one too
    assert arrays.classes == ["cats", "dogs", "owls"]
    grey = load_dataset("folder", root, False, tmp_path / "cache", 20, "L")
    assert grey.train_images.shape[1:] == (20, 20, 1)
    expected = np.asarray(Image.open(root / "train" / "cats" / "000.jpg").convert("L").resize((20, 20), Image.BILINEAR))
    assert np.array_equal(grey.train_images[0, ..., 0], expected)  # the first cat, as PIL converts and resizes it


def test_grey_data_can_be_read_in_colour_and_colour_in_grey(tmp_path):
    root = mnist_like(tmp_path / "mnist", "MNIST")
    colour = load_dataset("mnist", root, False, tmp_path, 32, "RGB")
    assert colour.train_images.shape[1:] == (32, 32, 3)
    assert np.array_equal(colour.train_images[..., 0], colour.train_images[..., 2])  # grey in three channels
    cfg = compose_config("train", [*overrides("mnist", root, tmp_path), "data.channels=RGB", "data.image_size=32"])
    assert (cfg.model.in_channels, cfg.model.image_size) == (3, 32)  # the network follows


def test_digits_are_not_mirrored_by_augmentation():
    from cnnlab.data.datamodule import random_crop_flip

    images = torch.arange(2 * 64 * 8 * 8, dtype=torch.float32).reshape(64, 2, 8, 8)
    assert torch.equal(random_crop_flip(images, 0, flip=False), images)  # no crop, no flip: the images themselves
    assert not torch.equal(random_crop_flip(images, 0, flip=True), images)  # some of the 64 are mirrored
    for name in ("mnist", "svhn"):
        assert compose_config("train", [f"data={name}"]).data.flip is False


def test_a_hundred_classes_keep_the_confusion_matrix_readable():
    from cnnlab.pictures import confusion_figure, top_confusions

    classes = [f"c{i}" for i in range(100)]
    confusion = torch.eye(100, dtype=torch.long) * 5
    confusion[3, 7], confusion[8, 1], confusion[8, 2] = 4, 9, 1
    figure = confusion_figure(confusion, classes)
    assert not figure.axes[0].texts  # no numbers in 10,000 cells
    assert [c["true"] + ">" + c["predicted"] for c in top_confusions(confusion.tolist(), classes)] == [
        "c8>c1", "c3>c7", "c8>c2"]  # fmt: skip
    assert len(confusion_figure(torch.eye(10, dtype=torch.long), classes[:10]).axes[0].texts) == 100


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> Path:
    """A one-epoch MNIST model (1×28×28 input)."""
    tmp_path = tmp_path_factory.mktemp("grey")
    root = mnist_like(tmp_path / "mnist", "MNIST")
    return Path(train(compose_config("train", overrides("mnist", root, tmp_path)))["best_checkpoint"])


@pytest.mark.slow
def test_a_grey_model_predicts_exports_and_shows_its_filters(grey_model, tmp_path):
    from cnnlab.export import export_checked
    from cnnlab.predict import predict_files
    from cnnlab.visualize import visualize

    photo = tmp_path / "photo.png"
    Image.new("RGB", (60, 45), (200, 30, 30)).save(photo)  # a colour photo of another size: read as grey 28×28
    found = predict_files(compose_config("predict", [f"ckpt_path={grey_model}", f"inputs={photo}", "top_k=2"]))
    assert found.model.input_shape == (1, 28, 28) and len(found.top[0]) == 2
    for format in ("onnx", "pt2"):  # the parity check reads the model's own data (MNIST), as its checkpoint says
        output = tmp_path / f"grey.{format}"
        target, parity = export_checked(
            compose_config("export", [f"ckpt_path={grey_model}", f"format={format}", f"output={output}"])
        )
        assert parity.ok and parity.images == 20, str(parity)
        exported = predict_files(compose_config("predict", [f"ckpt_path={target}", f"inputs={photo}", "top_k=2"]))
        assert exported.top[0][0][0] == found.top[0][0][0]
    written = visualize(compose_config("visualize", [f"ckpt_path={grey_model}"]))
    assert [path.name for path in written] == ["filters.png", "activations.png"]


@pytest.mark.slow
def test_eval_scores_a_grey_model_on_its_own_data(grey_model, tmp_path):
    from cnnlab.evaluate import evaluate

    # The command names no data: the model's own (MNIST, where it was trained), as its checkpoint records it
    metrics = evaluate(compose_config("eval", [f"ckpt_path={grey_model}", f"output_dir={tmp_path / 'e'}"]))
    assert metrics["images"] == 20 and len(metrics["confusion_matrix"]) == 10
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]


@BOTH_WAYS
def test_the_shape_table_follows_the_data_on_the_command_line(run_script):
    done = run_script("shapes.py", "data=mnist")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1×28×28" in done.stdout and "Linear(1600, 10)" in done.stdout
