"""Tests for harness/data (datasets.py, batches.py, releases.py): readers, decode cache, batch loader, prepare, synthetic data (CPU, fast)."""
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from conftest import process_of, start_forkserver
import fixtures
from harness.data import batches as batching
from harness.data import datasets
from harness.data import releases
from harness.data.datasets import DataError

ROOT = Path(__file__).resolve().parents[1]
start_forkserver()   # the real process below forks from it; its imports run meanwhile

MEAN = torch.tensor(datasets.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(datasets.IMAGENET_STD).view(1, 3, 1, 1)
# VPT's FGVC eval transform (KMnP/vpt src/data/transforms.py, size 224)
VPT_EVAL = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])


def normalize(uint8_images):
    return (uint8_images.float() / 255 - MEAN) / STD


def unnormalize(images):
    """Loader output back to uint8, checking it is exactly (x / 255 - mean) / std of integer pixels."""
    restored = (images * STD + MEAN) * 255
    assert torch.allclose(restored, restored.round(), atol=1e-3)
    return restored.round().to(torch.uint8)


def ragged(images, labels=None, task="cub", split="train"):
    """ImageSplit of uint8 [3, h, w] images of different sizes, packed back to back."""
    pixels = torch.cat([image.permute(1, 2, 0).reshape(-1, 3) for image in images])
    sizes = torch.tensor([list(image.shape[1:]) for image in images])
    areas = sizes[:, 0] * sizes[:, 1]
    labels = torch.arange(len(images)) if labels is None else labels
    return datasets.ImageSplit(task, split, pixels, torch.cumsum(areas, 0) - areas, sizes, labels)


def random_images(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]


def real_rows(batches):
    """Concatenated (images, labels) of loader batches without the PAD_LABEL rows."""
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    return images[labels != batching.PAD_LABEL], labels[labels != batching.PAD_LABEL]


def nearest_class_by_colour(split, num_classes):
    """Predict classes of a split's synthetic images from their mean colour (seed-independent colours)."""
    reference, labels = datasets.make_synthetic_images(num_classes, 20, 32, seed=123)
    centroids = torch.stack([reference[labels == c].float().mean((0, 2, 3)) for c in range(num_classes)])
    colours = torch.stack([split.image(n).float().mean((1, 2)) for n in range(len(split))])
    return torch.cdist(colours, centroids).argmin(1)


# --- registries -------------------------------------------------------------------------------


def test_registries_and_metadata():
    assert {k: v.num_classes for k, v in datasets.FGVC_DATASETS.items()} == {
        "cub": 200, "nabirds": 555, "flowers": 102, "cars": 196, "dogs": 120}
    assert datasets.FGVC_DATASETS["dogs"].image_dir == "Images" and datasets.FGVC_DATASETS["cars"].image_dir == ""
    assert datasets.FGVC_DATASETS["nabirds"].split_sizes == (21536, 2393, 24633)
    assert len(datasets.VTAB_TASKS) == 19
    groups = [v.group for v in datasets.VTAB_TASKS.values()]
    assert groups == ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8
    assert list(datasets.VTAB_TASKS)[:2] == ["cifar", "caltech101"] and list(datasets.VTAB_TASKS)[-1] == "smallnorb_ele"
    assert datasets.num_classes("sun397") == 397 and datasets.num_classes("cub") == 200
    assert datasets.task_kind("kitti") == "vtab" and datasets.task_kind("cars") == "fgvc"
    assert datasets.split_names("cub", "final") == ("train", "test")
    assert datasets.split_names("cub", "sweep") == ("train", "val")
    assert datasets.split_names("dtd", "final") == ("train800val200", "test")
    assert datasets.split_names("dtd", "sweep") == ("train800", "val200")
    with pytest.raises(ValueError):
        datasets.task_kind("imagenet")


# --- dataset folders --------------------------------------------------------------------------


