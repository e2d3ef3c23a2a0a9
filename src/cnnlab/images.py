"""Image files as a model's input: found (a file, a folder, a pattern), read in any size and mode, as uint8 N×C×H×W."""

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnlab import CHANNELS, UserError
from cnnlab.data.trees import to_pixels

MODES = {count: mode for mode, count in CHANNELS.items()}  # a model's input channels → the image mode it reads

log = logging.getLogger(__name__)


def find_images(inputs: str) -> list[Path]:
    """An image file, a folder (every file under it) or a glob pattern, as sorted paths."""
    path = Path(inputs).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"inputs={inputs}: the folder is empty")
    else:
        import glob

        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(inputs), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"inputs={inputs}: no such file or folder, and no file matches it as a pattern")
    return files


def read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Any image PIL reads, any size and mode → the model's input C×H×W (RGB or grey, resized as the training
    images were: cnnlab.data.trees.to_pixels) → uint8 C×H×W."""
    channels, size, _ = shape
    with Image.open(path) as image:
        pixels = to_pixels(image, size, MODES[channels])
    return pixels.transpose(2, 0, 1)  # H×W×C → C×H×W: the slides' permute, for one image


def read_images(files: list[Path], shape: tuple[int, ...]) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """The images that could be read, as one uint8 N×C×H×W array, and the files skipped with the reason."""
    kept, arrays, skipped = [], [], []
    for path in files:
        try:
            arrays.append(read_image(path, shape))
            kept.append(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
            skipped.append((path, reason))
    images = np.stack(arrays) if arrays else np.zeros((0, *shape), dtype=np.uint8)
    return kept, images, skipped


def labelled_folder(root: Path, classes: list[str], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A folder of the user's own labelled images, <class>/<image>, any sizes: images and label indices."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise UserError(f"data.root={root}: folders {unknown} are not classes of the model ({', '.join(classes)})")
    images, labels = [], []
    for folder in folders:
        kept, pixels, skipped = read_images(sorted(p for p in folder.rglob("*") if p.is_file()), shape)
        for path, reason in skipped:
            log.warning(f"skipped {path}: {reason}")
        images.append(pixels)
        labels += [classes.index(folder.name)] * len(kept)
    if not labels:
        raise UserError(f"data.root={root}: no images in <class>/ folders to evaluate on")
    return np.concatenate(images), np.array(labels, dtype=np.int64)
