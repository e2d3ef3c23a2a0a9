"""CIFAR-10 as one uint8 tensor in memory, served in batches by slicing, prepared for the model on its device.

Sources (`data.root`), detected in this order:
  - a .tar.gz/.tgz/.tar/.zip of an image-folder tree  train/<class>/*.jpg|png, test/<class>/*  (any prefix)
  - a folder holding torchvision's official CIFAR-10 (cifar-10-batches-py/)
  - a folder holding an image-folder tree (at its top or one folder down)
  - otherwise, with data.download=true, torchvision downloads the official CIFAR-10 into the folder.
An image tree is decoded once into a cache (data.cache_dir) that later runs map into memory at once.

Both sources end as N×H×W×C uint8 arrays, as torchvision's CIFAR10.data is. The DataModule permutes them once
to N×C×H×W and keeps them as uint8, on the model's device with data.on_device; each batch is a slice by a
shuffled index, and the float conversion, normalisation and augmentation run on the whole batch, on the
model's device.
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
from math import ceil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cnnlab import UserError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# <anything>/(train|test)/<class>/<file>.(png|jpg|jpeg)
IMAGE_PATH = re.compile(r"(?:^|/)(train|test)/([^/]+)/[^/]+\.(?:png|jpe?g)$", re.IGNORECASE)
VAL_SPLIT_SEED = 0  # the train/val split is fixed: it must not change with the training seed


class CifarArrays(NamedTuple):
    train_images: np.ndarray  # N×H×W×C uint8
    train_labels: np.ndarray  # N int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------------------------------------- sources


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
        progress = tqdm(files, desc=f"decoding {source.name} (once, then cached)", unit=" files", mininterval=2)
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


# ------------------------------------------------------------------------------------------ batching


class TensorBatches:
    """Batches as slices of tensors already in memory: one random permutation per epoch, no per-sample work.

    The epoch's order comes from a generator of its own, seeded by (seed, epoch), as torch's DistributedSampler
    seeds its own: every process of a multi-process run draws the same order whatever else draws random numbers,
    and a checkpoint need not carry it. Its state (the epoch, how many batches were served) goes into Lightning's
    checkpoints, so a run stopped mid-epoch resumes at the next batch of the same order (cnnlab.resume).

    Several processes (DDP): process `rank` takes its shard of the order, rank::world_size. Training shards are
    cut to one length (DDP needs as many steps on each process; the few images left over differ each epoch);
    evaluation shards (`drop_uneven=False`) keep every image, so that the metrics, summed over the processes by
    torchmetrics, are those of the whole split. Lightning shards only DataLoaders: these batches do it themselves.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = True,
    ):
        self.images, self.labels, self.batch_size, self.shuffle, self.seed = images, labels, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_uneven = rank, world_size, drop_uneven
        # Lightning reads a loader's `sampler` / `batch_sampler` as it would a DataLoader's, and calls
        # `sampler.set_epoch(n)` before each epoch (as for a DistributedSampler): so the batches know their epoch.
        self.sampler, self.batch_sampler = self, None
        self.epoch = 0
        self.served = 0  # batches of this epoch served so far
        self.resume_at: tuple | None = None  # (epoch, batches served, its order if stored) of a mid-epoch checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return ceil(self.shard_size / self.batch_size)

    @property
    def shard_size(self) -> int:
        n = len(self.labels)
        return n // self.world_size if self.drop_uneven else len(range(self.rank, n, self.world_size))

    def order(self, epoch: int) -> torch.Tensor:
        """The order of the images in `epoch`: the same on every process, for every run with this seed."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        # Independent streams for each (seed, epoch) pair (seed + epoch, as DistributedSampler has it, would give
        # seed 1 the orders of seed 0 shifted by an epoch).
        (state,) = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)
        return torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume, self.resume_at = self.resume_at, None
        if resume is None or resume[0] != self.epoch:
            resume = (self.epoch, 0, None)
        _, self.served, order = resume
        order = self.order(self.epoch) if order is None else order
        # On the data's device: a GPU-resident set is indexed on the GPU (one small copy of the order an epoch).
        shard = order[self.rank :: self.world_size][: self.shard_size].to(self.images.device)
        while self.served < len(self):
            index = shard[self.served * self.batch_size : (self.served + 1) * self.batch_size]
            self.served += 1
            # index_select: a plain gather of whole rows (indexing with [index] takes PyTorch's general, slower
            # advanced-indexing path)
            yield self.images.index_select(0, index), self.labels.index_select(0, index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served, "batch_size": self.batch_size, "seed": self.seed,
                "images": len(self.labels), "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Resume mid-epoch: the next epoch starts at the checkpoint's next batch if it is the checkpoint's own
        epoch (Lightning may have ended that one early, with limit_train_batches). Mid-epoch needs the same images,
        batches, seed and number of processes, or the rest of its epoch would not be the rest of the same order."""
        ours = {"images": len(self.labels), "batch_size": self.batch_size, "seed": self.seed,
                "world_size": self.world_size}  # fmt: skip
        theirs = {key: state.get(key, ours[key]) for key in ours}  # older checkpoints name fewer
        if "order" in state:  # written when checkpoints carried the order (before it came from (seed, epoch))
            theirs["images"] = len(state["order"])
        batches = ceil(theirs["images"] // theirs["world_size"] / theirs["batch_size"])
        if not 0 < state["served"] < batches:
            return
        if theirs != ours:
            differ = ", ".join(f"{key} {theirs[key]} (here {ours[key]})" for key in ours if theirs[key] != ours[key])
            raise UserError(
                f"the checkpoint was taken mid-epoch with {differ}: resume it with the same data.root, data.val_size, "
                f"data.batch_size, seed and number of processes (trainer.devices × trainer.num_nodes), or from a "
                f"checkpoint taken at an epoch's end"
            )
        self.resume_at = (state["epoch"], state["served"], state.get("order"))


def scale_and_shift(mean: list[float], std: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 − mean) / std as x · scale + shift: 1×C×1×1 float32 tensors, computed in float64 and rounded once,
    on the CPU (an MPS device has no float64)."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    return tuple(t.float().to(device) for t in (1 / (255 * std), -mean / std))


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, for a whole B×C×H×W batch at once."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device)
    rows = (dy + torch.arange(height, device=images.device))[:, None, :, None]  # B×1×H×1
    cols = (dx + torch.arange(width, device=images.device))[:, None, None, :]  # B×1×1×W
    flip = torch.rand(batch, 1, 1, 1, device=images.device) < 0.5
    cols = torch.where(flip, 2 * dx[:, None, None, :] + width - 1 - cols, cols)  # mirror inside the crop
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch_index, channels, rows, cols]