def test_dataset_root_accepts_release_folder_names(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    assert datasets.dataset_root("cub", tmp_path) == tmp_path / "CUB_200_2011"
    (tmp_path / "cub").mkdir()
    assert datasets.dataset_root("cub", tmp_path) == tmp_path / "cub"  # our own name comes first
    (tmp_path / "stanford_cars").mkdir()
    assert datasets.dataset_root("cars", tmp_path) == tmp_path / "stanford_cars"
    (tmp_path / "VTAB-1k" / "dtd").mkdir(parents=True)
    assert datasets.dataset_root("dtd", tmp_path) == tmp_path / "VTAB-1k"
    (tmp_path / "vtab-1k" / "svhn").mkdir(parents=True)  # vtab-1k/ exists but lacks dtd/
    assert datasets.dataset_root("dtd", tmp_path) == tmp_path / "VTAB-1k"
    assert datasets.dataset_root("svhn", tmp_path) == tmp_path / "vtab-1k"


@pytest.mark.parametrize("task", ["dogs", "eurosat"])
def test_dataset_root_missing_lists_every_accepted_path(tmp_path, task):
    with pytest.raises(DataError) as err:
        datasets.dataset_root(task, tmp_path)
    names = datasets.DATASET_FOLDERS[task if task in datasets.FGVC_DATASETS else "vtab"]
    assert all(str(tmp_path / name) in str(err.value) for name in names) and len(names) >= 3
    url = datasets.FGVC_DATASETS[task].url if task in datasets.FGVC_DATASETS else datasets.VTAB_URL
    assert url in str(err.value)


def test_prepare_and_load_in_unpacked_release_folder(tmp_path):
    """CUB straight from CUB_200_2011.tgz: data/CUB_200_2011/{images.txt, ..., images/}."""
    release = fixtures.write_release_fixture(tmp_path / "data" / "CUB_200_2011", "cub", num_classes=3)
    root = datasets.dataset_root("cub", tmp_path / "data")
    assert root == release
    sizes = releases.prepare("cub", root)
    paths, labels = datasets.read_split("cub", root, "test")
    assert len(paths) == sizes["test"] == 12 and sorted(set(labels)) == [0, 1, 2]
    assert all(path.startswith(str(release / "images")) and Path(path).is_file() for path in paths)


# --- readers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(datasets.FGVC_DATASETS))
def test_fgvc_fixture_reads_back(tmp_path, dataset):
    root = fixtures.write_fgvc_fixture(tmp_path / dataset, dataset, per_class=(3, 1, 2))
    image_dir = root / datasets.FGVC_DATASETS[dataset].image_dir
    assert all((image_dir / key).is_file() for key in json.loads((root / "train.json").read_text()))

    for split, count in zip(datasets.FGVC_SPLITS, (3, 1, 2)):
        paths, labels = datasets.read_split(dataset, root, split)
        anno = json.loads((root / f"{split}.json").read_text())
        assert paths == [str(image_dir / key) for key in anno]
        assert labels == list(anno.values()) and sorted(set(labels)) == [0, 1, 2]  # 0-based ids used as is
    loaded = datasets.load_splits(dataset, root, datasets.FGVC_SPLITS)
    assert {name: len(split) for name, split in loaded.items()} == {"train": 9, "val": 3, "test": 6}
    test = loaded["test"]
    assert test.task == dataset and test.split == "test"
    # 48x36 (w x h) fixture images -> shorter side 256, longer int(256 * 48 / 36) = 341, kept whole
    assert test.sizes.tolist() == [[256, 341]] * 6 and test.offsets.tolist() == [256 * 341 * n for n in range(6)]
    assert test.pixels.shape == (6 * 256 * 341, 3) and test.pixels.dtype == torch.uint8
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == datasets.read_split(dataset, root, "test")[1]
    assert torch.equal(nearest_class_by_colour(test, 3), test.labels)


def write_json(root, split, anno):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.json").write_text(json.dumps(anno))


def test_fgvc_ids_in_range_are_indices(tmp_path):
    """Ids in 0..C-1 are used as is, even when a split (or all of them) lacks some classes."""
    write_json(tmp_path, "train", {"a.jpg": 7, "b.jpg": 3, "c.jpg": 199})
    write_json(tmp_path, "test", {"d.jpg": 199, "e.jpg": 3})
    assert datasets.read_split("cub", tmp_path, "train")[1] == [7, 3, 199]
    assert datasets.read_split("cub", tmp_path, "test")[1] == [199, 3]


def test_fgvc_official_ids_map_by_sorted_order(tmp_path):
    """Ids outside 0..C-1 (NABirds-like: non-contiguous) map by sorted order when exactly C distinct."""
    official = [295 + 3 * k for k in range(102)]  # 102 = Flowers' class count
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in reversed(official)})
    write_json(tmp_path, "val", {"v.jpg": official[-1], "w.jpg": official[5]})
    assert datasets.read_split("flowers", tmp_path, "train")[1] == list(reversed(range(102)))
    assert datasets.read_split("flowers", tmp_path, "val")[1] == [101, 5]  # the union's mapping, not val's own
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in range(1, 103)})  # 1-based official ids
    write_json(tmp_path, "val", {"v.jpg": 102})
    assert datasets.read_split("flowers", tmp_path, "val")[1] == [101]


def test_fgvc_stray_class_id_is_rejected(tmp_path):
    """A CUB train.json with ids 0..199 plus a stray 999 must not train a 201st class."""
    train = {f"{cid}.jpg": cid for cid in range(200)} | {"stray.jpg": 999}
    write_json(tmp_path, "train", train)
    write_json(tmp_path, "test", {"t.jpg": 0})
    for split in ("train", "test"):  # reading any split checks every split file
        with pytest.raises(DataError, match=r"train\.json: image 'stray\.jpg' has class id 999, outside 0\.\.199"):
            datasets.read_split("cub", tmp_path, split)
    # 1-based ids missing a class: neither all in range nor exactly 200 distinct ids
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in range(2, 201)})
    write_json(tmp_path, "test", {"t.jpg": 2})
    with pytest.raises(DataError, match=r"'200\.jpg' has class id 200.*they hold 199"):
        datasets.read_split("cub", tmp_path, "train")


@pytest.mark.parametrize("bad_id", ["3", 3.0, True, None])
def test_fgvc_non_integer_class_id_is_rejected(tmp_path, bad_id):
    write_json(tmp_path, "train", {"a.jpg": 1, "b.jpg": bad_id})
    with pytest.raises(DataError, match=r"train\.json: image 'b\.jpg'.*must be integers"):
        datasets.read_split("cub", tmp_path, "train")


def test_fgvc_eval_ids_must_occur_in_train(tmp_path):
    write_json(tmp_path, "train", {"a.jpg": 0, "b.jpg": 1})
    write_json(tmp_path, "val", {"c.jpg": 1})
    write_json(tmp_path, "test", {"d.jpg": 0, "e.jpg": 2})
    for split in ("train", "val", "test"):
        with pytest.raises(DataError, match=r"test\.json: image 'e\.jpg' has class id 2, which no image in .*train"):
            datasets.read_split("dogs", tmp_path, split)
    write_json(tmp_path, "test", {"d.jpg": 0})
    assert datasets.read_split("dogs", tmp_path, "test")[1] == [0]


