import re
import shutil
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import cnnlab.data.datamodule
import cnnlab.data.sources
import cnnlab.data.trees
from cnnlab import UserError
from cnnlab.data.batches import TensorBatches
from cnnlab.data.datamodule import random_crop_flip
from cnnlab.data.sources import load_dataset
from cnnlab.data.trees import Arrays, decode_image_tree, load_tree_cached
from tests.conftest import CLASSES, MARK_COL, MARK_ROW, compose_config, pack, write_image_tree


def load_cifar10(root, download, cache_dir):
    return load_dataset("cifar10", root, download, cache_dir, 32, "RGB")


def datamodule(root, cache_dir, *overrides):
    cfg = compose_config("train", [f"data.root={root}", f"data.cache_dir={cache_dir}", "data.val_size=20", *overrides])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm


def test_permute_puts_a_known_pixel_at_channel_row_column(tree_archive, tmp_path):
    dm = datamodule(tree_archive, tmp_path)
    images, labels = dm.splits["test"]
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)  # N×C×H×W
    first = images[0]  # class 0, first file: the marked one
    assert labels[0] == 0
    assert first[:, MARK_ROW, MARK_COL].tolist() == [255, 0, 0]  # red lands in channel 0 at [row, col]
    assert first[:, MARK_COL, MARK_ROW].tolist() != [255, 0, 0]  # and not transposed


def test_archive_zip_and_folder_give_the_same_arrays(image_tree, tree_archive, tmp_path):
    from_tar = load_cifar10(tree_archive, download=False, cache_dir=tmp_path / "a")
    from_zip = load_cifar10(pack(image_tree, tmp_path / "tree.zip"), download=False, cache_dir=tmp_path / "b")
    from_dir = load_cifar10(image_tree.parent, download=False, cache_dir=tmp_path / "c")  # one folder down
    assert from_tar.classes == CLASSES
    assert from_tar.train_images.shape == (80, 32, 32, 3)  # N×H×W×C before the permute
    assert from_tar.test_images.shape == (20, 32, 32, 3)
    assert np.bincount(from_tar.train_labels).tolist() == [8] * 10
    for other in (from_zip, from_dir):
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(getattr(from_tar, field), getattr(other, field))


def test_jpeg_tree_is_read(tmp_path):
    tree = write_image_tree(tmp_path / "jpeg", {"train": 2, "test": 1}, suffix=".jpg")
    arrays = load_cifar10(tree, download=False, cache_dir=tmp_path / "cache")
    assert arrays.train_images.shape == (20, 32, 32, 3) and arrays.test_labels.tolist() == list(range(10))


def test_decoded_once_then_loaded_from_the_cache(tree_archive, tmp_path, monkeypatch):
    first = load_cifar10(tree_archive, download=False, cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()  # one cache folder, no temp folder left
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{f}.npy" for f in first._fields[:4]] + ["classes.json"])

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cnnlab.data.trees, "decode_image_tree", no_decoding)
    again = load_cifar10(tree_archive, download=False, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.train_images, again.train_images)
    assert again.classes == CLASSES


def test_a_damaged_cache_is_named_in_the_error(tree_archive, tmp_path):
    load_cifar10(tree_archive, download=False, cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    (cache / "train_images.npy").write_bytes(b"not an array")
    with pytest.raises(UserError, match=f"{cache.name}: the decoded-image cache is damaged.*delete that folder"):
        load_cifar10(tree_archive, download=False, cache_dir=tmp_path)


def test_a_corrupt_image_leaves_no_cache(image_tree, tmp_path):
    broken = write_image_tree(tmp_path / "broken", {"train": 1, "test": 1})
    (broken / "train" / "cat" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot decode image .*cat/0000.png"):
        load_cifar10(pack(broken, tmp_path / "broken.tar.gz"), download=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_torchvision_official_format(torchvision_cifar, tmp_path):
    arrays = load_cifar10(torchvision_cifar, download=False, cache_dir=tmp_path / "unused")
    assert arrays.train_images.shape == (20, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_labels.tolist() == [0, 1, 2, 9]
    assert arrays.classes == CLASSES
    assert not (tmp_path / "unused").exists()  # nothing to decode, nothing cached


def test_nothing_found_says_what_was_looked_for(tmp_path):
    with pytest.raises(UserError, match=r"no CIFAR-10 found.*cifar-10-batches-py.*train/<class>.*download=true"):
        load_cifar10(tmp_path / "missing", download=False, cache_dir=tmp_path)


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"could not download torchvision's CIFAR-10.*no network"):
        load_cifar10(tmp_path / "empty", download=True, cache_dir=tmp_path)


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(UserError, match="not an archive"):
        load_cifar10(tmp_path / "data.csv", download=False, cache_dir=tmp_path)


def test_validation_split_does_not_depend_on_the_seed(tree_archive, tmp_path):
    torch.manual_seed(1)
    a = datamodule(tree_archive, tmp_path).splits["val"][0]
    torch.manual_seed(2)
    b = datamodule(tree_archive, tmp_path).splits["val"][0]
    assert torch.equal(a, b) and len(a) == 20
    with pytest.raises(UserError, match="data.val_size=80"):
        datamodule(tree_archive, tmp_path, "data.val_size=80")


def test_val_size_0_trains_on_every_training_image(tree_archive, tmp_path):
    dm = datamodule(tree_archive, tmp_path, "data.val_size=0")
    assert set(dm.splits) == {"train", "test"} and len(dm.splits["train"][1]) == 80  # the tiny set's 80
    assert dm.val_dataloader() == []  # Lightning validates nothing


def test_batches_cover_every_image_once_per_epoch():
    labels = torch.arange(10)
    batches = TensorBatches(labels[:, None] * 2, labels, batch_size=4, shuffle=True)
    assert len(batches) == 3
    epoch = list(batches)
    assert [len(y) for _, y in epoch] == [4, 4, 2]
    seen = torch.cat([y for _, y in epoch])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(x[:, 0], y * 2) for x, y in epoch)  # images stay with their labels


def test_the_set_moves_to_the_trainers_device_and_batches_are_cut_there(tree_archive, tmp_path):
    # "meta" stands in for a GPU: tensors there have shapes but no data, and nothing is copied back.
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("meta")),
        training=True,
        global_rank=0,
        world_size=1,
        overfit_batches=0,  # as Lightning's Trainer has it: the DataModule reads it (debug=overfit)
    )
    for on_device, device in [(True, "meta"), (False, "cpu")]:
        cfg = compose_config("train", [f"data.root={tree_archive}", f"data.cache_dir={tmp_path}", "data.val_size=20"])
        dm = instantiate(cfg.data, _convert_="all", on_device=on_device)
        dm.trainer = trainer
        dm.setup("fit")
        assert {tensor.device.type for split in dm.splits.values() for tensor in split} == {device}
        images, labels = next(iter(dm.train_dataloader()))
        assert images.device.type == labels.device.type == device and images.dtype == torch.uint8


