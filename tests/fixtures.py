"""Fixture writers: tiny datasets in exactly the real on-disk layouts, built from generated images.

FGVC in VPT's json layout, VTAB-1k image folders, the FGVC release files that `prepare` reads, and
ADE20K's ADEChallengeData2016 folder. Test-only: the library modules never import this file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data.datasets import FGVC_DATASETS, FGVC_SPLITS, make_synthetic_images
from harness.runtime import write_text



def _write_jpeg(path: Path, image: torch.Tensor, width_height: tuple[int, int] | None = None) -> None:
    """Save a uint8 [3, H, W] tensor as JPEG, optionally resized to (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    if width_height is not None:
        img = img.resize(width_height, Image.BILINEAR)
    img.save(path, quality=95)


def write_fgvc_fixture(root: str | os.PathLike, dataset: str, *, class_ids: tuple = (0, 1, 2),
                       per_class: tuple[int, int, int] = (3, 1, 2), image_size: tuple[int, int] = (48, 36),
                       seed: int = 0) -> Path:
    """VPT-layout FGVC fixture: {train,val,test}.json + JPEGs under the dataset's image folder.

    per_class = images per class in (train, val, test); class_ids are the json values (0-based, as
    `prepare` writes them, by default). The i-th smallest id's images show synthetic class i, so with
    the default ids a correct reader yields labels matching the picture. Images are (width, height) =
    image_size, non-square by default.
    """
    root = Path(root)
    image_root = root / FGVC_DATASETS[dataset].image_dir
    index_of = {cid: i for i, cid in enumerate(sorted(class_ids))}
    for split, count in zip(FGVC_SPLITS, per_class):
        images, _ = make_synthetic_images(len(index_of), count, 32, seed=seed + FGVC_SPLITS.index(split))
        anno = {}
        for cid in class_ids:
            for k in range(count):
                key = f"{cid:03d}.class_{cid}/{split}_{k:03d}.jpg"
                _write_jpeg(image_root / key, images[index_of[cid] * count + k], image_size)
                anno[key] = cid
        write_text(root / f"{split}.json", json.dumps(anno))
    return root


def write_vtab_fixture(root: str | os.PathLike, task: str, *, num_classes: int = 3,
                       per_class: tuple[int, int, int] = (3, 1, 2), image_size: tuple[int, int] = (32, 32),
                       seed: int = 0) -> Path:
    """VTAB-1k image-folder fixture <root>/<task>/{train800,val200,train800val200,test}.txt + JPEGs.

    per_class = images per class in (train800, val200, test); train800val200 lists both.
    """
    task_dir = Path(root) / task
    lines = {}
    for split_index, (split, count) in enumerate(zip(("train800", "val200", "test"), per_class)):
        images, labels = make_synthetic_images(num_classes, count, 32, seed=seed + split_index)
        lines[split] = []
        for n, (image, label) in enumerate(zip(images, labels.tolist())):
            rel_path = f"images/{split}/{n:05d}.jpg"
            _write_jpeg(task_dir / rel_path, image, image_size)
            lines[split].append(f"{rel_path} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        write_text(task_dir / f"{split}.txt", "\n".join(split_lines) + "\n")
    return Path(root)


def write_release_fixture(root: str | os.PathLike, dataset: str, *, num_classes: int = 3,
                          train_per_class: int = 10, test_per_class: int = 4, seed: int = 0) -> Path:
    """Tiny copy of a dataset's official release in its real file formats (what `prepare` reads).

    train_per_class counts official training images (Flowers: half trnid, half valid).
    The .mat files need scipy.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, labels = make_synthetic_images(num_classes, train_per_class + test_per_class, 16, seed=seed)
    # (class id, is_train, image) per image; official ids are 1-based
    items = [(int(c) + 1, i % (train_per_class + test_per_class) < train_per_class, img)
             for i, (img, c) in enumerate(zip(images, labels))]
    _RELEASE_WRITERS[dataset](root, items, train_per_class)
    return root


def _write_cub_style_release(root: Path, items: list, nabirds: bool) -> None:
    images_txt, labels_txt, split_txt = [], [], []
    for n, (cid, is_train, image) in enumerate(items, start=1):
        if nabirds:  # uuid-like image ids, 4-digit folders, non-contiguous class ids
            image_id, cid = f"{n:08x}-21dc-4d0c-bfe1-{cid:012x}", 295 + 3 * cid
            rel_path = f"{cid:04d}/{image_id.replace('-', '')}.jpg"
        else:
            image_id, rel_path = str(n), f"{cid:03d}.Bird_{cid}/Bird_{cid}_{n:04d}.jpg"
        _write_jpeg(root / "images" / rel_path, image)
        images_txt.append(f"{image_id} {rel_path}")
        labels_txt.append(f"{image_id} {cid}")
        split_txt.append(f"{image_id} {int(is_train)}")
    for name, lines in (("images.txt", images_txt), ("image_class_labels.txt", labels_txt),
                        ("train_test_split.txt", split_txt)):
        (root / name).write_text("\n".join(lines) + "\n")


def _write_flowers_release(root: Path, items: list, train_per_class: int) -> None:
    import scipy.io
    setid: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    seen_per_class: dict[int, int] = {}
    for n, (cid, is_train, image) in enumerate(items, start=1):
        _write_jpeg(root / "jpg" / f"image_{n:05d}.jpg", image)
        k = seen_per_class[cid] = seen_per_class.get(cid, 0) + 1
        setid["tstid" if not is_train else "trnid" if k <= train_per_class // 2 else "valid"].append(n)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[c for c, _, _ in items]], dtype=np.float64)})
    scipy.io.savemat(root / "setid.mat", {k: np.array([v], dtype=np.float64) for k, v in setid.items()})


def _cell_column(strings: list[str]) -> np.ndarray:
    """A MATLAB cell column of strings, as savemat writes it."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = np.array([s])
    return cells


def _write_dogs_release(root: Path, items: list) -> None:
    import scipy.io
    lists: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for n, (cid, is_train, image) in enumerate(items, start=1):
        rel_path = f"n{cid:08d}-breed_{cid}/n{cid:08d}_{n}.jpg"
        _write_jpeg(root / "Images" / rel_path, image)
        lists[is_train][0].append(rel_path)
        lists[is_train][1].append(cid)
    for is_train, name in ((True, "train_list.mat"), (False, "test_list.mat")):
        files, cids = lists[is_train]
        scipy.io.savemat(root / name, {
            "file_list": _cell_column(files),
            "annotation_list": _cell_column([f.removesuffix(".jpg") for f in files]),
            "labels": np.array(cids, dtype=np.float64).reshape(-1, 1)})


def _write_cars_release(root: Path, items: list) -> None:
    import scipy.io
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    annotations: dict[bool, list[tuple]] = {True: [], False: []}
    for cid, is_train, image in items:
        fname = f"{len(annotations[is_train]) + 1:05d}.jpg"
        _write_jpeg(root / ("cars_train" if is_train else "cars_test") / fname, image)
        box = [np.array([[v]], dtype=np.uint8) for v in (1, 1, 15, 15)]
        annotations[is_train].append((*box, np.array([[cid]], dtype=np.uint8), np.array([fname])))
    for is_train, path in ((True, root / "devkit" / "cars_train_annos.mat"),
                           (False, root / "cars_test_annos_withlabels.mat")):
        struct = np.empty((1, len(annotations[is_train])), dtype=[(f, object) for f in fields])
        for i, record in enumerate(annotations[is_train]):
            struct[0, i] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"annotations": struct})