def test_vtab_fixture_reads_back(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "eurosat", num_classes=4, per_class=(3, 2, 2), image_size=(40, 24))
    sizes = {"train800": 12, "val200": 8, "train800val200": 20, "test": 8}
    loaded = datasets.load_splits("eurosat", tmp_path, list(sizes))
    for split, size in sizes.items():
        assert len(loaded[split]) == size and loaded[split].sizes.tolist() == [[224, 224]] * size
        assert loaded[split].pixels.shape == (size * 224 * 224, 3)
        assert torch.equal(nearest_class_by_colour(loaded[split], 4), loaded[split].labels)
    paths, labels = datasets.read_split("eurosat", tmp_path, "train800val200")
    train_paths, _ = datasets.read_split("eurosat", tmp_path, "train800")
    assert paths[:12] == train_paths and paths[0] == str(tmp_path / "eurosat" / "images/train800/00000.jpg")
    for n in (0, 19):  # the TF-style resize of the decoded file, exactly
        raw = torch.from_numpy(np.array(Image.open(paths[n]).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(loaded["train800val200"].image(n), datasets.resize_like_tf(raw, 224))


def test_resized_size_matches_torchvision_resize_256():
    rng = np.random.default_rng(0)
    shapes = [(256, 256), (256, 420), (420, 256), (200, 201), (201, 200), (36, 48), (1000, 37)]
    shapes += [tuple(int(v) for v in rng.integers(20, 900, 2)) for _ in range(100)]
    for width, height in shapes:
        resized = T.Resize(256)(Image.new("RGB", (width, height)))
        assert datasets.resized_size(width, height) == (resized.height, resized.width), (width, height)


def test_fgvc_cache_keeps_the_whole_resized_image_and_eval_equals_vpt(tmp_path):
    """Cached image = torchvision Resize(256) of the file; eval batches = VPT's eval transform, exactly."""
    rng = np.random.default_rng(0)
    # (width, height): landscape, portrait, already short side 256 (no resize), odd centre-crop margin
    shapes = ((300, 201), (199, 333), (420, 256), (200, 201))
    anno = {}
    for n, (width, height) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
        anno[f"{n}.png"] = n
    write_json(tmp_path, "train", anno)
    write_json(tmp_path, "test", anno)
    split = datasets.load_splits("cars", tmp_path, ["test"])["test"]
    files = [Image.open(tmp_path / f"{n}.png").convert("RGB") for n in range(len(shapes))]
    for n, (file, (width, height)) in enumerate(zip(files, shapes)):
        expected = torch.from_numpy(np.array(T.Resize(256)(file))).permute(2, 0, 1)
        assert tuple(split.sizes[n].tolist()) == datasets.resized_size(width, height) == tuple(expected.shape[1:])
        assert torch.equal(split.image(n), expected)
    images, labels = real_rows(list(batching.BatchLoader(split, 3, train=False)))
    assert torch.equal(labels, torch.arange(4))
    for n, file in enumerate(files):
        assert torch.equal(images[n], VPT_EVAL(file))


def test_vtab_resize_is_vpts_tf1_bilinear():
    """VPT's tensorflow.compat.v1 tf.image.resize: output pixel d samples source d * in/out (no half-pixel
    offset), lerp between floor and the next pixel (clamped at the border). Worked by hand."""
    ramp = torch.tensor([[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100, 110], [120, 130, 140, 150]])
    image = ramp.to(torch.uint8).expand(3, 4, 4)
    # 4 -> 2: samples at 0 and 2 exactly (TF2's half-pixel centres would average 2x2 blocks: 25, 45, ...)
    assert torch.equal(datasets.resize_like_tf(image, 2), torch.tensor([[0, 20], [80, 100]]).expand(3, 2, 2))
    # 4 -> 3: samples at 0, 4/3, 8/3: 10 * (4/3) = 13.33 -> 13, 26.67 -> 27 along a row, 40 x that down
    assert torch.equal(datasets.resize_like_tf(image, 3)[0], torch.tensor([[0, 13, 27], [53, 67, 80], [107, 120, 133]]))
    # 2 -> 4: samples at 0, 0.5, 1, 1.5 (-> 1): weights 1 | 1/2 + 1/2 | 1 | 1 (clamped)
    image = torch.tensor([[0, 40], [80, 120]], dtype=torch.uint8).expand(3, 2, 2)
    expected = torch.tensor([[0, 20, 40, 40], [40, 60, 80, 80], [80, 100, 120, 120], [80, 100, 120, 120]])
    assert torch.equal(datasets.resize_like_tf(image, 4), expected.expand(3, 4, 4))


def test_vtab_resize_does_not_antialias():
    """896 -> 224 samples exactly source column 4d; PIL's antialiased bilinear averages ~8 columns instead."""
    row = torch.tensor([255 if x % 4 == 0 else 0 for x in range(896)], dtype=torch.uint8)
    image = row.expand(3, 896, 896)
    assert torch.equal(datasets.resize_like_tf(image, 224), torch.full((3, 224, 224), 255, dtype=torch.uint8))
    pil = np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((224, 224), Image.BILINEAR))
    assert 40 < pil.mean() < 90  # about 255 / 4


def test_every_split_list_is_checked_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started before every split list was checked")

    monkeypatch.setattr(datasets, "image_sizes", no_decoding)
    monkeypatch.setattr(datasets, "decode_images", no_decoding)
    fixtures.write_vtab_fixture(tmp_path, "svhn")
    (tmp_path / "svhn" / "test.txt").write_text("images/test/00000.jpg 11\n")  # svhn has 10 classes
    with pytest.raises(DataError, match=r"test\.txt:1: label 11"):
        datasets.load_splits("svhn", tmp_path, ["train800val200", "test"])
    root = fixtures.write_fgvc_fixture(tmp_path / "cub", "cub")
    val = json.loads((root / "val.json").read_text())
    write_json(root, "val", val | {"extra.jpg": 5})  # class 5 is not in train.json
    with pytest.raises(DataError, match=r"val\.json: image 'extra\.jpg' has class id 5"):
        datasets.load_splits("cub", root, ["train", "test"])


# --- ImageSplit and loader ----------------------------------------------------------------------


def test_image_split_from_dense_and_ragged_views():
    images, labels = datasets.make_synthetic_images(3, 2, 10)
    split = datasets.ImageSplit.from_dense("demo", "train", images, labels)
    assert len(split) == 6 and split.pixels.shape == (600, 3) and split.pixels.dtype == torch.uint8
    assert split.offsets.tolist() == [0, 100, 200, 300, 400, 500] and split.sizes.tolist() == [[10, 10]] * 6
    assert torch.equal(split.labels, labels) and split.labels.dtype == torch.int64
    assert all(torch.equal(split.image(n), images[n]) for n in range(6))
    shapes = [(9, 14), (16, 8), (8, 8)]
    images = random_images(shapes)
    split = ragged(images)
    assert split.offsets.tolist() == [0, 126, 254] and split.pixels.shape == (318, 3)
    assert all(torch.equal(split.image(n), images[n]) for n in range(3))


def test_train_order_is_pure_function_of_seed_and_epoch():
    split = datasets.ImageSplit.from_dense("demo", "train", *datasets.make_synthetic_images(5, 7, 12))

    def loader(batch_size=4, seed=42):
        return batching.BatchLoader(split, batch_size, train=True, augment=True, crop_size=8, seed=seed)

    first, second = loader(), loader()
    second.set_epoch(3)
    list(second)  # iterating another epoch first must not change epoch 1
    first.set_epoch(1)
    second.set_epoch(1)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    order = first.sample_indices(1)
    assert sorted(order.tolist()) == list(range(35))
    assert not torch.equal(order, first.sample_indices(2))
    assert torch.equal(order, loader(batch_size=16).sample_indices(1))
    assert torch.equal(first.sample_crops(1), loader(batch_size=16).sample_crops(1))
    assert not torch.equal(order, loader(seed=43).sample_indices(1))
    first.set_epoch(1)
    assert torch.equal(real_rows(list(first))[1], split.labels[order])


def test_random_crops_cover_each_images_own_extent():
    """VPT's RandomCrop(224) after Resize(256): offsets anywhere in the whole resized image."""
    base = ragged([torch.zeros(3, 256, 420, dtype=torch.uint8), torch.zeros(3, 420, 256, dtype=torch.uint8)])
    n = 200  # alternately the wide and the tall image (offsets may point at the same pixels)
    split = datasets.ImageSplit("cub", "train", base.pixels, base.offsets.repeat(n // 2),
                            base.sizes.repeat(n // 2, 1), torch.zeros(n, dtype=torch.int64))
    loader = batching.BatchLoader(split, 64, train=True, augment=True)
    indices = torch.cat([loader.sample_indices(epoch) for epoch in range(40)])
    crops = torch.cat([loader.sample_crops(epoch) for epoch in range(40)])
    wide = indices % 2 == 0
    for rows, long_axis in ((wide, 1), (~wide, 0)):
        along, across = crops[rows, long_axis], crops[rows, 1 - long_axis]
        assert along.min() == 0 and along.max() == 420 - 224 and across.min() == 0 and across.max() == 256 - 224
        counts = torch.bincount(along, minlength=197)
        assert len(counts) == 197 and (counts > 0).all()  # every offset 0..196 occurs in 4000 draws
        quarters = torch.tensor([counts[:50].sum(), counts[50:100].sum(), counts[100:150].sum(), counts[150:].sum()])
        expected = torch.tensor([50, 50, 50, 47]) / 197 * len(along)
        assert ((quarters - expected).abs() < 0.15 * expected).all(), quarters
    assert 0.45 < crops[:, 2].float().mean() < 0.55  # flip probability 0.5
    centre = batching.BatchLoader(split, 64, train=False).sample_crops()
    assert centre[0].tolist() == [16, 98, 0] and centre[1].tolist() == [98, 16, 0]


def test_train_batches_are_true_crops_and_mirrors():
    shapes = [(12, 17), (15, 12), (12, 12), (20, 13), (8, 30)] * 3
    split = ragged(random_images(shapes))
    loader = batching.BatchLoader(split, 4, train=True, augment=True, crop_size=8, seed=5)
    flips, offsets = 0, set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (4,) for x, y in batches)
        images, labels = real_rows(batches)
        indices, crops = loader.sample_indices(epoch), loader.sample_crops(epoch)
        assert torch.equal(labels, split.labels[indices])
        for out, n, (top, left, flip) in zip(unnormalize(images), indices.tolist(), crops.tolist()):
            height, width = split.sizes[n].tolist()
            assert 0 <= top <= height - 8 and 0 <= left <= width - 8
            expected = split.image(n)[:, top:top + 8, left:left + 8]
            assert torch.equal(out, expected.flip(-1) if flip else expected)
            flips += flip
            offsets.add((n, top, left))
    assert 10 <= flips <= 35 and len(offsets) > 30


def test_center_crops_equal_torchvision():
    images, labels = datasets.make_synthetic_images(3, 3, 256)
    loader = batching.BatchLoader(datasets.ImageSplit.from_dense("demo", "test", images, labels), 4, train=False)
    outputs, _ = real_rows(list(loader))
    assert torch.equal(outputs, normalize(T.CenterCrop(224)(images))) and len(loader) == 3
    shapes = [(11, 13), (8, 8), (14, 9), (9, 20)]  # odd margins: torchvision rounds (size - crop) / 2
    images = random_images(shapes)
    for train in (False, True):  # train without augment: centre crop too
        loader = batching.BatchLoader(ragged(images), 3, train=train, crop_size=8)
        outputs, _ = real_rows(list(loader))
        for out, n in zip(outputs, loader.sample_indices().tolist()):
            assert torch.equal(out, normalize(T.CenterCrop(8)(images[n]))[0])


def test_last_batch_is_padded_to_a_static_shape():
    images, labels = datasets.make_synthetic_images(5, 2, 12)
    split = datasets.ImageSplit.from_dense("demo", "test", images, labels)
    batches = list(batching.BatchLoader(split, 4, train=False, crop_size=8))
    (whole_x, whole_y), = list(batching.BatchLoader(split, 10, train=False, crop_size=8))
    assert len(batches) == 3 and all(x.shape == (4, 3, 8, 8) and y.shape == (4,) for x, y in batches)
    x, y = batches[-1]
    assert y[2:].tolist() == [batching.PAD_LABEL] * 2 and torch.equal(y[:2], labels[8:])
    assert torch.equal(torch.cat([x for x, _ in batches])[:10], whole_x) and torch.equal(whole_y, labels)
    assert torch.equal(x[2:], whole_x[:2])  # padding repeats real samples' images
    logits = torch.randn(4, 5)
    assert torch.allclose(F.cross_entropy(logits, y), F.cross_entropy(logits[:2], y[:2]))
    train = batching.BatchLoader(split, 4, train=True, augment=True, crop_size=8)
    batches = list(train)
    assert len(batches) == 3 and all(x.shape == (4, 3, 8, 8) for x, _ in batches)
    assert sorted(real_rows(batches)[1].tolist()) == sorted(labels.tolist()) and train.num_samples == 10


def test_loader_rejects_images_smaller_than_the_crop():
    split = ragged(random_images([(12, 12), (12, 7)]))
    with pytest.raises(ValueError, match="smallest side here: 7"):
        batching.BatchLoader(split, 2, train=False, crop_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("images_on_device", [False, True])
def test_cuda_batches_match_cpu_without_host_syncs(images_on_device):
    split = ragged(random_images([(12, 17), (15, 12), (12, 12), (20, 13)] * 5), torch.arange(20) % 4)
    settings = dict(train=True, augment=True, crop_size=8, seed=3)
    expected = list(batching.BatchLoader(split, 6, **settings))
    loader = batching.BatchLoader(split, 6, device="cuda", images_on_device=images_on_device, **settings)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == len(expected) == len(loader)
    for (x, y), (x_cpu, y_cpu) in zip(batches, expected):
        assert x.is_cuda and y.is_cuda and torch.allclose(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_eval_covers_every_index_once(world_size):
    images, labels = datasets.make_synthetic_images(11, 1, 8)  # N = 11, not divisible by 2 or 3
    split = datasets.ImageSplit.from_dense("demo", "test", images, labels)
    indices, gathered = [], []
    for rank in range(world_size):
        loader = batching.BatchLoader(split, 2, train=False, crop_size=8, rank=rank, world_size=world_size)
        indices.append(loader.sample_indices())
        gathered.append(real_rows(list(loader))[1])
        assert loader.num_samples == len(indices[-1]) and len(loader) == math.ceil(loader.num_samples / 2)
    assert torch.equal(torch.cat(indices), torch.arange(11))
    assert torch.equal(torch.cat(gathered), labels)
    assert [batching.shard_range(11, r, world_size) for r in range(world_size)][-1][1] == 11
    empty = batching.BatchLoader(split, 2, train=False, crop_size=8, rank=0, world_size=12)  # 11 images, 12 ranks
    assert empty.num_samples == len(empty) == 0 and list(empty) == []


def test_sharded_train_has_equal_counts_and_covers_all():
    images, labels = datasets.make_synthetic_images(10, 1, 8)
    split = datasets.ImageSplit.from_dense("demo", "train", images, labels)
    shards = [batching.BatchLoader(split, 3, train=True, crop_size=8, rank=r, world_size=3, seed=7) for r in range(3)]
    orders = [s.sample_indices(5) for s in shards]
    assert [len(o) for o in orders] == [4, 4, 4] and {len(s) for s in shards} == {2}
    assert {s.num_samples for s in shards} == {4}
    assert set(torch.cat(orders).tolist()) == set(range(10))
    for shard in shards:
        batches = list(shard)
        assert [len(y) for _, y in batches] == [3, 3] and len(real_rows(batches)[1]) == 4


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="cub_200_2011") as err:
        datasets.load_splits("cub", tmp_path / "nowhere", ["train"])
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DataError) as err:
        datasets.load_splits("dtd", tmp_path, ["test"])
    assert str(tmp_path / "dtd") in str(err.value) and datasets.VTAB_URL in str(err.value)


def test_missing_split_file(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "dogs", "dogs")
    (root / "val.json").unlink()
    with pytest.raises(DataError, match="val.json"):
        datasets.load_splits("dogs", root, ["train", "val"])
    assert len(datasets.load_splits("dogs", root, ["test"])["test"]) == 6  # other splits still load
    fixtures.write_vtab_fixture(tmp_path, "dmlab")
    (tmp_path / "dmlab" / "val200.txt").unlink()
    with pytest.raises(DataError, match="val200.txt"):
        datasets.load_splits("dmlab", tmp_path, ["val200"])


def test_malformed_lines(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "svhn")
    list_file = tmp_path / "svhn" / "test.txt"
    lines = list_file.read_text().splitlines()
    lines[2] = "images/test/00002.jpg"  # label missing
    list_file.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"test\.txt:3: malformed"):
        datasets.read_split("svhn", tmp_path, "test")
    root = fixtures.write_fgvc_fixture(tmp_path / "cub", "cub")
    (root / "train.json").write_text('{"a.jpg": 1,\n "b.jpg" 2}')
    with pytest.raises(DataError, match=r"train\.json:2: malformed json"):
        datasets.read_split("cub", root, "test")
    (root / "train.json").write_text('{"a.jpg": 1, "b.jpg": "2"}')
    with pytest.raises(DataError, match=r"train\.json.*'b.jpg'"):
        datasets.read_split("cub", root, "train")


def test_label_out_of_range(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "patch_camelyon", num_classes=2)
    list_file = tmp_path / "patch_camelyon" / "train800.txt"
    list_file.write_text(list_file.read_text() + "images/train800/00000.jpg 2\n")
    with pytest.raises(DataError, match=r"train800\.txt:7: label 2 out of range"):
        datasets.read_split("patch_camelyon", tmp_path, "train800")
    root = tmp_path / "flowers"
    root.mkdir()
    (root / "train.json").write_text(json.dumps({f"jpg/{i}.jpg": i for i in range(103)}))
    with pytest.raises(DataError, match=r"train\.json: image 'jpg/102.jpg'.*102 classes"):
        datasets.read_split("flowers", root, "train")


LATIN1_NAME = b"caf\xe9.jpg"   # "cafe" with an e-acute, as Latin-1 bytes: not UTF-8


def latin1_named_copy(task_dir, rel_path):
    """A copy of task_dir/rel_path named with Latin-1 bytes (what unpacking an old archive gives)."""
    target = os.fsencode(task_dir / Path(rel_path).parent) + b"/" + LATIN1_NAME
    with open(task_dir / rel_path, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    return os.fsdecode(target)


def test_split_lists_are_read_in_their_encoding_with_or_without_a_byte_order_mark(tmp_path):
    """A list names files by their bytes: a Latin-1 line names the Latin-1-named file; UTF-8 / UTF-16 lists with
    a byte-order mark (Windows editors write one) read as their text, the mark not part of the first path."""
    fixtures.write_vtab_fixture(tmp_path, "svhn")
    task_dir = tmp_path / "svhn"
    reference = datasets.read_split("svhn", tmp_path, "train800")
    text = (task_dir / "train800.txt").read_text()
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):   # Python writes these with their byte-order mark
        (task_dir / "train800.txt").write_bytes(text.encode(encoding))
        assert datasets.read_split("svhn", tmp_path, "train800") == reference, encoding
        assert os.path.isfile(reference[0][0])
    first = text.splitlines()[0]
    latin1 = latin1_named_copy(task_dir, first.split()[0])
    (task_dir / "train800.txt").write_bytes(text.encode() + b"images/train800/" + LATIN1_NAME + b" 1\n")
    paths, labels = datasets.read_split("svhn", tmp_path, "train800")
    assert paths[-1] == latin1 and labels[-1] == 1 and os.path.isfile(paths[-1])
    split = datasets.load_splits("svhn", tmp_path, ["train800"], cache_dir=tmp_path / "cache")["train800"]
    assert torch.equal(split.image(len(paths) - 1), split.image(0))   # the copy decodes as its original
    (task_dir / "train800.txt").write_bytes(text.encode("utf-16-le"))   # no byte-order mark
    with pytest.raises(DataError, match=re.escape(str(task_dir / "train800.txt")) + ": holds NUL bytes"):
        datasets.read_split("svhn", tmp_path, "train800")
    (task_dir / "train800.txt").write_text(text + first.rsplit(maxsplit=1)[0] + " 7\n")
    again = len(text.splitlines()) + 1
    with pytest.raises(DataError, match=rf"train800\.txt:{again}: .* is listed again with label 7 \(label 0 on line 1\)"):
        datasets.read_split("svhn", tmp_path, "train800")


def test_json_splits_are_read_in_their_encoding_and_an_image_listed_twice_is_refused(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "cub", "cub")
    reference = {split: datasets.read_split("cub", root, split) for split in ("train", "test")}
    text = (root / "train.json").read_text()
    (root / "train.json").write_bytes(text.encode("utf-8-sig"))
    assert datasets.read_split("cub", root, "train") == reference["train"]
    first = next(iter(json.loads(text)))
    latin1 = latin1_named_copy(root / "images", first)
    key = os.fsencode(Path(first).parent) + b"/" + LATIN1_NAME
    (root / "train.json").write_bytes(text[:-1].encode() + b', "' + key + b'": 0}')   # a Latin-1 key
    paths, labels = datasets.read_split("cub", root, "train")
    assert paths[-1] == latin1 and labels[-1] == 0 and os.path.isfile(paths[-1])
    # one image, two class ids: json.loads would keep the last silently
    (root / "test.json").write_text((root / "test.json").read_text()[:-1] + f', "{first}": 0, "{first}": 2}}')
    with pytest.raises(DataError, match=re.escape(str(root / "test.json")) + f": image '{first}' is listed twice"):
        datasets.read_split("cub", root, "train")


def test_prepare_reads_release_tables_with_a_byte_order_mark(tmp_path):
    root = fixtures.write_release_fixture(tmp_path / "CUB_200_2011", "cub")
    reference = releases.prepare("cub", root)
    (root / "images.txt").write_bytes((root / "images.txt").read_text().encode("utf-8-sig"))   # only this one
    assert releases.prepare("cub", root, overwrite=True) == reference


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_bad_image_names_the_file(tmp_path, damage):
    root = fixtures.write_fgvc_fixture(tmp_path / "cars", "cars")
    key = next(iter(json.loads((root / "test.json").read_text())))
    image = root / key
    if damage == "corrupt":
        image.write_bytes(b"this is not a jpeg")
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    else:
        image.unlink()
    with pytest.raises(DataError, match=str(image)):
        datasets.load_splits("cars", root, ["test"])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=str(image)):  # and no half-written cache file is left behind
        datasets.load_splits("cars", root, ["test"], cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_images_whose_plain_rgb_conversion_loses_content_are_converted_right_or_refused(tmp_path):
    """224 x 224 images, so that VTAB's resize to 224 is the identity and the decoded pixels are the conversion
    itself. Expected values by hand: a 16-bit level v is round(v / 257) in 8 bits (65535 -> 255); transparent
    pixels show the white they are composited on; CMYK (0, 255, 255, 0) is red and (0, 0, 0, 128) grey 127."""
    ramp = np.tile(np.arange(224, dtype=np.uint16) * 293, (224, 1))   # 0 .. 65339
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    expected = np.round(ramp / 257).astype(np.uint8)
    got = datasets.decode_vtab(str(tmp_path / "gray16.png"))
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=2))   # plain convert("RGB"): 99 % white

    palette = Image.new("P", (224, 224), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (112, 0, 224, 224))
    palette.save(tmp_path / "palette.png", transparency=0)   # index 0 (black) is transparent
    got = datasets.decode_vtab(str(tmp_path / "palette.png"))
    assert (got[:, :112] == 255).all() and (got[:, 112:] == [200, 30, 30]).all()

    grey_alpha = Image.new("LA", (224, 224), (40, 0))
    grey_alpha.paste((40, 255), (0, 0, 224, 112))
    grey_alpha.save(tmp_path / "la.png")
    got = datasets.decode_vtab(str(tmp_path / "la.png"))
    assert (got[:112] == 40).all() and (got[112:] == 255).all()

    cmyk = Image.new("CMYK", (224, 224), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 128), (0, 0, 112, 224))
    cmyk.save(tmp_path / "cmyk.tif")
    got = datasets.decode_vtab(str(tmp_path / "cmyk.tif"))
    assert (got[:, :112] == 127).all() and (got[:, 112:] == [255, 0, 0]).all()

    for name, image in (("float.tif", Image.fromarray(np.full((224, 224), 0.5, dtype=np.float32))),
                        ("int32.tif", Image.fromarray(np.full((224, 224), 100000, dtype=np.int32)))):
        image.save(tmp_path / name)
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name)) + ".*no 8-bit conversion"):
            datasets.decode_fgvc(str(tmp_path / name))


