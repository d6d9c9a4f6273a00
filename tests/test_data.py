"""Tests for data.py: readers, decode cache, batch loader, prepare, synthetic data (CPU, fast)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fixtures  # noqa: E402
import data  # noqa: E402
from data import DataError  # noqa: E402

MEAN = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)


def normalize(uint8_images):
    return (uint8_images.float() / 255 - MEAN) / STD


def nearest_class_by_colour(images, num_classes):
    """Predict classes of synthetic images from their mean colour (class colours are seed-independent)."""
    reference, labels = data.make_synthetic_images(num_classes, 20, 32, seed=123)
    centroids = torch.stack([reference[labels == c].float().mean((0, 2, 3)) for c in range(num_classes)])
    return torch.cdist(images.float().mean((2, 3)), centroids).argmin(1)


# --- registries -------------------------------------------------------------------------------


def test_registries_and_metadata():
    assert {k: v.num_classes for k, v in data.FGVC_DATASETS.items()} == {
        "cub": 200, "nabirds": 555, "flowers": 102, "cars": 196, "dogs": 120}
    assert data.FGVC_DATASETS["dogs"].image_dir == "Images" and data.FGVC_DATASETS["cars"].image_dir == ""
    assert data.FGVC_DATASETS["nabirds"].split_sizes == (21536, 2393, 24633)
    assert len(data.VTAB_TASKS) == 19
    groups = [v.group for v in data.VTAB_TASKS.values()]
    assert groups == ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8
    assert list(data.VTAB_TASKS)[:2] == ["cifar", "caltech101"] and list(data.VTAB_TASKS)[-1] == "smallnorb_ele"
    assert data.num_classes("sun397") == 397 and data.num_classes("cub") == 200
    assert data.task_kind("kitti") == "vtab" and data.task_kind("cars") == "fgvc"
    assert data.split_names("cub", "final") == ("train", "test")
    assert data.split_names("cub", "sweep") == ("train", "val")
    assert data.split_names("dtd", "final") == ("train800val200", "test")
    assert data.split_names("dtd", "sweep") == ("train800", "val200")
    with pytest.raises(ValueError):
        data.task_kind("imagenet")


# --- dataset folders --------------------------------------------------------------------------


def test_dataset_root_accepts_release_folder_names(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    assert data.dataset_root("cub", tmp_path) == tmp_path / "CUB_200_2011"
    (tmp_path / "cub").mkdir()
    assert data.dataset_root("cub", tmp_path) == tmp_path / "cub"  # our own name comes first
    (tmp_path / "stanford_cars").mkdir()
    assert data.dataset_root("cars", tmp_path) == tmp_path / "stanford_cars"
    (tmp_path / "VTAB-1k" / "dtd").mkdir(parents=True)
    assert data.dataset_root("dtd", tmp_path) == tmp_path / "VTAB-1k"
    (tmp_path / "vtab-1k" / "svhn").mkdir(parents=True)  # vtab-1k/ exists but lacks dtd/
    assert data.dataset_root("dtd", tmp_path) == tmp_path / "VTAB-1k"
    assert data.dataset_root("svhn", tmp_path) == tmp_path / "vtab-1k"


@pytest.mark.parametrize("task", ["dogs", "eurosat"])
def test_dataset_root_missing_lists_every_accepted_path(tmp_path, task):
    with pytest.raises(DataError) as err:
        data.dataset_root(task, tmp_path)
    names = data.DATASET_FOLDERS[task if task in data.FGVC_DATASETS else "vtab"]
    assert all(str(tmp_path / name) in str(err.value) for name in names) and len(names) >= 3
    url = data.FGVC_DATASETS[task].url if task in data.FGVC_DATASETS else data.VTAB_URL
    assert url in str(err.value)


def test_prepare_and_load_in_unpacked_release_folder(tmp_path):
    """CUB straight from CUB_200_2011.tgz: data/CUB_200_2011/{images.txt, ..., images/}."""
    release = fixtures.write_release_fixture(tmp_path / "data" / "CUB_200_2011", "cub", num_classes=3)
    root = data.dataset_root("cub", tmp_path / "data")
    assert root == release
    sizes = data.prepare("cub", root)
    paths, labels = data.read_split("cub", root, "test")
    assert len(paths) == sizes["test"] == 12 and sorted(set(labels)) == [0, 1, 2]
    assert all(path.startswith(str(release / "images")) and Path(path).is_file() for path in paths)


# --- readers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(data.FGVC_DATASETS))
def test_fgvc_fixture_reads_back(tmp_path, dataset):
    root = fixtures.write_fgvc_fixture(tmp_path / dataset, dataset, per_class=(3, 1, 2))
    image_dir = root / data.FGVC_DATASETS[dataset].image_dir
    assert all((image_dir / key).is_file() for key in json.loads((root / "train.json").read_text()))

    for split, count in zip(data.FGVC_SPLITS, (3, 1, 2)):
        paths, labels = data.read_split(dataset, root, split)
        anno = json.loads((root / f"{split}.json").read_text())
        assert paths == [str(image_dir / key) for key in anno]
        assert labels == list(anno.values()) and sorted(set(labels)) == [0, 1, 2]  # 0-based ids used as is
    loaded = data.load_split(dataset, root, "test")
    assert loaded.images.shape == (6, 3, 256, 256) and loaded.images.dtype == torch.uint8
    assert loaded.labels.dtype == torch.int64
    assert torch.equal(nearest_class_by_colour(loaded.images, 3), loaded.labels)


def write_json(root, split, anno):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.json").write_text(json.dumps(anno))


def test_fgvc_ids_in_range_are_indices(tmp_path):
    """Ids in 0..C-1 are used as is, even when a split (or all of them) lacks some classes."""
    write_json(tmp_path, "train", {"a.jpg": 7, "b.jpg": 3, "c.jpg": 199})
    write_json(tmp_path, "test", {"d.jpg": 199, "e.jpg": 3})
    assert data.read_split("cub", tmp_path, "train")[1] == [7, 3, 199]
    assert data.read_split("cub", tmp_path, "test")[1] == [199, 3]


def test_fgvc_official_ids_map_by_sorted_order(tmp_path):
    """Ids outside 0..C-1 (NABirds-like: non-contiguous) map by sorted order when exactly C distinct."""
    official = [295 + 3 * k for k in range(102)]  # 102 = Flowers' class count
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in reversed(official)})
    write_json(tmp_path, "val", {"v.jpg": official[-1], "w.jpg": official[5]})
    assert data.read_split("flowers", tmp_path, "train")[1] == list(reversed(range(102)))
    assert data.read_split("flowers", tmp_path, "val")[1] == [101, 5]  # the union's mapping, not val's own
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in range(1, 103)})  # 1-based official ids
    write_json(tmp_path, "val", {"v.jpg": 102})
    assert data.read_split("flowers", tmp_path, "val")[1] == [101]


def test_fgvc_stray_class_id_is_rejected(tmp_path):
    """A CUB train.json with ids 0..199 plus a stray 999 must not train a 201st class."""
    train = {f"{cid}.jpg": cid for cid in range(200)} | {"stray.jpg": 999}
    write_json(tmp_path, "train", train)
    write_json(tmp_path, "test", {"t.jpg": 0})
    for split in ("train", "test"):  # reading any split checks every split file
        with pytest.raises(DataError, match=r"train\.json: image 'stray\.jpg' has class id 999, outside 0\.\.199"):
            data.read_split("cub", tmp_path, split)
    # 1-based ids missing a class: neither all in range nor exactly 200 distinct ids
    write_json(tmp_path, "train", {f"{cid}.jpg": cid for cid in range(2, 201)})
    write_json(tmp_path, "test", {"t.jpg": 2})
    with pytest.raises(DataError, match=r"'200\.jpg' has class id 200.*they hold 199"):
        data.read_split("cub", tmp_path, "train")


@pytest.mark.parametrize("bad_id", ["3", 3.0, True, None])
def test_fgvc_non_integer_class_id_is_rejected(tmp_path, bad_id):
    write_json(tmp_path, "train", {"a.jpg": 1, "b.jpg": bad_id})
    with pytest.raises(DataError, match=r"train\.json: image 'b\.jpg'.*must be integers"):
        data.read_split("cub", tmp_path, "train")


def test_fgvc_eval_ids_must_occur_in_train(tmp_path):
    write_json(tmp_path, "train", {"a.jpg": 0, "b.jpg": 1})
    write_json(tmp_path, "val", {"c.jpg": 1})
    write_json(tmp_path, "test", {"d.jpg": 0, "e.jpg": 2})
    for split in ("train", "val", "test"):
        with pytest.raises(DataError, match=r"test\.json: image 'e\.jpg' has class id 2, which no image in .*train\.json"):
            data.read_split("dogs", tmp_path, split)
    write_json(tmp_path, "test", {"d.jpg": 0})
    assert data.read_split("dogs", tmp_path, "test")[1] == [0]


def test_vtab_fixture_reads_back(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "eurosat", num_classes=4, per_class=(3, 2, 2), image_size=(40, 24))
    sizes = {"train800": 12, "val200": 8, "train800val200": 20, "test": 8}
    for split, size in sizes.items():
        loaded = data.load_split("eurosat", tmp_path, split)
        assert loaded.images.shape == (size, 3, 224, 224)
        assert torch.equal(nearest_class_by_colour(loaded.images, 4), loaded.labels)
    paths, labels = data.read_split("eurosat", tmp_path, "train800val200")
    train_paths, _ = data.read_split("eurosat", tmp_path, "train800")
    assert paths[:12] == train_paths and paths[0] == str(tmp_path / "eurosat" / "images/train800/00000.jpg")


def test_decode_matches_vpt_torchvision_pipeline(tmp_path):
    """FGVC eval = VPT's Resize(256) (shorter side) + CenterCrop(224) + ToTensor + Normalize, exactly."""
    vpt_eval = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    rng = np.random.default_rng(0)
    for width, height in ((300, 201), (199, 333)):
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        cached = torch.from_numpy(data.decode_image(str(path), 256, keep_aspect=True))[None]
        loader = data.BatchLoader(cached, torch.zeros(1, dtype=torch.long), 1, train=False)
        assert torch.equal(next(iter(loader))[0][0], vpt_eval(Image.open(path).convert("RGB")))
        vtab = torch.from_numpy(data.decode_image(str(path), 224, keep_aspect=False))
        raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(vtab, data.resize_like_tf(raw, 224))