def test_prepared_arrays_are_used_once_by_setup(tree_archive, tmp_path, monkeypatch):
    cfg = compose_config("train", [f"data.root={tree_archive}", f"data.cache_dir={tmp_path}", "data.val_size=20"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    monkeypatch.setattr(cnnlab.data.datamodule, "load_dataset", lambda *args: pytest.fail("setup read the data again"))
    dm.setup("fit")
    assert dm.prepared is None and len(dm.splits["train"][1]) == 80 - 20


def test_batch_normalisation_runs_on_the_whole_batch(tree_archive, tmp_path):
    dm = datamodule(tree_archive, tmp_path)
    images, labels = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.dtype == torch.float32 and images.shape == (20, 3, 32, 32)
    expected = (dm.splits["val"][0][0, 0, 0, 0] / 255 - 0.4914) / 0.2470
    assert images[0, 0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_random_crop_flip_gives_shifted_or_mirrored_windows():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 8, 8)
    out = random_crop_flip(images, padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped_any = shifted_any = False
    for image, result in zip(padded, out, strict=True):
        windows = {
            (dy, dx, flip): window.flip(-1) if flip else window
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            for window in [image[:, dy : dy + 8, dx : dx + 8]]
        }
        match = [key for key, window in windows.items() if torch.equal(window, result)]
        assert match, "each output is a crop of the padded image, mirrored or not"
        flipped_any |= any(flip for _, _, flip in match)
        shifted_any |= any((dy, dx) != (2, 2) for dy, dx, _ in match)
    assert flipped_any and shifted_any


def test_the_last_refine_epochs_train_on_uncropped_images(tree_archive, tmp_path):
    """data.refine_epochs=2 of 5: epochs 0–2 crop, 3 and 4 see each image whole (as it is, or mirrored)."""
    dm = datamodule(tree_archive, tmp_path, "data.augment=true", "data.crop_padding=4", "data.refine_epochs=2")
    torch.manual_seed(0)
    raw = next(iter(dm.train_dataloader()))
    whole = dm.normalize(raw[0])

    def uncropped(epoch: int) -> bool:
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, max_epochs=5)
        out, _ = dm.on_after_batch_transfer(raw, 0)
        return all(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for o, w in zip(out, whole, strict=True))

    assert [uncropped(epoch) for epoch in range(5)] == [False, False, False, True, True]


# ------------------------------------------------------------------------------------------ the cache follows the data


def move(tree: Path, source: str, target: str) -> None:
    (tree / target).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tree / source, tree / target)


def add_a_class(tree: Path) -> None:
    for split in ("train", "test"):
        shutil.copytree(tree / split / "cat", tree / split / "zebra")


def replace_an_image(tree: Path) -> None:
    path = tree / "train" / "dog" / "0001.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(path)


CHANGES = {  # what a user does to a folder tree between two runs
    "a class folder added": add_a_class,
    "an image moved to another class": lambda tree: move(tree, "train/cat/0000.png", "train/dog/0100.png"),
    "an image replaced": replace_an_image,
    "an image removed": lambda tree: (tree / "train" / "frog" / "0000.png").unlink(),  # (the last one: refused)
    "a class folder renamed": lambda tree: [move(tree, f"{s}/ship", f"{s}/boat") for s in ("train", "test")],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_cached_folder_tree_changed_after_a_run_is_read_as_it_is_now(change, tmp_path):
    tree = write_image_tree(tmp_path / "tree", {"train": 3, "test": 1})
    before = load_tree_cached(tree, tmp_path / "cache", 32, "RGB")
    CHANGES[change](tree)
    now = load_tree_cached(tree, tmp_path / "cache", 32, "RGB")
    fresh = decode_image_tree(tree, 32, "RGB")  # what the tree holds now, read without any cache
    assert now.classes == fresh.classes
    for field in Arrays._fields[:4]:
        np.testing.assert_array_equal(getattr(now, field), getattr(fresh, field))
    assert not all(np.array_equal(getattr(before, f), getattr(now, f)) for f in Arrays._fields[:4])


def test_an_image_damaged_after_a_run_is_named(tmp_path):
    tree = write_image_tree(tmp_path / "tree", {"train": 2, "test": 1})
    load_tree_cached(tree, tmp_path / "cache", 32, "RGB")
    (tree / "train" / "bird" / "0001.png").write_bytes(b"not a png any more")
    with pytest.raises(UserError, match=r"cannot decode image train/bird/0001.png"):
        load_tree_cached(tree, tmp_path / "cache", 32, "RGB")


@pytest.mark.parametrize("packed", ["folder", "tar.gz", "zip"])
def test_an_empty_class_folder_is_named_and_a_dot_folder_is_not_a_class(packed, tmp_path):
    tree = write_image_tree(tmp_path / "tree", {"train": 1, "test": 1})
    load_tree_cached(tree, tmp_path / "cache", 32, "RGB")  # cached before the empty folders come
    (tree / "train" / ".ipynb_checkpoints").mkdir()  # not a class: skipped
    (tree / "test" / "zebra").mkdir()
    (tree / "train" / "zebra").mkdir()
    source = tree if packed == "folder" else pack(tree, tmp_path / f"tree.{packed}")
    with pytest.raises(UserError) as error:
        load_tree_cached(source, tmp_path / "cache", 32, "RGB")
    assert str(error.value) == (
        f"data.root={source}: class folders test/zebra/, train/zebra/ hold no image "
        f"(a class the network can neither learn nor be tested on): add images or remove them"
    )
    for split in ("train", "test"):
        (tree / split / "zebra").rmdir()
    source = tree if packed == "folder" else pack(tree, tmp_path / f"again.{packed}")
    assert load_tree_cached(source, tmp_path / "cache", 32, "RGB").classes == CLASSES


def test_another_decoder_reads_the_images_again(tree_archive, tmp_path, monkeypatch):
    load_tree_cached(tree_archive, tmp_path, 32, "RGB")
    monkeypatch.setattr(cnnlab.data.trees, "DECODER", cnnlab.data.trees.DECODER + 1)
    load_tree_cached(tree_archive, tmp_path, 32, "RGB")
    assert len(list(tmp_path.iterdir())) == 2  # a cache of its own: the first one is not read


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def rewrite(name: str, change):
    return lambda cache: np.save(cache / name, change(np.load(cache / name)))


DAMAGE = {  # a cache folder's files altered: each is refused in one line naming the folder
    "an empty file": lambda cache: (cache / "test_images.npy").write_bytes(b""),
    "a truncated file": lambda cache: cut(cache / "train_images.npy"),
    "labels outside the classes": rewrite("train_labels.npy", lambda labels: labels + 10),
    "a label missing": rewrite("test_labels.npy", lambda labels: labels[:-1]),
    "images of another type": rewrite("train_images.npy", lambda images: images.astype(np.float32)),
    "images of another size": rewrite("test_images.npy", lambda images: images[:, :16]),
    "classes that are no list": lambda cache: (cache / "classes.json").write_text('{"cat": 0}'),
    "classes that are no JSON": lambda cache: (cache / "classes.json").write_text('["cat", "dog"'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_cache_that_does_not_hold_what_it_claims_is_refused_in_one_line(damage, tree_archive, tmp_path):
    load_tree_cached(tree_archive, tmp_path, 32, "RGB")
    (cache,) = tmp_path.iterdir()
    DAMAGE[damage](cache)
    with pytest.raises(UserError) as error:
        load_tree_cached(tree_archive, tmp_path, 32, "RGB")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{cache}: the decoded-image cache is damaged (")
    assert message.endswith("; delete that folder")


def test_bad_input_md_counts_the_cache_families():
    text = (Path(__file__).parents[1] / "docs" / "bad-input.md").read_text()
    changed = re.search(r"changes a folder tree after a first run in\s+(\d+) ways", text)
    damaged = re.search(r"damages a cache's files in (\d+) ways", text)
    assert changed and damaged, "docs/bad-input.md names how many ways the cache tests change and damage it"
    assert (int(changed.group(1)), int(damaged.group(1))) == (len(CHANGES) + 1, len(DAMAGE))  # + the damaged image
