"""Image trees (train/<class>/… + test/<class>/…, as a folder or an archive) decoded once into uint8 arrays, cached.

Any image size and mode: each image is converted to the data's channels (RGB or L) and resized to image_size ×
image_size as it is decoded (PIL, bilinear: as predict reads an image file), so that every image of the tree
ends in one N×H×W×C array. Without an image_size, the side is the most common image's shorter side. The cache is
a folder of .npy files that later runs map into memory at once.
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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cnnlab import UserError
from cnnlab.quiet import ConsoleNoise

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# How an image file becomes pixels (decode, to_pixels): part of the cache's key with Pillow's version, so that a
# cache made by an earlier way is rebuilt, never read. Raise it with any change to what they give.
DECODER = 1

# <anything>/(train|test)/<class>/<file>.(png|jpg|jpeg|bmp|gif|webp)
IMAGE_PATH = re.compile(r"(?:^|/)(train|test)/([^/]+)/[^/]+\.(?:png|jpe?g|bmp|gif|webp)$", re.IGNORECASE)
# <anything>/(train|test)/<class>(/): a class folder, which must hold images (a dot folder is not a class)
CLASS_FOLDER = re.compile(r"(?:^|/)(train|test)/([^/.][^/]*)/?$", re.IGNORECASE)


class Arrays(NamedTuple):
    """A data set in memory: N×H×W×C uint8 images (as torchvision's CIFAR10.data) and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def find_image_tree(folder: Path) -> Path | None:
    """`folder` itself if it holds train/ and test/, or its only sub-folder that does (an unpacked archive)."""
    if not folder.is_dir():
        return None
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def tree_entries(source: Path) -> Iterator[tuple[str, bytes | None]]:
    """(path inside the tree, file bytes, or None for a folder) for every entry of a folder, tar or zip, read in
    place."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() or path.is_dir():
                yield path.relative_to(source).as_posix(), path.read_bytes() if path.is_file() else None
    elif source.name.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                yield info.filename, None if info.is_dir() else archive.read(info)
    else:
        with tarfile.open(source) as archive:  # streams .tar.gz without unpacking it anywhere
            for member in archive:
                if member.isfile() or member.isdir():
                    yield member.name, archive.extractfile(member).read() if member.isfile() else None


def read_tree(source: Path) -> dict[str, list[tuple[str, str, bytes, tuple[int, int]]]]:
    """Every train/<class>/* and test/<class>/* image of `source` as (class, path, file bytes, (width, height)):
    one pass over the files, reading only each image's header. A class folder without images is refused."""
    found: dict[str, list] = {"train": [], "test": []}
    folders: set[tuple[str, str]] = set()  # (split, class) of every class folder seen
    try:
        progress = tqdm(tree_entries(source), desc=f"reading {source.name} (once, then cached)", unit=" files",
                        mininterval=2, disable=True if ConsoleNoise.quiet else None)  # fmt: skip
        for name, data in progress:  # disable=None: no bar where stderr is not a terminal
            if data is None:
                if folder := CLASS_FOLDER.search(name):
                    folders.add((folder.group(1).lower(), folder.group(2)))
                continue
            match = IMAGE_PATH.search(name)
            if match is None:
                continue
            try:
                with Image.open(io.BytesIO(data)) as image:
                    size = image.size
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… for a damaged file
                raise UserError(f"data.root={source}: cannot decode image {name}: {why(err)}") from err
            found[match.group(1).lower()].append((match.group(2), name, data, size))
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as err:  # truncated, corrupt
        reason = " ".join(str(err).split())  # tarfile's reasons come one per line
        raise UserError(f"data.root={source}: cannot read it, truncated or damaged? ({reason})") from err
    empty = sorted(folders - {(split, label) for split, items in found.items() for label, *_ in items})
    if empty:
        named, one = ", ".join(f"{split}/{label}/" for split, label in empty), len(empty) == 1
        raise UserError(f"data.root={source}: class folder{'' if one else 's'} {named} hold{'s' if one else ''} no "
                        f"image (a class the network can neither learn nor be tested on): add images or remove "
                        f"{'it' if one else 'them'}")  # fmt: skip
    return found


def why(err: Exception) -> str:
    return "not an image PIL can identify" if isinstance(err, UnidentifiedImageError) else " ".join(str(err).split())


def decode_image_tree(source: Path, image_size: int | None, channels: str) -> Arrays:
    """Decode the tree into N×H×W×C uint8 arrays: each image converted to `channels` (RGB or L) and resized to
    image_size × image_size (None: the most common image's shorter side)."""
    found = read_tree(source)
    if not found["train"] or not found["test"]:
        raise UserError(
            f"data.root={source}: found {len(found['train'])} train and {len(found['test'])} test images; "
            f"an image tree needs both train/<class>/*.png|jpg and test/<class>/*.png|jpg"
        )
    classes = sorted({label for label, *_ in found["train"]})  # label order = sorted names, as ImageFolder
    if len(classes) < 2:
        raise UserError(f"data.root={source}: train/ holds one class ({classes[0]}); a classifier needs two or more "
                        f"train/<class>/ folders")  # fmt: skip
    unknown = sorted({label for label, *_ in found["test"]} - set(classes))
    if unknown:
        raise UserError(f"data.root={source}: test classes {unknown} have no train images")
    if image_size is None:
        (common, _), *_ = Counter(size for split in found.values() for *_, size in split).most_common(1)
        image_size = min(common)
    arrays = []
    for split in ("train", "test"):
        items = sorted(found[split], key=lambda item: (classes.index(item[0]), item[1]))
        arrays.append(np.stack([decode(source, name, data, image_size, channels) for _, name, data, _ in items]))
        arrays.append(np.array([classes.index(label) for label, *_ in items], dtype=np.int64))
    return Arrays(*arrays, classes)


def decode(source: Path, name: str, data: bytes, image_size: int, channels: str) -> np.ndarray:
    """One image file → H×W×C uint8 in `channels`, image_size × image_size."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_pixels(image, image_size, channels)
    except Exception as err:
        raise UserError(f"data.root={source}: cannot decode image {name}: {why(err)}") from err


def to_pixels(image: Image.Image, image_size: int, channels: str) -> np.ndarray:
    """A PIL image → H×W×C uint8: converted to RGB or L, resized (bilinear) to a square of image_size when it is
    not one already. Training, evaluation and predict all read images through this."""
    image = image.convert(channels)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels  # L: H×W → H×W×1


def load_tree_cached(source: Path, cache_dir: Path, image_size: int | None, channels: str) -> Arrays:
    """Decode `source` once; later calls map the cache into memory, which costs nothing until it is read.

    The cache is a folder of .npy files keyed by the source's files (fingerprint), the decoding (size, channels)
    and the decoder (DECODER, Pillow's version), written into a temp folder that is then renamed into place: it is
    never seen half-written. Arrays that do not hold what a cache holds are refused in one line. Two processes that
    build it at once both succeed (the second rename finds the first one's cache and keeps it); the temp folder of
    a build that was killed is named by its process id, and the next build removes it."""
    identity = f"{fingerprint(source)}|{image_size}|{channels}|decoder {DECODER}|Pillow {PIL.__version__}"
    cache = cache_dir / f"images-{hashlib.sha1(identity.encode()).hexdigest()[:16]}"
    if cache.is_dir():
        try:  # "c": copy-on-write, so torch.from_numpy gets a writable array without copying it
            arrays = [np.load(cache / f"{field}.npy", mmap_mode="c") for field in Arrays._fields[:4]]
            arrays = Arrays(*arrays, json.loads((cache / "classes.json").read_text()))
            problem = what_is_wrong(arrays)
        except (OSError, ValueError, EOFError) as err:  # EOFError: numpy's word for an empty file
            problem = " ".join(str(err).split())
        if problem:
            raise UserError(f"{cache}: the decoded-image cache is damaged ({problem}); delete that folder")
        return arrays
    arrays = decode_image_tree(source, image_size, channels)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(cache_dir.glob(f"{cache.name}.*.tmp"))
        temp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.{os.getpid()}.", suffix=".tmp", dir=cache_dir))
        try:
            for field in Arrays._fields[:4]:
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


def fingerprint(source: Path) -> str:
    """What the cache of `source` stands for. An archive: its path, size and modification time. A folder: its path
    and each file's path, size and modification time under it (a listing, no file read), so that a class folder
    added, an image moved, replaced or removed anywhere in the tree makes another key."""
    stat = source.stat()
    if not source.is_dir():
        return f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    files = hashlib.sha1(str(source.resolve()).encode())
    for relative, stat in sorted(files_under(source, "")):  # the entries tree_entries reads
        files.update(f"\0{relative}|{stat.st_size}|{stat.st_mtime_ns}".encode() if stat else f"\0{relative}".encode())
    return files.hexdigest()


def files_under(folder: Path | str, prefix: str) -> Iterator[tuple[str, os.stat_result | None]]:
    """(path relative to the top, stat) of every file under `folder`, and (path/, None) of every folder: one
    directory read a folder, one stat a file."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield f"{prefix}{entry.name}/", None  # a folder too (an empty class folder is refused), by name
                yield from files_under(entry.path, f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield f"{prefix}{entry.name}", entry.stat()


def what_is_wrong(arrays: Arrays) -> str | None:
    """Why `arrays` (read from a cache) are not what a decode gives, or None: uint8 N×H×W×C images of one size in
    both splits, as many labels as images, each label the index of one of the class names."""
    classes = arrays.classes
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(name, str) for name in classes):
        return "classes.json is not a list of two or more class names"
    shapes = {arrays.train_images.shape[1:], arrays.test_images.shape[1:]}
    for split in ("train", "test"):
        images, labels = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4 or len(shapes) != 1:
            return f"{split}_images.npy holds {images.dtype} {tuple(images.shape)}, not uint8 images of one size"
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            return f"{split}_labels.npy holds {labels.dtype} {tuple(labels.shape)}, not one label an image"
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            return f"{split}_labels.npy holds labels outside 0 to {len(classes) - 1} ({len(classes)} classes)"
    return None


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