# --- disk cache -------------------------------------------------------------------------------


def count_decoding(monkeypatch):
    """Counts decode_images calls (still decoding) and returns the counter list."""
    calls, decode = [], datasets.decode_images
    monkeypatch.setattr(datasets, "decode_images", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs))
    return calls


def assert_same_split(a, b):
    for field in ("pixels", "offsets", "sizes", "labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_disk_cache_is_reused(tmp_path, monkeypatch):
    root = fixtures.write_fgvc_fixture(tmp_path / "nabirds", "nabirds")
    cache = tmp_path / "cache"
    uncached = datasets.load_splits("nabirds", root, ["train"])["train"]
    first = datasets.load_splits("nabirds", root, ["train"], cache_dir=cache)["train"]
    assert_same_split(first, uncached)
    assert len(list(cache.glob("nabirds-train-*.pixels.npy"))) == 1
    assert len(list(cache.glob("nabirds-train-*.index.npy"))) == 1
    assert len(list(cache.glob("nabirds-train-*.check.json"))) == 1
    assert len(list(cache.iterdir())) == 3  # no temporary files left

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(datasets, "decode_images", no_decoding)
    monkeypatch.setattr(datasets, "image_sizes", no_decoding)
    second = datasets.load_splits("nabirds", root, ["train"], cache_dir=cache)["train"]
    assert_same_split(first, second)
    with pytest.raises(AssertionError):  # a different image list is a different cache entry
        datasets.load_splits("nabirds", root, ["test"], cache_dir=cache)


def test_a_cache_that_does_not_fit_on_the_disk_is_one_line_before_decoding(tmp_path, monkeypatch):
    """12 VTAB images of 224 x 224 x 3 bytes need 1,806,336 bytes of cache; with 1 MB free: refused naming the
    space, before any image is decoded, leaving no file in the cache folder."""
    fixtures.write_vtab_fixture(tmp_path / "vtab", "dtd")
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets, "free_disk_bytes", lambda folder: 10**6)
    monkeypatch.setattr(datasets, "decode_images", lambda *a, **k: pytest.fail("decoded although it cannot be kept"))
    with pytest.raises(DataError) as err:
        datasets.load_splits("dtd", tmp_path / "vtab", ["train800val200"], cache_dir=cache)
    text = str(err.value)
    assert "\n" not in text and "disk is full" in text and "1.81 MB" in text and "1.00 MB free" in text
    assert str(cache) in text and "--cache-dir" in text
    assert list(cache.iterdir()) == [] if cache.exists() else True