def test_vtab_resize_is_tf_bilinear_with_half_pixel_centres():
    """Worked by hand: output pixel d samples source (d + 0.5) * in/out - 0.5 (clamped at the border)."""
    ramp = torch.tensor([[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100, 110], [120, 130, 140, 150]])
    image = ramp.to(torch.uint8).expand(3, 4, 4)
    # 4 -> 2: samples at 0.5 and 2.5, i.e. the mean of each 2x2 block
    assert torch.equal(data.resize_like_tf(image, 2), torch.tensor([[25, 45], [105, 125]]).expand(3, 2, 2))
    # 2 -> 4: samples at -0.25 (-> 0), 0.25, 0.75, 1.25 (-> 1): weights 1, 3/4 + 1/4, 1/4 + 3/4, 1
    image = torch.tensor([[0, 40], [80, 120]], dtype=torch.uint8).expand(3, 2, 2)
    expected = torch.tensor([[0, 10, 30, 40], [20, 30, 50, 60], [60, 70, 90, 100], [80, 90, 110, 120]])
    assert torch.equal(data.resize_like_tf(image, 4), expected.expand(3, 4, 4))


def test_vtab_resize_does_not_antialias():
    """896 -> 224 samples halfway between source columns 4d+1 and 4d+2; PIL averages ~8 columns instead."""
    row = torch.tensor([255 if x % 4 == 1 else 0 for x in range(896)], dtype=torch.uint8)
    image = row.expand(3, 896, 896)
    assert torch.equal(data.resize_like_tf(image, 224), torch.full((3, 224, 224), 128, dtype=torch.uint8))
    pil = np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((224, 224), Image.BILINEAR))
    assert 40 < pil.mean() < 90  # about 255 / 4


