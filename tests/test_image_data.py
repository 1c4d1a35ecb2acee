"""The image data module: the offline default, local image folders, splits, augmentation, clear errors."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lm_moe.data.images import MNIST_5K, ImageDataModule, load_mnist_5k


def make_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 4, mode: str = "RGB",
                      sizes=((12, 10), (9, 9))) -> Path:
    """One sub-folder of small random images per class, of varied sizes; class i is brighter with i."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            bands = 1 if mode == "L" else 3
            pixels = rng.integers(0, 60, (height, width, bands)) + 60 * c
            Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if bands == 1 else pixels.astype(np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


def folder_module(tmp_path: Path, data_dir: Path, **kwargs) -> ImageDataModule:
    settings = {"data_dir": str(data_dir), "batch_size": 2, "cache_dir": str(tmp_path / "cache")}
    return ImageDataModule(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> ImageDataModule:
    module = ImageDataModule(cache_dir=str(tmp_path_factory.mktemp("cache")))
    module.setup("fit")
    return module


def test_offline_default_is_real_mnist_read_through_datasets(mnist):
    raw = load_mnist_5k(mnist.cache_dir)["train"]
    assert isinstance(raw.features["image"], datasets.Image)
    assert raw.features["label"].names == [str(d) for d in range(10)]
    assert len(raw) == 5000 and raw[0]["image"].size == (28, 28)
    assert (mnist.num_classes, mnist.channels, mnist.image_size) == (10, 1, 28)
    # Handwritten digits: mostly black background, every class about a tenth of the images.
    assert 0.10 < mnist.mean[0] < 0.16
    counts = torch.bincount(mnist.train_set.labels, minlength=10)
    assert counts.min() > 350 and counts.max() < 550


def test_default_split_is_seeded_and_disjoint(mnist, tmp_path):
    assert (len(mnist.train_set), len(mnist.val_set)) == (4500, 500)
    again = ImageDataModule(cache_dir=mnist.cache_dir)
    again.setup("fit")
    assert torch.equal(again.val_set.pixels, mnist.val_set.pixels)
    other = ImageDataModule(cache_dir=mnist.cache_dir, seed=7)
    other.setup("fit")
    assert not torch.equal(other.val_set.labels, mnist.val_set.labels)
    # Disjoint: no validation image is also a training image (compare the raw bytes).
    train = {bytes(image.numpy()) for image in mnist.train_set.pixels}
    assert sum(bytes(image.numpy()) in train for image in mnist.val_set.pixels) < 5  # MNIST holds a few duplicates


def test_shuffle_seed_reorders_the_training_batches_and_keeps_the_split(mnist):
    reordered = ImageDataModule(cache_dir=mnist.cache_dir, shuffle_seed=7, crop_padding=0)
    reordered.setup("fit")
    same = ImageDataModule(cache_dir=mnist.cache_dir, crop_padding=0)
    same.setup("fit")
    assert torch.equal(reordered.val_set.pixels, mnist.val_set.pixels)
    first, other = next(iter(same.train_dataloader())), next(iter(reordered.train_dataloader()))
    assert not torch.equal(first["labels"], other["labels"])


def test_batches_are_normalised_images_and_labels(mnist):
    batch = next(iter(mnist.val_dataloader()))
    assert batch["images"].shape == (128, 1, 28, 28) and batch["images"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].unique().numel() > 5
    assert abs(batch["images"].mean().item()) < 0.2 and 0.8 < batch["images"].std().item() < 1.2
    assert next(iter(mnist.train_dataloader()))["images"].shape == (128, 1, 28, 28)


def test_training_images_are_augmented_and_validation_images_are_not(mnist):
    crops = {bytes(mnist.train_set[0]["images"].numpy()) for _ in range(40)}  # a fresh random crop each time
    assert len(crops) > 3  # of the 9 shifts by at most 1 pixel
    assert torch.equal(mnist.val_set[0]["images"], mnist.val_set[0]["images"])
    plain = ImageDataModule(cache_dir=mnist.cache_dir, crop_padding=0)  # no flip by default: digits
    plain.setup("fit")
    assert torch.equal(plain.train_set[0]["images"], plain.train_set[0]["images"])


def test_horizontal_flip_mirrors_some_training_images(tmp_path):
    module = folder_module(tmp_path, make_image_folder(tmp_path / "images"), crop_padding=0, horizontal_flip=True,
                           image_size=8)
    module.setup("fit")
    image = module.train_set.pixels[0]
    views = {bytes(module.train_set[0]["images"].numpy()) for _ in range(30)}
    assert len(views) == 2 and not torch.equal(image, image.flip(-1))


def test_image_folder_gives_classes_channels_and_resized_images(tmp_path):
    module = folder_module(tmp_path, make_image_folder(tmp_path / "images"), image_size=8, val_fraction=0.25)
    assert module.class_names == ["cat", "dog", "owl"] and module.num_classes == 3 and module.channels == 3
    module.setup("fit")
    assert module.train_set.pixels.shape == (9, 3, 8, 8) and module.val_set.pixels.shape == (3, 3, 8, 8)
    # Brightness follows the class: the labels are the folders' classes.
    brightness = module.train_set.pixels.float().mean(dim=(1, 2, 3))
    for c in range(3):
        assert (brightness[module.train_set.labels == c] // 60 == c).all()


def test_image_size_defaults_to_the_shorter_side_of_the_first_image(tmp_path):
    module = folder_module(tmp_path, make_image_folder(tmp_path / "images", sizes=((12, 10),)))
    assert module.image_size == 10


def test_validation_and_test_folders_are_used_when_present(tmp_path):
    root = tmp_path / "images"
    for split, count in (("train", 4), ("validation", 2), ("test", 3)):
        make_image_folder(root / split, per_class=count)
    module = folder_module(tmp_path, root, image_size=8)
    module.setup(None)
    assert (len(module.train_set), len(module.val_set), len(module.test_set)) == (12, 6, 9)


def test_test_falls_back_to_the_validation_images(tmp_path):
    module = folder_module(tmp_path, make_image_folder(tmp_path / "images"), image_size=8)
    module.setup("test")
    assert module.test_set is module.val_set


def test_labels_from_a_plain_column_are_mapped_to_sorted_classes(tmp_path):
    """A parquet data set with its own column names and string labels, the way Hub data sets come."""
    rng = np.random.default_rng(0)
    rows = {"picture": [Image.fromarray(rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)) for _ in range(6)],
            "kind": ["zebra", "ant", "moth", "ant", "zebra", "moth"]}
    (tmp_path / "parquet").mkdir()
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    module = ImageDataModule(dataset="parquet", data_dir=str(tmp_path / "parquet"), label_column="kind",
                             image_size=6, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert module.image_column == "picture" and module.class_names == ["ant", "moth", "zebra"]
    module.setup("fit")
    names = [module.class_names[label] for label in torch.cat([module.train_set.labels, module.val_set.labels])]
    assert sorted(names) == sorted(rows["kind"])


def test_grayscale_data_with_channels_3_is_refused_unless_conversion_is_asked_for(tmp_path):
    data_dir = make_image_folder(tmp_path / "images", mode="L")
    assert folder_module(tmp_path, data_dir).channels == 1
    with pytest.raises(ValueError, match=r"is grayscale \(1 channel\) but channels=3.*convert_channels"):
        folder_module(tmp_path, data_dir, channels=3)
    converted = folder_module(tmp_path, data_dir, channels=3, convert_channels=True, image_size=8)
    converted.setup("fit")
    assert next(iter(converted.train_dataloader()))["images"].shape == (2, 3, 8, 8)
    assert torch.equal(converted.train_set.pixels[:, 0], converted.train_set.pixels[:, 2])  # grey replicated


def test_rgb_data_with_channels_1_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is RGB \(3 channels\) but channels=1"):
        folder_module(tmp_path, make_image_folder(tmp_path / "images"), channels=1)


def test_mnist_asked_for_in_rgb_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"dataset='{MNIST_5K}' is grayscale"):
        ImageDataModule(channels=3, cache_dir=str(tmp_path))


def test_unknown_dataset_is_a_clear_error_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"could not load dataset 'no-such/dataset'.*offline default is '{MNIST_5K}'"):
        ImageDataModule(dataset="no-such/dataset", cache_dir=str(tmp_path))


def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        folder_module(tmp_path, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files found"):
        folder_module(tmp_path, tmp_path / "empty")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_column": "class"}, r"label_column 'class' is not in .*available columns: \['image', 'label'\]"),
        ({"image_column": "picture"}, r"image_column 'picture' is not in .*available columns"),
        ({"image_column": "label"}, "image_column 'label' holds .*not images"),
        ({"val_split": "dev"}, r"val_split 'dev' is not a split .*\['train'\]"),
        ({"channels": 2}, "channels must be 1"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \(0, 1\), got 1.0"),
        ({"val_fraction": 0}, r"val_fraction must be a number in \(0, 1\), got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"crop_padding": -1}, "crop_padding must be an integer >= 0, got -1"),
        ({"num_workers": -2}, "num_workers must be an integer >= 0, got -2"),
        ({"mean": [0.5, 0.5]}, "mean must have one value per channel"),
        ({"std": [0.0, 1.0, 1.0]}, "std must be positive"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean must be finite numbers, got \\[0.5, nan, 0.5\\]"),
        ({"std": [1.0, float("inf"), 1.0]}, "std must be finite numbers"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        folder_module(tmp_path, make_image_folder(tmp_path / "images"), **kwargs)


def test_a_truncated_image_is_named_in_the_error(tmp_path):
    folder = make_image_folder(tmp_path / "images", sizes=((64, 64),))
    damaged = folder / "dog" / "2.png"
    damaged.write_bytes(damaged.read_bytes()[:300])  # a header, and only the start of the pixels
    module = folder_module(tmp_path, folder, image_size=8)
    with pytest.raises(ValueError, match=r"image \d+ \(.*dog/2.png\) of the 'train' split of data_dir=.* could not be read"):
        module.setup("fit")


def test_too_few_training_images_for_one_batch_is_refused(tmp_path):
    module = folder_module(tmp_path, make_image_folder(tmp_path / "images"), batch_size=64, image_size=8)
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        module.setup("fit")


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("dark", "bright"):
        (tmp_path / "images" / name).mkdir(parents=True)
    values = {}
    for i in range(4):
        for name, offset in (("dark", 0), ("bright", 30000)):
            pixels = (rng.integers(0, 30000, (8, 8)) + offset).astype(np.uint16)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
            values[(name, i)] = pixels
    module = folder_module(tmp_path, tmp_path / "images", image_size=8, val_fraction=0.25)
    assert module.channels == 1
    module.setup("fit")
    pixels = torch.cat([module.train_set.pixels, module.val_set.pixels]).double()  # [8, 1, 8, 8]
    expected = torch.from_numpy(np.stack(list(values.values()))).double() / 257
    # The same multiset of 8-bit values as the 16-bit ones divided by 257 (the split reorders images).
    torch.testing.assert_close(pixels.flatten().sort().values, expected.round().flatten().sort().values, rtol=0, atol=0)


def test_float_images_are_refused_by_mode(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32)).save(tmp_path / "images" / name / f"{i}.tiff")
    module = folder_module(tmp_path, tmp_path / "images", image_size=6, val_fraction=0.25)
    with pytest.raises(ValueError, match="float images .*mode 'F'"):
        module.setup("fit")


@pytest.mark.parametrize("first_mode, other_mode, kind", [("L", "RGB", "colour"), ("RGB", "L", "grayscale")])
def test_an_image_of_the_other_kind_is_refused_unless_conversion_is_asked_for(tmp_path, first_mode, other_mode, kind):
    data_dir = make_image_folder(tmp_path / "images", mode=first_mode)
    Image.new(other_mode, (9, 9)).save(data_dir / "owl" / "odd.png")
    with pytest.raises(ValueError, match=f"split of data_dir=.* is {kind} \\(PIL mode '{other_mode}'\\).*convert_channels"):
        folder_module(tmp_path, data_dir, image_size=8).setup("fit")
    converted = folder_module(tmp_path, data_dir, image_size=8, convert_channels=True)
    converted.setup("fit")
    assert converted.train_set.pixels.shape[1] == (1 if first_mode == "L" else 3)


def test_imagefolder_without_a_folder_is_refused(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "stray")  # what the builder would pick up from the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="dataset 'imagefolder' reads a local folder: set data.data_dir"):
        ImageDataModule(dataset="imagefolder", cache_dir=str(tmp_path / "cache"))