def build_the_cache_past_the_check(vtab, cache_dir):
    """In a process of its own (see process_of): the dtd cache built with the free-space check fooled (another
    process fills the disk after it); a DataError exits with its message."""
    datasets.free_disk_bytes = lambda folder: 2**40
    try:
        datasets.load_splits("dtd", vtab, ["train800val200"], cache_dir=cache_dir)
    except datasets.DataError as err:
        sys.exit(f"error: {err}")


def test_a_disk_that_fills_up_while_the_cache_is_built_is_one_line_not_sigbus(tmp_path, tiny_tmpfs):
    """A real 1 MiB disk and a 1.8 MB cache entry. Checked first: one line. With the check fooled (another
    process fills the disk after it), in a real process: writing through a memory map that the disk cannot back
    would kill it with SIGBUS; instead one line, and nothing is left in the cache folder either way."""
    fixtures.write_vtab_fixture(tmp_path / "vtab", "dtd")
    with pytest.raises(DataError, match=r"^the disk is full: the decode cache of dtd/train800val200 needs 1.81 MB"):
        datasets.load_splits("dtd", tmp_path / "vtab", ["train800val200"], cache_dir=tiny_tmpfs)
    assert list(tiny_tmpfs.iterdir()) == []
    done = process_of(build_the_cache_past_the_check, str(tmp_path / "vtab"), str(tiny_tmpfs),
                      out=tmp_path / "out.log", err=tmp_path / "err.log", cwd=ROOT)
    done.join(120)
    stderr = (tmp_path / "err.log").read_text()
    assert done.exitcode == 1, (done.exitcode, stderr[-500:])   # sys.exit(message): 1; SIGBUS: -7
    assert stderr.startswith("error: the disk is full") and len(stderr.strip().splitlines()) == 1
    assert list(tiny_tmpfs.iterdir()) == []


