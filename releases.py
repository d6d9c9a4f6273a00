"""Release-file readers: VPT-sized FGVC train/val/test json splits from each dataset's own release files.

    sizes = releases.prepare("cub", "data/CUB_200_2011")    # writes {train,val,test}.json, returns the sizes

VPT's own split files are no longer downloadable, so `python reproduce.py prepare` and the downloader
(downloads.fetch_dataset, after unpacking) build equivalent ones here: CUB / NABirds text tables, the
Flowers / Dogs / Cars .mat files (scipy, imported only when a .mat file is read). The training data path
(data.py) reads only the json files this writes.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from data import FGVC_DATASETS, FGVC_SPLITS, DataError
from runtime import write_text

PREPARE_SEED = 42


def prepare(dataset: str, root: str | os.PathLike, *, overwrite: bool = False,
            seed: int = PREPARE_SEED, verbose: bool = True) -> dict[str, int]:
    """Write <root>/{train,val,test}.json from the official release files; return the split sizes.

    VPT's own split files are no longer downloadable. Official test = test. The official train set is
    split into train + val with val = round(official_train * vpt_val / (vpt_train + vpt_val)),
    stratified by class (each class gives floor or ceil of its share), seeded. Oxford Flowers ships
    its own train/val/test (setid.mat), used as is. Json values are 0-based class indices: the
    position of the official class id in sorted order (CUB's 1..200 -> 0..199; NABirds' non-contiguous
    ids -> 0..554), the same mapping VPT applies to official ids.
    """
    info = FGVC_DATASETS[dataset]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{dataset}: dataset folder {root} not found; download it from {info.url}")
    targets = {split: root / f"{split}.json" for split in FGVC_SPLITS}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist; to replace them run `python reproduce.py prepare "
                        f"--dataset {dataset} --root {root} --overwrite`")
    train, val, test = _OFFICIAL_SPLIT_READERS[dataset](root)
    if not train:
        raise DataError(f"{dataset}: the release files under {root} list no training images")
    if val is None:
        vpt_train, vpt_val, _ = info.split_sizes
        train, val = _hold_out_val(train, round(len(train) * vpt_val / (vpt_train + vpt_val)), seed)
    splits = _to_class_indices(dataset, root, {"train": train, "val": val, "test": test})
    _check_images_exist(dataset, root / info.image_dir, splits)
    for split, anno in splits.items():
        write_text(targets[split], json.dumps(dict(sorted(anno.items())), indent=0))
    sizes = {split: len(anno) for split, anno in splits.items()}
    if verbose:
        print(f"{dataset}: train {sizes['train']} / val {sizes['val']} / test {sizes['test']} written to {root} "
              f"(VPT: {' / '.join(map(str, info.split_sizes))})")
    return sizes


def _to_class_indices(dataset: str, root: Path, splits: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Official class ids -> 0-based indices by sorted order over all splits."""
    official_ids = sorted({cid for anno in splits.values() for cid in anno.values()})
    n_classes = FGVC_DATASETS[dataset].num_classes
    if len(official_ids) > n_classes:
        raise DataError(f"{dataset}: the release files under {root} hold {len(official_ids)} distinct class ids, "
                        f"but {dataset} has {n_classes} classes")
    index_of = {cid: index for index, cid in enumerate(official_ids)}
    return {split: {key: index_of[cid] for key, cid in anno.items()} for split, anno in splits.items()}


