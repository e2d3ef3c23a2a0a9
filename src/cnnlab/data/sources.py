"""CIFAR-10 from where it lies (`data.root`) to four uint8 arrays in memory, and the cache that makes it quick.

Sources, detected in this order:
  - a .tar.gz/.tgz/.tar/.zip of an image-folder tree  train/<class>/*.jpg|png, test/<class>/*  (any prefix)
  - a folder holding torchvision's official CIFAR-10 (cifar-10-batches-py/)
  - a folder holding an image-folder tree (at its top or one folder down)
  - otherwise, with data.download=true, torchvision downloads the official CIFAR-10 into the folder.
An image tree is decoded once into a cache (data.cache_dir) that later runs map into memory at once. Both
sources end as N×H×W×C uint8 arrays, as torchvision's CIFAR10.data is.
"""

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cnnlab import UserError
from cnnlab.quiet import ConsoleNoise

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


# <anything>/(train|test)/<class>/<file>.(png|jpg|jpeg)
IMAGE_PATH = re.compile(r"(?:^|/)(train|test)/([^/]+)/[^/]+\.(?:png|jpe?g)$", re.IGNORECASE)


class CifarArrays(NamedTuple):
    train_images: np.ndarray  # N×H×W×C uint8
    train_labels: np.ndarray  # N int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def load_cifar10(root: str | Path, download: bool, cache_dir: str | Path) -> CifarArrays:
    """Detect the format of `root` and return CIFAR-10 as N×H×W×C uint8 arrays."""
    root = Path(root).expanduser()
    if root.is_file():
        if not root.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"data.root={root} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return load_image_tree_cached(root, Path(cache_dir).expanduser())
    if (root / "cifar-10-batches-py").is_dir():
        return load_torchvision(root, download=False)
    tree = find_image_tree(root)
    if tree is not None:
        return load_image_tree_cached(tree, Path(cache_dir).expanduser())
    if download:
        return load_torchvision(root, download=True)
    raise UserError(
        f"data.root={root}: no CIFAR-10 found. Looked for torchvision's cifar-10-batches-py/ folder, an image "
        f"tree train/<class>/*.png|jpg + test/<class>/*, and a .tar.gz/.zip of such a tree. "
        f"Point data.root at one of these, or set data.download=true to download the official CIFAR-10 there."
    )


def load_torchvision(root: Path, download: bool) -> CifarArrays:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except (OSError, RuntimeError) as err:  # no network, a half-downloaded or corrupt archive, no write access
        raise UserError(
            f"data.root={root}: could not {'download' if download else 'read'} torchvision's CIFAR-10 ({err}). "
            f"Without network, point data.root at a local copy (an image tree or its .tar.gz/.zip)."
        ) from err
    labels = [np.asarray(d.targets, dtype=np.int64) for d in (train, test)]
    return CifarArrays(train.data, labels[0], test.data, labels[1], list(train.classes))


def find_image_tree(folder: Path) -> Path | None:
    """`folder` itself if it holds train/ and test/, or its only sub-folder that does (an unpacked archive)."""
    if not folder.is_dir():
        return None
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def image_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """(path inside the tree, file bytes) for every file of a folder, tar or zip, read in place."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file():
                yield path.relative_to(source).as_posix(), path.read_bytes()
    elif source.name.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, archive.read(info)
    else:
        with tarfile.open(source) as archive:  # streams .tar.gz without unpacking it anywhere
            for member in archive:
                if member.isfile():
                    yield member.name, archive.extractfile(member).read()


def decode_image_tree(source: Path) -> CifarArrays:
    """Decode every train/<class>/* and test/<class>/* image of `source` into N×H×W×C uint8 arrays."""
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    try:
        files = image_files(source)
        progress = tqdm(
            files,
            desc=f"decoding {source.name} (once, then cached)",
            unit=" files",
            mininterval=2,
            disable=True if ConsoleNoise.quiet else None,
        )  # None: no bar where stderr is not a terminal
        for name, data in progress:
            match = IMAGE_PATH.search(name)
            if match is None:
                continue
            split, label = match.group(1).lower(), match.group(2)
            try:
                with Image.open(io.BytesIO(data)) as image:
                    pixels = np.asarray(image.convert("RGB"))  # H×W×C, as torchvision's CIFAR10.data
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… for a damaged file
                reason = "not an image PIL can identify" if isinstance(err, UnidentifiedImageError) else err
                raise UserError(f"data.root={source}: cannot decode image {name}: {reason}") from err
            found[split].append((label, name, pixels))
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as err:  # truncated, corrupt
        reason = " ".join(str(err).split())  # tarfile's reasons come one per line
        raise UserError(f"data.root={source}: cannot read it, truncated or damaged? ({reason})") from err

    if not found["train"] or not found["test"]:
        raise UserError(
            f"data.root={source}: found {len(found['train'])} train and {len(found['test'])} test images; "
            f"an image tree needs both train/<class>/*.png|jpg and test/<class>/*.png|jpg"
        )
    classes = sorted({label for label, _, _ in found["train"]})  # label order = sorted names, as ImageFolder
    unknown = sorted({label for label, _, _ in found["test"]} - set(classes))
    if unknown:
        raise UserError(f"data.root={source}: test classes {unknown} have no train images")
    shape = found["train"][0][2].shape
    arrays = []
    for split in ("train", "test"):
        items = sorted(found[split], key=lambda item: (classes.index(item[0]), item[1]))
        for _, name, pixels in items:
            if pixels.shape != shape:
                raise UserError(f"data.root={source}: image {name} is {pixels.shape}, the first one is {shape}")
        arrays.append(np.stack([pixels for _, _, pixels in items]))
        arrays.append(np.array([classes.index(label) for label, _, _ in items], dtype=np.int64))
    return CifarArrays(*arrays, classes)


def load_image_tree_cached(source: Path, cache_dir: Path) -> CifarArrays:
    """Decode `source` once; later calls map the cache into memory, which costs nothing until it is read.

    The cache is a folder of .npy files keyed by the source's path, size and modification time, written into a
    temp folder that is then renamed into place: it is never seen half-written. Two processes that build it at
    once both succeed (the second rename finds the first one's cache and keeps it); the temp folder of a build
    that was killed is named by its process id, and the next build removes it."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar10-{key}"
    if cache.is_dir():
        try:  # "c": copy-on-write, so torch.from_numpy gets a writable array without copying it
            arrays = [np.load(cache / f"{field}.npy", mmap_mode="c") for field in CifarArrays._fields[:4]]
            return CifarArrays(*arrays, json.loads((cache / "classes.json").read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"{cache}: the decoded-image cache is damaged ({err}); delete that folder") from err
    arrays = decode_image_tree(source)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(cache_dir.glob(f"{cache.name}.*.tmp"))
        temp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.{os.getpid()}.", suffix=".tmp", dir=cache_dir))
        try:
            for field in CifarArrays._fields[:4]:
                np.save(temp / f"{field}.npy", getattr(arrays, field))
            (temp / "classes.json").write_text(json.dumps(arrays.classes))
            try:
                temp.rename(cache)
            except OSError:
                if not cache.is_dir():  # else another process wrote the same cache first: keep theirs
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    except OSError as err:
        raise UserError(f"data.cache_dir={cache_dir}: cannot write the decoded-image cache there ({err})") from err
    return arrays


def remove_abandoned(temp_folders) -> None:
    """Delete the temp folders of cache builds whose process is gone (killed mid-build)."""
    for folder in temp_folders:
        pid = folder.name.split(".")[1]
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not one of ours, or another user's live process