def test_disk_cache_is_rebuilt_when_stale_or_incomplete(tmp_path, monkeypatch):
    root = fixtures.write_fgvc_fixture(tmp_path / "dogs", "dogs")
    cache = tmp_path / "cache"
    calls = count_decoding(monkeypatch)
    reference = datasets.load_splits("dogs", root, ["test"], cache_dir=cache)["test"]
    datasets.load_splits("dogs", root, ["test"], cache_dir=cache)
    assert len(calls) == 1
    # a crash between writing the pixels and the index leaves no index: rebuilt
    index_file, = cache.glob("*.index.npy")
    index_file.unlink()
    assert_same_split(datasets.load_splits("dogs", root, ["test"], cache_dir=cache)["test"], reference)
    assert len(calls) == 2
    # a pixels file that disagrees with its index (here: too short) is rebuilt too
    pixels_file, = cache.glob("*.pixels.npy")
    np.save(pixels_file, np.zeros((10, 3), dtype=np.uint8))
    assert_same_split(datasets.load_splits("dogs", root, ["test"], cache_dir=cache)["test"], reference)
    assert len(calls) == 3
    # a new recipe (e.g. the central-square caches of earlier versions) is a different entry
    monkeypatch.setattr(datasets, "CACHE_RECIPE", datasets.CACHE_RECIPE + " changed")
    datasets.load_splits("dogs", root, ["test"], cache_dir=cache)
    assert len(calls) == 4 and len(list(cache.glob("*.index.npy"))) == 2