# --- loader -----------------------------------------------------------------------------------


def test_train_order_is_pure_function_of_seed_and_epoch():
    images, labels = data.make_synthetic_images(5, 7, 12)

    def loader(batch_size=4, seed=42):
        return data.BatchLoader(images, labels, batch_size, train=True, augment=True, crop_size=8, seed=seed)

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
    assert not torch.equal(order, loader(seed=43).sample_indices(1))
    first.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in first]), labels[order])


def test_random_crop_flip_outputs_true_crops_and_mirrors():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=generator)
    loader = data.BatchLoader(images, torch.arange(40), 16, train=True, augment=True, crop_size=8)
    batches = list(loader)
    outputs = torch.cat([x for x, _ in batches])
    assert outputs.shape == (40, 3, 8, 8) and outputs.dtype == torch.float32
    restored = (outputs * STD + MEAN) * 255
    assert torch.allclose(restored, restored.round(), atol=1e-3)  # normalisation is (x/255 - mean)/std
    flips, offsets = 0, set()
    for out, index in zip(restored.round().to(torch.uint8), loader.sample_indices()):
        matches = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                   if torch.equal(out, images[index, :, top:top + 8, left:left + 8].flip(-1) if flip
                                  else images[index, :, top:top + 8, left:left + 8])]
        assert len(matches) == 1
        flips += matches[0][2]
        offsets.add(matches[0][:2])
    assert 8 <= flips <= 32 and len(offsets) > 5