# --------------------------------------------------------------------------------------- DataModule


class CIFAR10DataModule(LightningDataModule):
    def __init__(
        self,
        root: str,
        download: bool,
        cache_dir: str,
        val_size: int,
        batch_size: int,
        eval_batch_size: int,
        augment: bool,
        crop_padding: int,
        mean: list[float],
        std: list[float],
        on_device: bool,
        seed: int,  # the epochs' orders are drawn from (seed, epoch): conf/data/cifar10.yaml takes the run's seed
        tta: bool = False,  # read by LitClassifier's test step and by eval.py, not here
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.classes: list[str] = []
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale_shift: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # scale, shift per device
        self.prepared: CifarArrays | None = None

    def prepare_data(self) -> None:
        # Runs once per machine, before any process of a multi-GPU run reads the data: download, or decode into
        # the cache. The arrays are kept for setup() in the same process, which so skips reading them again.
        self.prepared = load_cifar10(self.hparams.root, self.hparams.download, self.hparams.cache_dir)

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        arrays = self.prepared or load_cifar10(self.hparams.root, self.hparams.download, self.hparams.cache_dir)
        self.prepared = None  # the splits below are copies: let the arrays go
        self.classes = arrays.classes
        # The slides' pre-processing step: images come as B×H×W×C (height, width, colour last), nn.Conv2d wants
        # B×C×H×W. torch.permute(0, 3, 1, 2) reorders the axes (a view), and index_select then copies each split
        # out in the new order, for the whole set at once; the images stay uint8.
        train_images = torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2)
        test_images = torch.from_numpy(arrays.test_images).permute(0, 3, 1, 2)
        train_labels, test_labels = torch.from_numpy(arrays.train_labels), torch.from_numpy(arrays.test_labels)

        val_size = self.hparams.val_size
        if not 0 < val_size < len(train_labels):
            raise UserError(f"data.val_size={val_size} must be between 1 and {len(train_labels) - 1}")
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        val_index, train_index = order[:val_size].sort().values, order[val_size:].sort().values
        self.splits = {
            "train": (train_images.index_select(0, train_index), train_labels[train_index]),
            "val": (train_images.index_select(0, val_index), train_labels[val_index]),
            "test": (test_images.contiguous(), test_labels.clone()),
        }
        if self.hparams.on_device and self.trainer is not None:
            # The whole uint8 set (180 MB) moves to the model's device once, so a GPU gathers each batch itself:
            # no host-to-device copy per step. On a CPU this changes nothing.
            device = self.trainer.strategy.root_device
            self.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in self.splits.items()}

    def train_dataloader(self) -> TensorBatches:
        return self.batches("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self.batches("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self.batches("test", self.hparams.eval_batch_size, shuffle=False)

    def batches(self, split: str, batch_size: int, shuffle: bool) -> TensorBatches:
        """Under DDP each process takes its shard: of training, of validation and of the test (whose shards keep
        every image, so torchmetrics' sum over the processes gives the split's exact metrics)."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TensorBatches(*self.splits[split], batch_size, shuffle=shuffle, seed=self.hparams.seed, rank=rank,
                             world_size=world_size, drop_uneven=split == "train")  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the model's device, for the whole batch: uint8 → float, normalise, augment (training only)."""
        if isinstance(batch, torch.Tensor):  # the model summary's example input: images without labels
            return self.normalize(batch)
        images, labels = batch
        images = self.normalize(images)
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images, self.hparams.crop_padding)
        return images, labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 0–255 → float, minus the per-channel mean, over the per-channel std: (x / 255 − mean) / std,
        computed as x · scale + shift in place on one float copy: on a CPU a new batch-sized tensor costs more
        than the arithmetic, and the formula as written makes three."""
        if images.device not in self.scale_shift:
            self.scale_shift[images.device] = scale_and_shift(self.hparams.mean, self.hparams.std, images.device)
        scale, shift = self.scale_shift[images.device]
        return images.to(torch.float32, copy=True).mul_(scale).add_(shift)