def test_a_second_copy_of_a_dataset_under_another_root_is_decoded_fresh(tmp_path, monkeypatch):
    """Same file names, other pixels, another --data-dir: the cache must not hand back the first copy."""
    first_root = fixtures.write_fgvc_fixture(tmp_path / "a" / "cub", "cub", seed=0)
    second_root = fixtures.write_fgvc_fixture(tmp_path / "b" / "cub", "cub", seed=5)
    cache = tmp_path / "cache"
    first = datasets.load_splits("cub", first_root, ["test"], cache_dir=cache)["test"]
    second = datasets.load_splits("cub", second_root, ["test"], cache_dir=cache)["test"]
    assert_same_split(second, datasets.load_splits("cub", second_root, ["test"])["test"])
    assert not torch.equal(first.pixels, second.pixels)


def test_a_re_downloaded_image_with_the_same_name_is_decoded_fresh(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "cub", "cub")
    cache = tmp_path / "cache"
    datasets.load_splits("cub", root, ["test"], cache_dir=cache)
    image = sorted((root / "images").rglob("*test_000.jpg"))[0]
    Image.new("RGB", (40, 30), (255, 0, 0)).save(image)
    fixed = datasets.load_splits("cub", root, ["test"], cache_dir=cache)["test"]
    assert_same_split(fixed, datasets.load_splits("cub", root, ["test"])["test"])


