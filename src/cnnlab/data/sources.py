"""The data sets, from where they lie (`data.root`) to four uint8 arrays in memory: CIFAR-10/100, MNIST,
Fashion-MNIST, SVHN (torchvision's own classes) and any image tree.

`load_dataset` looks at `data.root`, in this order:
  - a .tar.gz/.tgz/.tar/.zip of an image tree train/<class>/* + test/<class>/* (any prefix), or a folder holding
    such a tree (at its top or one folder down): decoded once into a cache (cnnlab.data.trees);
  - the data set's own files as torchvision keeps them (cifar-10-batches-py/, cifar-100-python/, MNIST/raw/,
    FashionMNIST/raw/, train_32x32.mat), read by torchvision's class for it;
  - otherwise, with data.download=true, torchvision downloads the data set into the folder.
All end as N×H×W×C uint8 arrays (torchvision's CIFAR10.data is one), converted to the configured channels
(RGB or L) and image size.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnlab import CHANNELS, UserError
from cnnlab.data.trees import ARCHIVE_SUFFIXES, Arrays, find_image_tree, load_tree_cached, to_pixels


class TorchvisionSet(NamedTuple):
    title: str  # as people write it
    dataset: str  # torchvision.datasets.<dataset>
    files: str  # what it looks for in data.root


TORCHVISION = {
    "cifar10": TorchvisionSet("CIFAR-10", "CIFAR10", "cifar-10-batches-py/"),
    "cifar100": TorchvisionSet("CIFAR-100", "CIFAR100", "cifar-100-python/"),
    "mnist": TorchvisionSet("MNIST", "MNIST", "MNIST/raw/"),
    "fashion_mnist": TorchvisionSet("Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw/"),
    "svhn": TorchvisionSet("SVHN", "SVHN", "train_32x32.mat + test_32x32.mat"),
}


def load_dataset(name: str, root: str | Path, download: bool, cache_dir: str | Path, image_size: int | None,
                 channels: str) -> Arrays:  # fmt: skip
    """Detect what `root` holds and return the data set `name` as N×H×W×C uint8 arrays in `channels` (RGB or L),
    image_size × image_size (None: the images' own size; an image tree's most common one)."""
    root = Path(root).expanduser()
    if root.is_file():
        if not root.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"data.root={root} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return load_tree_cached(root, Path(cache_dir).expanduser(), image_size, channels)
    tree = find_image_tree(root)
    if tree is not None:
        return load_tree_cached(tree, Path(cache_dir).expanduser(), image_size, channels)
    if name == "folder":
        raise UserError(f"data.root={root}: no image tree found: data=folder reads a folder (or a .tar.gz/.zip) "
                        f"holding train/<class>/<image> and test/<class>/<image>")  # fmt: skip
    known = TORCHVISION[name]
    if has_torchvision_files(name, root) or download:
        return fitted(load_torchvision(name, root, download), image_size, channels)
    raise UserError(
        f"data.root={root}: no {known.title} found. Looked for torchvision's {known.files}, an image tree "
        f"train/<class>/*.png|jpg + test/<class>/*, and a .tar.gz/.zip of such a tree. Point data.root at one of "
        f"these, or set data.download=true to download the official {known.title} there."
    )


def has_torchvision_files(name: str, root: Path) -> bool:
    if name == "svhn":
        return (root / "train_32x32.mat").is_file()
    return (root / TORCHVISION[name].files).is_dir()


def load_torchvision(name: str, root: Path, download: bool) -> Arrays:
    """The data set through torchvision's own class for it: its files, its labels, its class names."""
    import torchvision.datasets

    known = TORCHVISION[name]
    dataset = getattr(torchvision.datasets, known.dataset)
    try:
        if name == "svhn":  # its split is a name, and torchvision keeps its images as N×C×H×W
            train, test = (dataset(str(root), split=split, download=download) for split in ("train", "test"))
            images = [np.ascontiguousarray(d.data.transpose(0, 2, 3, 1)) for d in (train, test)]
            labels = [np.asarray(d.labels, dtype=np.int64) for d in (train, test)]
            classes = [str(digit) for digit in range(10)]  # torchvision maps SVHN's label 10 to the digit 0
        else:
            train, test = (dataset(str(root), train=split, download=download) for split in (True, False))
            images = [np.asarray(d.data) for d in (train, test)]  # CIFAR: numpy N×H×W×C; MNIST: a tensor N×H×W
            images = [pixels[..., None] if pixels.ndim == 3 else pixels for pixels in images]
            labels = [np.asarray(d.targets, dtype=np.int64) for d in (train, test)]
            classes = list(train.classes)
    except ImportError as err:  # SVHN's .mat files need scipy
        raise UserError(f"data={name} needs {err.name}, which is not installed: pip install {err.name}") from err
    except (OSError, RuntimeError, ValueError) as err:  # no network, a half-downloaded or corrupt file
        raise UserError(
            f"data.root={root}: could not {'download' if download else 'read'} torchvision's {known.title} "
            f"({' '.join(str(err).split())}). Without network, point data.root at a local copy (torchvision's "
            f"{known.files}, an image tree or its .tar.gz/.zip)."
        ) from err
    return Arrays(images[0], labels[0], images[1], labels[1], classes)


def fitted(arrays: Arrays, image_size: int | None, channels: str) -> Arrays:
    """The arrays in `channels` and image_size × image_size, each image converted as an image file is
    (cnnlab.data.trees.to_pixels); arrays that already fit are returned as they are."""
    from PIL import Image

    height, width, have = arrays.train_images.shape[1:]
    size = image_size or height
    if have == CHANNELS[channels] and (height, width) == (size, size):
        return arrays

    def convert(images: np.ndarray) -> np.ndarray:
        return np.stack([to_pixels(Image.fromarray(image.squeeze(-1) if have == 1 else image), size, channels)
                         for image in images])  # fmt: skip

    return arrays._replace(train_images=convert(arrays.train_images), test_images=convert(arrays.test_images))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 N×H×W×C images, on the 0–1 scale of the normalisation
    (cnnlab.data.pixels): exact, from a histogram of each channel's 256 values (no float copy of the images)."""
    values = np.arange(256, dtype=np.float64) / 255
    mean, std = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(np.ascontiguousarray(images[..., channel]).ravel(), minlength=256).astype(np.float64)
        m = float(counts @ values / counts.sum())
        mean.append(m)
        std.append(float(np.sqrt(counts @ (values - m) ** 2 / counts.sum())))
    return mean, std


def follow_the_data(cfg) -> Arrays | None:
    """The network follows the data: model.image_size and model.num_classes left null, as data=folder leaves them
    (an image tree's most common size, its train/<class>/ folders), are known once the data is read. Read it (once,
    then cached), fill them in, and return the arrays for the DataModule; None when the config gave both."""
    model, data = cfg.model, cfg.data
    if model.image_size is not None and model.num_classes is not None:
        return None
    arrays = load_dataset(data.name, data.root, data.download, data.cache_dir, data.image_size, data.channels)
    if model.image_size is None:
        model.image_size = int(arrays.train_images.shape[1])
    if model.num_classes is None:
        model.num_classes = len(arrays.classes)
    return arrays