def test_eval_center_crop_equals_torchvision():
    images, labels = data.make_synthetic_images(3, 3, 256)
    loader = data.BatchLoader(images, labels, 4, train=False)
    outputs = torch.cat([x for x, _ in loader])
    assert torch.equal(outputs, normalize(T.CenterCrop(224)(images)))
    assert len(loader) == 3


def test_train_without_augment_is_center_crop():
    images, labels = data.make_synthetic_images(2, 4, 10)
    loader = data.BatchLoader(images, labels, 8, train=True, crop_size=8)
    x, y = next(iter(loader))
    assert torch.equal(x, normalize(images[loader.sample_indices()][..., 1:9, 1:9]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("images_on_device", [False, True])
def test_cuda_batches_match_cpu_without_host_syncs(images_on_device):
    images, labels = data.make_synthetic_images(4, 5, 12)
    settings = dict(train=True, augment=True, crop_size=8, seed=3)
    expected = list(data.BatchLoader(images, labels, 6, **settings))
    loader = data.BatchLoader(images, labels, 6, device="cuda", images_on_device=images_on_device, **settings)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == len(expected) == len(loader)
    for (x, y), (x_cpu, y_cpu) in zip(batches, expected):
        assert x.is_cuda and torch.allclose(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_eval_covers_every_index_once(world_size):
    images, labels = data.make_synthetic_images(11, 1, 8)  # N = 11, not divisible by 2 or 3
    indices, gathered = [], []
    for rank in range(world_size):
        loader = data.BatchLoader(images, labels, 2, train=False, crop_size=8, rank=rank, world_size=world_size)
        indices.append(loader.sample_indices())
        gathered.append(torch.cat([y for _, y in loader]))
        assert len(loader) == math.ceil(len(indices[-1]) / 2)
    assert torch.equal(torch.cat(indices), torch.arange(11))
    assert torch.equal(torch.cat(gathered), labels)
    assert [data.shard_range(11, r, world_size) for r in range(world_size)][-1][1] == 11


def test_sharded_train_has_equal_counts_and_covers_all():
    images, labels = data.make_synthetic_images(10, 1, 8)
    shards = [data.BatchLoader(images, labels, 3, train=True, crop_size=8, rank=r, world_size=3, seed=7)
              for r in range(3)]
    orders = [s.sample_indices(5) for s in shards]
    assert [len(o) for o in orders] == [4, 4, 4] and {len(s) for s in shards} == {2}
    assert set(torch.cat(orders).tolist()) == set(range(10))
    assert [len(torch.cat([y for _, y in s])) for s in shards] == [4, 4, 4]


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="cub_200_2011") as err:
        data.load_split("cub", tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DataError) as err:
        data.load_split("dtd", tmp_path, "test")
    assert str(tmp_path / "dtd") in str(err.value) and data.VTAB_URL in str(err.value)


def test_missing_split_file(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "dogs", "dogs")
    (root / "val.json").unlink()
    with pytest.raises(DataError, match="val.json"):
        data.load_split("dogs", root, "val")
    assert len(data.load_split("dogs", root, "test").labels) == 6  # other splits still load
    fixtures.write_vtab_fixture(tmp_path, "dmlab")
    (tmp_path / "dmlab" / "val200.txt").unlink()
    with pytest.raises(DataError, match="val200.txt"):
        data.load_split("dmlab", tmp_path, "val200")


def test_malformed_lines(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "svhn")
    list_file = tmp_path / "svhn" / "test.txt"
    lines = list_file.read_text().splitlines()
    lines[2] = "images/test/00002.jpg"  # label missing
    list_file.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"test\.txt:3: malformed"):
        data.read_split("svhn", tmp_path, "test")
    root = fixtures.write_fgvc_fixture(tmp_path / "cub", "cub")
    (root / "train.json").write_text('{"a.jpg": 1,\n "b.jpg" 2}')
    with pytest.raises(DataError, match=r"train\.json:2: malformed json"):
        data.read_split("cub", root, "test")
    (root / "train.json").write_text('{"a.jpg": 1, "b.jpg": "2"}')
    with pytest.raises(DataError, match=r"train\.json.*'b.jpg'"):
        data.read_split("cub", root, "train")


def test_label_out_of_range(tmp_path):
    fixtures.write_vtab_fixture(tmp_path, "patch_camelyon", num_classes=2)
    list_file = tmp_path / "patch_camelyon" / "train800.txt"
    list_file.write_text(list_file.read_text() + "images/train800/00000.jpg 2\n")
    with pytest.raises(DataError, match=r"train800\.txt:7: label 2 out of range"):
        data.read_split("patch_camelyon", tmp_path, "train800")
    root = tmp_path / "flowers"
    root.mkdir()
    (root / "train.json").write_text(json.dumps({f"jpg/{i}.jpg": i for i in range(103)}))
    with pytest.raises(DataError, match=r"train\.json: image 'jpg/102.jpg'.*102 classes"):
        data.read_split("flowers", root, "train")


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
        data.load_split("cars", root, "test")
    with pytest.raises(DataError, match=str(image)):  # and no half-written cache file is left behind
        data.load_split("cars", root, "test", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


# --- disk cache -------------------------------------------------------------------------------


def test_disk_cache_is_reused(tmp_path, monkeypatch):
    root = fixtures.write_fgvc_fixture(tmp_path / "nabirds", "nabirds")
    cache = tmp_path / "cache"
    first = data.load_split("nabirds", root, "train", cache_dir=cache)
    assert len(list(cache.glob("nabirds-train-256px-*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(data, "decode_images", no_decoding)
    second = data.load_split("nabirds", root, "train", cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    with pytest.raises(AssertionError):  # a different image list is a different cache entry
        data.load_split("nabirds", root, "test", cache_dir=cache)


# --- prepare ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(data.FGVC_DATASETS))
def test_prepare_builds_vpt_like_splits(tmp_path, dataset, capsys):
    pytest.importorskip("scipy")
    root = fixtures.write_release_fixture(tmp_path / dataset, dataset, num_classes=4, train_per_class=12,
                                      test_per_class=3)
    sizes = data.prepare(dataset, root)
    assert dataset in capsys.readouterr().out
    splits = {s: json.loads((root / f"{s}.json").read_text()) for s in data.FGVC_SPLITS}
    assert sizes == {s: len(a) for s, a in splits.items()}
    assert {cid for a in splits.values() for cid in a.values()} == {0, 1, 2, 3}  # 0-based, even for NABirds
    assert sizes["test"] == 12 and not set(splits["train"]) & set(splits["val"])
    assert not (set(splits["train"]) | set(splits["val"])) & set(splits["test"])
    if dataset == "flowers":  # setid.mat split used as is: 6 trnid + 6 valid per class
        assert sizes["train"] == sizes["val"] == 24
    else:
        vpt_train, vpt_val, _ = data.FGVC_DATASETS[dataset].split_sizes
        assert sizes["val"] == round(48 * vpt_val / (vpt_train + vpt_val)) == 5
        assert sizes["train"] == 43
        per_class = np.unique(list(splits["val"].values()), return_counts=True)[1]
        assert set(per_class.tolist()) <= {1, 2}  # stratified: floor or ceil of 5/4 per class
    loaded = data.load_split(dataset, root, "train")
    assert len(loaded.labels) == sizes["train"] and set(loaded.labels.tolist()) == {0, 1, 2, 3}
    assert torch.equal(nearest_class_by_colour(loaded.images, 4), loaded.labels)


def test_prepare_is_deterministic_and_refuses_overwrite(tmp_path):
    root = fixtures.write_release_fixture(tmp_path / "cub", "cub", train_per_class=20)
    data.prepare("cub", root)
    val = (root / "val.json").read_text()
    with pytest.raises(DataError, match="already exist.* --overwrite"):
        data.prepare("cub", root)
    data.prepare("cub", root, overwrite=True)
    assert (root / "val.json").read_text() == val
    data.prepare("cub", root, overwrite=True, seed=1)
    assert (root / "val.json").read_text() != val


def test_prepare_reports_missing_release_files(tmp_path):
    root = fixtures.write_release_fixture(tmp_path / "cub", "cub")
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt.*caltech"):
        data.prepare("cub", root)
    pytest.importorskip("scipy")
    root = fixtures.write_release_fixture(tmp_path / "cars", "cars")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        data.prepare("cars", root)
    root = fixtures.write_release_fixture(tmp_path / "dogs", "dogs")
    next((root / "Images").rglob("*.jpg")).unlink()
    with pytest.raises(DataError, match="1 listed images are missing"):
        data.prepare("dogs", root)


# --- synthetic data ---------------------------------------------------------------------------


def test_synthetic_images_are_easy_and_seeded():
    train, train_labels = data.make_synthetic_images(10, 8, 16, seed=0)
    test, test_labels = data.make_synthetic_images(10, 8, 16, seed=1)
    assert train.shape == (80, 3, 16, 16) and train.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert torch.equal(train_labels, torch.arange(10).repeat_interleave(8))
    assert torch.equal(train, data.make_synthetic_images(10, 8, 16, seed=0)[0])
    assert not torch.equal(train, test)
    centroids = torch.stack([train[train_labels == c].float().flatten(1).mean(0) for c in range(10)])
    predicted = torch.cdist(test.float().flatten(1), centroids).argmin(1)
    assert (predicted == test_labels).float().mean() > 0.9  # chance is 0.1