def test_a_flipped_byte_in_the_cache_is_detected_and_the_entry_rebuilt(tmp_path, monkeypatch, capsys):
    root = fixtures.write_fgvc_fixture(tmp_path / "dogs", "dogs")
    cache = tmp_path / "cache"
    reference = datasets.load_splits("dogs", root, ["test"])["test"]
    datasets.load_splits("dogs", root, ["test"], cache_dir=cache)
    pixels_file, = cache.glob("*.pixels.npy")
    raw = bytearray(pixels_file.read_bytes())
    raw[-7] ^= 0x01
    pixels_file.write_bytes(bytes(raw))
    calls = count_decoding(monkeypatch)
    again = datasets.load_splits("dogs", root, ["test"], cache_dir=cache)["test"]
    assert len(calls) == 1 and "does not match its checksum" in capsys.readouterr().out
    assert_same_split(again, reference)


def test_temporary_pixel_files_of_killed_runs_are_removed(tmp_path):
    import socket
    root = fixtures.write_fgvc_fixture(tmp_path / "dogs", "dogs")
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess_pid_that_exited()
    left = cache / f"dogs-test-0123456789abcdef.pixels.npy.tmp{dead}@{socket.gethostname()}"
    other_host = cache / f"dogs-test-0123456789abcdef.pixels.npy.tmp{dead}@another-machine"
    left.write_bytes(b"x" * 100)
    other_host.write_bytes(b"x")
    datasets.load_splits("dogs", root, ["test"], cache_dir=cache)
    assert not left.exists() and other_host.exists()


def subprocess_pid_that_exited():
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- prepare ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(datasets.FGVC_DATASETS))
def test_prepare_builds_vpt_like_splits(tmp_path, dataset, capsys):
    pytest.importorskip("scipy")
    root = fixtures.write_release_fixture(tmp_path / dataset, dataset, num_classes=4, train_per_class=12,
                                      test_per_class=3)
    sizes = releases.prepare(dataset, root)
    assert dataset in capsys.readouterr().out
    splits = {s: json.loads((root / f"{s}.json").read_text()) for s in datasets.FGVC_SPLITS}
    assert sizes == {s: len(a) for s, a in splits.items()}
    assert {cid for a in splits.values() for cid in a.values()} == {0, 1, 2, 3}  # 0-based, even for NABirds
    assert sizes["test"] == 12 and not set(splits["train"]) & set(splits["val"])
    assert not (set(splits["train"]) | set(splits["val"])) & set(splits["test"])
    if dataset == "flowers":  # setid.mat split used as is: 6 trnid + 6 valid per class
        assert sizes["train"] == sizes["val"] == 24
    else:
        vpt_train, vpt_val, _ = datasets.FGVC_DATASETS[dataset].split_sizes
        assert sizes["val"] == round(48 * vpt_val / (vpt_train + vpt_val)) == 5
        assert sizes["train"] == 43
        per_class = np.unique(list(splits["val"].values()), return_counts=True)[1]
        assert set(per_class.tolist()) <= {1, 2}  # stratified: floor or ceil of 5/4 per class
    loaded = datasets.load_splits(dataset, root, ["train"])["train"]
    assert len(loaded.labels) == sizes["train"] and set(loaded.labels.tolist()) == {0, 1, 2, 3}
    assert torch.equal(nearest_class_by_colour(loaded, 4), loaded.labels)


def test_prepare_is_deterministic_and_refuses_overwrite(tmp_path):
    root = fixtures.write_release_fixture(tmp_path / "cub", "cub", train_per_class=20)
    releases.prepare("cub", root)
    val = (root / "val.json").read_text()
    with pytest.raises(DataError, match="already exist.* --overwrite"):
        releases.prepare("cub", root)
    releases.prepare("cub", root, overwrite=True)
    assert (root / "val.json").read_text() == val
    releases.prepare("cub", root, overwrite=True, seed=1)
    assert (root / "val.json").read_text() != val


def test_prepare_reports_missing_release_files(tmp_path):
    root = fixtures.write_release_fixture(tmp_path / "cub", "cub")
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt.*caltech"):
        releases.prepare("cub", root)
    pytest.importorskip("scipy")
    root = fixtures.write_release_fixture(tmp_path / "cars", "cars")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        releases.prepare("cars", root)
    root = fixtures.write_release_fixture(tmp_path / "dogs", "dogs")
    next((root / "Images").rglob("*.jpg")).unlink()
    with pytest.raises(DataError, match="1 listed images are missing"):
        releases.prepare("dogs", root)


# --- synthetic data ---------------------------------------------------------------------------


def test_synthetic_images_are_easy_and_seeded():
    train, train_labels = datasets.make_synthetic_images(10, 8, 16, seed=0)
    test, test_labels = datasets.make_synthetic_images(10, 8, 16, seed=1)
    assert train.shape == (80, 3, 16, 16) and train.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert torch.equal(train_labels, torch.arange(10).repeat_interleave(8))
    assert torch.equal(train, datasets.make_synthetic_images(10, 8, 16, seed=0)[0])
    assert not torch.equal(train, test)
    centroids = torch.stack([train[train_labels == c].float().flatten(1).mean(0) for c in range(10)])
    predicted = torch.cdist(test.float().flatten(1), centroids).argmin(1)
    assert (predicted == test_labels).float().mean() > 0.9  # chance is 0.1