def _hold_out_val(train: dict[str, int], n_val: int, seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """Stratified hold-out of exactly n_val images.

    Each class's images get positions (rank + u) / class_size for a random rank order and u ~ U(0, 1);
    the n_val lowest positions go to val, so each class gives floor or ceil of its proportional share.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for key in sorted(train):
        by_class.setdefault(train[key], []).append(key)
    positions = []
    for cid in sorted(by_class):
        keys = by_class[cid]
        rng.shuffle(keys)
        positions += [((rank + rng.random()) / len(keys), key) for rank, key in enumerate(keys)]
    val_keys = {key for _, key in sorted(positions)[:n_val]}
    return ({k: c for k, c in train.items() if k not in val_keys},
            {k: c for k, c in train.items() if k in val_keys})


def _check_images_exist(dataset: str, image_root: Path, splits: dict[str, dict[str, int]]) -> None:
    missing = [str(image_root / key) for anno in splits.values() for key in anno if not (image_root / key).is_file()]
    if missing:
        raise DataError(f"{dataset}: {len(missing)} listed images are missing, e.g. {', '.join(missing[:3])}; "
                        f"download the images from {FGVC_DATASETS[dataset].url}")


def _release_file(dataset: str, *candidates: Path) -> Path:
    """The first existing candidate path, else DataError naming the expected path and the URL."""
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{dataset}: release file {candidates[0]} not found; download the dataset from "
                    f"{FGVC_DATASETS[dataset].url}")


def _read_id_table(dataset: str, path: Path) -> dict[str, str]:
    """CUB/NABirds metadata: lines "<image id> <value>" -> {image id: value}."""
    table = {}
    for line_no, line in enumerate(_release_file(dataset, path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{line_no}: malformed line {line!r}, expected '<image id> <value>'")
        table[parts[0]] = parts[1]
    return table


def _official_cub_style(dataset: str, root: Path) -> tuple[dict, None, dict]:
    """CUB_200_2011 and NABirds: images.txt, image_class_labels.txt, train_test_split.txt."""
    paths = _read_id_table(dataset, root / "images.txt")
    labels = _read_id_table(dataset, root / "image_class_labels.txt")
    is_train = _read_id_table(dataset, root / "train_test_split.txt")
    train, test = {}, {}
    for image_id, rel_path in paths.items():
        if image_id not in labels or is_train.get(image_id) not in ("0", "1") or not labels[image_id].isdigit():
            raise DataError(f"{dataset}: image id {image_id} of {root / 'images.txt'} lacks a valid entry in "
                            f"{root / 'image_class_labels.txt'} or {root / 'train_test_split.txt'}")
        (train if is_train[image_id] == "1" else test)[rel_path] = int(labels[image_id])
    return train, None, test


def _loadmat(dataset: str, *candidates: Path) -> tuple[Path, dict]:
    path = _release_file(dataset, *candidates)
    try:
        import scipy.io  # optional: only `prepare` for .mat-based releases needs it
    except ImportError:
        raise DataError(f"reading {path} needs scipy: pip install scipy") from None
    try:
        return path, scipy.io.loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for corrupt files
        raise DataError(f"cannot read {path}: {err}") from None


def _mat_field(contents: dict | np.ndarray, field: str, path: Path) -> np.ndarray:
    try:
        return np.atleast_1d(contents[field])
    except (KeyError, ValueError, IndexError):
        raise DataError(f"{path}: field {field!r} missing") from None


def _official_flowers(root: Path) -> tuple[dict, dict, dict]:
    """Oxford Flowers 102: imagelabels.mat (labels 1..102) and setid.mat (trnid/valid/tstid, 1-based)."""
    labels_path, labels_mat = _loadmat("flowers", root / "imagelabels.mat")
    setid_path, setid = _loadmat("flowers", root / "setid.mat")
    labels = _mat_field(labels_mat, "labels", labels_path)
    splits = []
    for field in ("trnid", "valid", "tstid"):
        ids = _mat_field(setid, field, setid_path)
        if ids.max(initial=0) > len(labels):
            raise DataError(f"{setid_path}: {field} refers to image {ids.max()} but {labels_path} has {len(labels)} labels")
        splits.append({f"jpg/image_{int(i):05d}.jpg": int(labels[int(i) - 1]) for i in ids})
    return splits[0], splits[1], splits[2]


def _official_dogs(root: Path) -> tuple[dict, None, dict]:
    """Stanford Dogs lists.tar: train_list.mat / test_list.mat with file_list (cells) and labels 1..120."""
    splits = []
    for name in ("train_list.mat", "test_list.mat"):
        path, contents = _loadmat("dogs", root / name)
        files, labels = _mat_field(contents, "file_list", path), _mat_field(contents, "labels", path)
        splits.append({str(f): int(c) for f, c in zip(files, labels, strict=True)})
    return splits[0], None, splits[1]


def _official_cars(root: Path) -> tuple[dict, None, dict]:
    """Stanford Cars: devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat (struct 'annotations')."""
    splits = []
    for folder, candidates in (("cars_train", [root / "devkit" / "cars_train_annos.mat"]),
                               ("cars_test", [root / "cars_test_annos_withlabels.mat",
                                              root / "devkit" / "cars_test_annos_withlabels.mat"])):
        path, contents = _loadmat("cars", *candidates)
        annotations = _mat_field(contents, "annotations", path)
        try:
            splits.append({f"{folder}/{a['fname']}": int(a["class"]) for a in annotations})
        except (ValueError, IndexError, TypeError):
            raise DataError(f"{path}: annotations lack 'fname'/'class' fields") from None
    return splits[0], None, splits[1]


_OFFICIAL_SPLIT_READERS = {
    "cub": lambda root: _official_cub_style("cub", root),
    "nabirds": lambda root: _official_cub_style("nabirds", root),
    "flowers": _official_flowers,
    "dogs": _official_dogs,
    "cars": _official_cars,
}
