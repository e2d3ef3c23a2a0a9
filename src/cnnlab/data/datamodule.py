"""The LightningDataModule of every data set: the slides' permute once, uint8 splits in memory, on-device normalise
and augment.

The splits are N×C×H×W uint8 tensors (cnnlab.data.sources gives N×H×W×C), on the model's device with
data.on_device; each batch is a slice (cnnlab.data.batches), and the float conversion, normalisation and
augmentation run on the whole batch, on the model's device, in on_after_batch_transfer.
"""

import torch
from lightning import LightningDataModule

from cnnlab import UserError
from cnnlab.data.batches import TensorBatches
from cnnlab.data.pixels import normalise, scale_and_shift
from cnnlab.data.sources import Arrays, channel_stats, load_dataset

VAL_SPLIT_SEED = 0  # the train/val split is fixed: it must not change with the training seed


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding and (with `flip`) random horizontal flip, for a whole B×C×H×W batch at once."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device)
    rows = (dy + torch.arange(height, device=images.device))[:, None, :, None]  # B×1×H×1
    cols = (dx + torch.arange(width, device=images.device))[:, None, None, :]  # B×1×1×W
    if flip:
        mirrored = torch.rand(batch, 1, 1, 1, device=images.device) < 0.5
        cols = torch.where(mirrored, 2 * dx[:, None, None, :] + width - 1 - cols, cols)  # mirror inside the crop
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch_index, channels, rows, cols]


class ImageDataModule(LightningDataModule):
    """One data set (data.name) as uint8 splits: train and validation cut from its training images, and its test."""

    def __init__(
        self,
        name: str,
        root: str,
        download: bool,
        cache_dir: str,
        val_size: int,
        batch_size: int,
        eval_batch_size: int,
        augment: bool,
        crop_padding: int,
        flip: bool,
        mean: list[float] | None,  # None: computed from the training images
        std: list[float] | None,
        on_device: bool,
        channels: str,  # RGB or L: each image is converted to it
        image_size: int | None,  # each image resized to a square of this side; None: the images' own size
        num_classes: int | None,  # None: as many as the data has
        seed: int,  # the epochs' orders are drawn from (seed, epoch): conf/data/cifar10.yaml takes the run's seed
        tta: bool = False,  # read by LitClassifier's test step and by eval.py, not here
        refine_epochs: int = 0,  # the last epochs without crops (flips kept)
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.classes: list[str] = []
        self.mean, self.std = mean, std  # the normalisation's; from the training images when not configured
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale_shift: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # scale, shift per device
        self.prepared: Arrays | None = None

    def load(self) -> Arrays:
        hp = self.hparams
        arrays = load_dataset(hp.name, hp.root, hp.download, hp.cache_dir, hp.image_size, hp.channels)
        if hp.num_classes is not None and hp.num_classes != len(arrays.classes):
            found = len(arrays.classes)
            raise UserError(f"data.num_classes={hp.num_classes}, but data.root={hp.root} has {found} classes: set "
                            f"data.num_classes={found}, or null to follow the data")  # fmt: skip
        return arrays

    def prepare_data(self) -> None:
        # Runs once per machine, before any process of a multi-GPU run reads the data: download, or decode into
        # the cache. The arrays are kept for setup() in the same process, which so skips reading them again.
        if self.prepared is None:  # else read already, for the network to follow (cnnlab.data.sources.follow_the_data)
            self.prepared = self.load()

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        arrays = self.prepared or self.load()
        self.prepared = None  # the splits below are copies: let the arrays go
        self.classes = arrays.classes
        if self.mean is None or self.std is None:  # the same on every process: computed from the same images
            mean, std = channel_stats(arrays.train_images)
            self.mean, self.std = self.mean or mean, self.std or std
        # The slides' pre-processing step: images come as B×H×W×C (height, width, colour last), nn.Conv2d wants
        # B×C×H×W. torch.permute(0, 3, 1, 2) reorders the axes (a view), and index_select then copies each split
        # out in the new order, for the whole set at once; the images stay uint8.
        train_images = torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2)
        test_images = torch.from_numpy(arrays.test_images).permute(0, 3, 1, 2)
        train_labels, test_labels = torch.from_numpy(arrays.train_labels), torch.from_numpy(arrays.test_labels)

        val_size = self.hparams.val_size
        if isinstance(val_size, float):  # a share of the training images
            val_size = max(1, round(val_size * len(train_labels)))
        if not 0 <= val_size < len(train_labels):
            raise UserError(f"data.val_size={val_size} must be between 0 and {len(train_labels) - 1}")
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        val_index, train_index = order[:val_size].sort().values, order[val_size:].sort().values
        self.splits = {
            "train": (train_images.index_select(0, train_index), train_labels[train_index]),
            "test": (test_images.contiguous(), test_labels.clone()),
        }
        if val_size:  # data.val_size=0: every training image trains, and no validation runs (cnnlab.train.build)
            self.splits["val"] = (train_images.index_select(0, val_index), train_labels[val_index])
        if self.hparams.on_device and self.trainer is not None:
            # The whole uint8 set (180 MB for CIFAR-10) moves to the model's device once, so a GPU gathers each batch
            # itself: no host-to-device copy per step. On a CPU this changes nothing.
            device = self.trainer.strategy.root_device
            self.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in self.splits.items()}

    def train_dataloader(self) -> TensorBatches:
        # trainer.overfit_batches (debug=overfit): the same first batches every epoch, as Lightning makes a
        # DataLoader's; it cannot reach into these batches to turn their shuffling off.
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        return self.batches("train", self.hparams.batch_size, shuffle=not overfit)

    def val_dataloader(self) -> TensorBatches | list:
        if "val" not in self.splits:  # data.val_size=0: nothing to validate on
            return []
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
            images = random_crop_flip(images, self.crop_padding_in(self.trainer.current_epoch), self.hparams.flip)
        return images, labels

    def crop_padding_in(self, epoch: int) -> int:
        """The crops' padding in `epoch`: none in the last data.refine_epochs (He et al. 2019, "Data augmentation
        revisited": a network trained on augmented images, refined on images as they are tested, closes the gap
        between the two; flips stay, a mirror image being as natural as the image)."""
        refine = self.hparams.refine_epochs
        last_epochs = self.trainer is not None and epoch >= self.trainer.max_epochs - refine
        return 0 if refine and last_epochs else self.hparams.crop_padding

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 0–255 → float, normalised per channel (cnnlab.data.pixels), with scale and shift kept per device."""
        if images.device not in self.scale_shift:
            self.scale_shift[images.device] = scale_and_shift(self.mean, self.std, images.device)
        return normalise(images, *self.scale_shift[images.device])