_RELEASE_WRITERS = {
    "cub": lambda root, items, _: _write_cub_style_release(root, items, nabirds=False),
    "nabirds": lambda root, items, _: _write_cub_style_release(root, items, nabirds=True),
    "flowers": _write_flowers_release,
    "dogs": lambda root, items, _: _write_dogs_release(root, items),
    "cars": lambda root, items, _: _write_cars_release(root, items),
}


def write_ade_fixture(root, n_train=8, n_val=4, size=(64, 96), seed=0, num_classes=4):
    """A tiny dataset in the real layout under root/ADEChallengeData2016: each image is a few rectangles
    of flat colour + noise, the colour determines the class (labels 1..num_classes), with 0 (ignored)
    borders between rectangles. Returns the ADEChallengeData2016 path."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    palette = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [230, 230, 230], [240, 200, 30],
                        [150, 40, 200], [30, 200, 200], [20, 20, 20]])[:num_classes]
    ade = os.path.join(os.fspath(root), "ADEChallengeData2016")
    for split, count in (("training", n_train), ("validation", n_val)):
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(ade, kind, split), exist_ok=True)
        for i in range(count):
            label = np.zeros((h, w), np.uint8)
            ys = [0, *sorted(rng.integers(h // 4, 3 * h // 4, 1)), h]
            xs = [0, *sorted(rng.integers(w // 4, 3 * w // 4, 2)), w]
            for y0, y1 in zip(ys, ys[1:]):
                for x0, x1 in zip(xs, xs[1:]):
                    label[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = rng.integers(1, num_classes + 1)
            image = np.where(label[..., None] > 0, palette[np.maximum(label, 1) - 1], 128)
            image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(os.path.join(ade, "images", split, stem + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(ade, "annotations", split, stem + ".png"))
    return ade


def fill_disk(path: Path) -> None:
    """Write to `path` until its disk is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
