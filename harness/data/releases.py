"""The FGVC datasets' release files: where they come from, fetching them, and reading them into VPT's splits.

    root = releases.fetch_dataset("cub", "data")          # download, verify, unpack, prepare, mark ready
    sizes = releases.prepare("cub", "data/CUB_200_2011")  # {train,val,test}.json from unpacked release files

  CUB, Flowers, Dogs -> release archives kept in <data_dir>/downloads/ (checked against their pins in DATASETS,
                  with downloads.py's locks, resume and checks), unpacked safely into a staging folder, split
                  files written by `prepare`, the archives' SHA-256 recorded in <data_dir>/downloads/SHA256SUMS
                  (only now: a bad first copy never becomes the reference), a marker file `.gated_prompt_ready`
                  written, and only then renamed into place (<data_dir>/cub, <data_dir>/flowers, <data_dir>/dogs).
  Cars, NABirds, VTAB-1k, ADE20K -> `dataset_instructions(task)`: what to fetch by hand and where to put it.

`prepare`: VPT's own split files are no longer downloadable, so `python reproduce.py prepare` and
`fetch_dataset` build equivalent ones from the CUB / NABirds text tables and the Flowers / Dogs / Cars .mat files
(scipy, imported only when a .mat file is read). The training data path (harness/data/datasets.py) reads only the json files.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.data import datasets
from harness import runtime
from harness.data.datasets import FGVC_DATASETS, FGVC_SPLITS, DataError
from harness.downloads import (SUMS_NAME, DownloadError, Pin, check_disk, check_folder, download, file_lock,
                               format_bytes, free_disk_bytes, hash_pinned, lock_path, mirror_base, mirror_url,
                               partial_path, pinned_size, record_pins, record_sum, remote_size, url_filename, verify)
from harness.runtime import write_text

READY_MARKER = ".gated_prompt_ready"

# ---------------------------------------------------------------------------------------------
# 1. Where each dataset comes from, and what each file must match (tests monkeypatch DATASETS)
# ---------------------------------------------------------------------------------------------

TFDS_DOGS = "the size / SHA-256 published in TensorFlow Datasets' url_checksums for stanford_dogs"
TFDS_FLOWERS = "the size / SHA-256 published in TensorFlow Datasets' url_checksums for oxford_flowers102"
TORCHVISION_FLOWERS = "the md5 published in torchvision's Flowers102"
CUB_MD5 = "the md5 published with common CUB-200-2011 loaders (e.g. TDeVries/cub2011_dataset, Avalanche's CUB200)"


@dataclass(frozen=True)
class SourceFile:
    url: str
    pins: tuple[Pin, ...] = ()
    approx_size: int | None = None  # bytes, for the disk check when neither the server nor a pin says
    unpack: bool = True  # a tar archive (else the file is copied into the dataset folder as is)


@dataclass(frozen=True)
class DatasetSource:
    title: str
    folder: str  # the dataset root the harness reads: <data_dir>/<folder>
    files: tuple[SourceFile, ...]
    inner: str  # the folder inside the archives that holds the release files ("" = the archive root)
    expect: tuple[str, ...]  # release entries that must exist after unpacking
    page: str


FLOWERS = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
DOGS = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
DATASETS = {
    "cub": DatasetSource(
        "CUB-200-2011", "cub",
        (SourceFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                    (Pin("md5", "97eceeb196236b17998738112f37df78", CUB_MD5),),
                    approx_size=1_150_585_339),),  # TensorFlow Datasets' size of the same archive (a Drive copy)
        inner="CUB_200_2011",
        expect=("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
        page="https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "flowers": DatasetSource(
        "Oxford Flowers-102", "flowers",
        (SourceFile(FLOWERS + "102flowers.tgz", (
            Pin("size", 344_862_509, TFDS_FLOWERS),
            Pin("sha256", "2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246", TFDS_FLOWERS),
            Pin("md5", "52808999861908f626f3c1f4e79d11fa", TORCHVISION_FLOWERS))),
         SourceFile(FLOWERS + "imagelabels.mat", (
             Pin("size", 502, TFDS_FLOWERS),
             Pin("sha256", "4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d", TFDS_FLOWERS),
             Pin("md5", "e0620be6f572b9609742df49c70aed4d", TORCHVISION_FLOWERS)), unpack=False),
         SourceFile(FLOWERS + "setid.mat", (
             Pin("size", 14_989, TFDS_FLOWERS),
             Pin("sha256", "46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd", TFDS_FLOWERS),
             Pin("md5", "a5357ecc9cb78c4bef273ce3793fc85c", TORCHVISION_FLOWERS)), unpack=False)),
        inner="", expect=("jpg", "imagelabels.mat", "setid.mat"), page=FLOWERS),
    "dogs": DatasetSource(
        "Stanford Dogs", "dogs",
        (SourceFile(DOGS + "images.tar", (
            Pin("size", 793_579_520, TFDS_DOGS),
            Pin("sha256", "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58", TFDS_DOGS))),
         SourceFile(DOGS + "lists.tar", (
             Pin("size", 481_280, TFDS_DOGS),
             Pin("sha256", "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c", TFDS_DOGS)))),
        inner="", expect=("Images", "train_list.mat", "test_list.mat", "file_list.mat"), page=DOGS),
}


# ---------------------------------------------------------------------------------------------
# 2. Fetching the datasets with stable release archives
# ---------------------------------------------------------------------------------------------


def target_folder(dataset: str, data_dir: str | os.PathLike) -> Path:
    """The folder the harness reads for an automatically downloadable dataset."""
    return Path(data_dir) / DATASETS[dataset].folder


def read_marker(root: str | os.PathLike) -> dict | None:
    """The parsed ready marker of a dataset folder, or None (absent, unreadable)."""
    try:
        marker = json.loads((Path(root) / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def dataset_ready(dataset: str, data_dir: str | os.PathLike) -> bool:
    """True when <data_dir>/<folder> was completed by fetch_dataset (marker present, split files there)."""
    root = target_folder(dataset, data_dir)
    marker = read_marker(root)
    return (marker is not None and marker.get("dataset") == dataset
            and all((root / f"{split}.json").is_file() for split in datasets.FGVC_SPLITS))


def fetch_dataset(dataset: str, data_dir: str | os.PathLike = "data", *, mirror: str | None = None) -> Path:
    """Download, verify, unpack and prepare an FGVC dataset with stable archives (cub, flowers, dogs);
    returns its root folder. Instructions-only datasets raise DownloadError carrying the instructions.

    Archives are kept in <data_dir>/downloads/ (verified again on reuse; a file put there by hand is used).
    A rerun after an interruption at any stage resumes: finished archives are reused, a partial one is
    continued, anything else is redone. A folder is ready only with its `.gated_prompt_ready` marker; a ready
    folder costs no network. One process at a time works on a dataset (file lock <data_dir>/<folder>.lock);
    the others wait, then find it ready.
    """
    if dataset not in DATASETS:
        raise DownloadError(dataset_instructions(dataset, data_dir))
    check_folder(data_dir, "--data-dir")
    mirror_base(mirror)
    data_dir = Path(data_dir)
    root = target_folder(dataset, data_dir)
    if _usable_already(dataset, data_dir, root):
        return root
    src, downloads = DATASETS[dataset], data_dir / "downloads"
    with file_lock(lock_path(root), f"fetching {src.title} into {root}"):
        if _usable_already(dataset, data_dir, root):
            return root
        print(f"{dataset}: {src.title} ({src.page}); archives are kept in {downloads}")
        todo = _plan_downloads(dataset, src, data_dir, downloads, mirror)
        shas = _fetch_archives(dataset, src, downloads, todo)
        _unpack_prepare_and_mark(dataset, src, data_dir, downloads, root, shas)
    print(f"{dataset}: ready in {root} (marker {READY_MARKER}); the archives in {downloads} can be deleted")
    return root


def _usable_already(dataset: str, data_dir: Path, root: Path) -> bool:
    """True for a ready folder, or a user's folder that already has split files; a user's folder without them is
    refused (never overwritten)."""
    if dataset_ready(dataset, data_dir):
        print(f"{dataset}: {root} is ready (downloaded {read_marker(root).get('date', '?')}); nothing to fetch")
        return True
    if root.exists() and read_marker(root) is None:
        if all((root / f"{split}.json").is_file() for split in datasets.FGVC_SPLITS):
            print(f"{dataset}: using the existing {root} (split files present; not created by the downloader)")
            return True
        raise DownloadError(f"{root} exists but was not created by the downloader and has no split files. Move "
                            f"it away to download afresh, or, if it holds the release files, build the splits "
                            f"with `python reproduce.py prepare --dataset {dataset} --root {root}`.")
    return False


def _plan_downloads(dataset: str, src: DatasetSource, data_dir: Path, downloads: Path, mirror: str | None) -> list:
    """[(file, url, target)] still to download; prints each file's size and refuses when the disk cannot hold
    the downloads plus their unpacked copies. The caller holds the dataset's lock."""
    todo, need = [], 0
    for f in src.files:
        target = downloads / url_filename(f.url)
        url = mirror_url(f.url, mirror)
        if target.is_file():
            partial_path(target).unlink(missing_ok=True)
            size = target.stat().st_size
            print(f"  {target.name}: already downloaded ({format_bytes(size)})")
        else:
            length = remote_size(url)
            size = length or pinned_size(f.pins) or f.approx_size
            have = partial_path(target).stat().st_size if partial_path(target).is_file() else 0
            todo.append((f, url, target))
            need += (size or 0) - have
            print(f"  {target.name}: {format_bytes(size)}{'' if length else ' (approximate)'} to download from {url}"
                  + (f" ({format_bytes(have)} kept from an interrupted download)" if have else ""))
        need += size or 0  # unpacked copy (about the archive size: the images are already compressed)
    check_disk(data_dir, need, f"{dataset} (downloads + unpacked files)")
    return todo


def _fetch_archives(dataset: str, src: DatasetSource, downloads: Path, todo: list) -> dict:
    """{archive name: sha256}: kept archives verified again, the missing ones downloaded and verified against
    their pins and any kept record. Nothing is recorded here: see _unpack_prepare_and_mark."""
    sums, shas = downloads / SUMS_NAME, {}
    for f in src.files:
        target = downloads / url_filename(f.url)
        if target.is_file():
            shas[target.name] = verify(target, f.pins + record_pins(sums, target.name),
                                       fix=f"Delete it (rm {target}) and run the download again (e.g. python "
                                           f"reproduce.py --task {dataset} --download).")
    for f, url, target in todo:
        print(f"{dataset}: downloading {url}")
        shas[target.name] = download(url, target, lambda p, f=f, url=url, target=target:
                                     _check_new_archive(p, f, url, sums, target.name))
    return shas


def _check_new_archive(partial: Path, f: SourceFile, url: str, sums: Path, name: str) -> str:
    recorded = record_pins(sums, name)  # a deleted archive's record is kept: the new download must match it
    fix = (f"The download from {url} is not the expected file; it was deleted. Try again, or another mirror."
           + (f" If the file changed upstream on purpose, delete its lines in {sums}." if recorded else ""))
    sha = verify(partial, f.pins + recorded, fix)
    if f.unpack and not tarfile.is_tarfile(partial):
        raise DownloadError(f"{url}: not a tar archive (an error page?); it was deleted")
    return sha


def _unpack_prepare_and_mark(dataset: str, src: DatasetSource, data_dir: Path, downloads: Path, root: Path,
                             shas: dict) -> None:
    """Unpack into a staging folder, build the split files, record the archives' SHA-256, write the marker, then
    rename the folder into place: the folder appears complete, with its marker, or not at all. Archives that no
    checksum vouches for (no hash pin, no record) are deleted when they do not unpack and prepare."""
    names = [url_filename(f.url) for f in src.files]
    unvouched = [downloads / url_filename(f.url) for f in src.files
                 if not hash_pinned(f.pins) and not record_pins(downloads / SUMS_NAME, url_filename(f.url))]
    try:
        _build_in_staging(dataset, src, data_dir, downloads, root, shas)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        need = sum((downloads / n).stat().st_size for n in names)
        raise DownloadError(f"the disk is full: unpacking {', '.join(names)} into {data_dir} needs about "
                            f"{format_bytes(need)}, {format_bytes(free_disk_bytes(data_dir))} are free. Free some "
                            f"space and run the same command again (the archives in {downloads} are kept).") from None
    except DownloadError as err:
        if not unvouched:
            raise
        for path in unvouched:
            path.unlink(missing_ok=True)
            record_sum(downloads / SUMS_NAME, path.name, None)
        raise DownloadError(f"{err}\n{', '.join(p.name for p in unvouched)} (no published checksum vouches for "
                            f"it) deleted: run the same command again to download afresh.") from None


def _build_in_staging(dataset: str, src: DatasetSource, data_dir: Path, downloads: Path, root: Path,
                      shas: dict) -> None:
    staging = data_dir / f".{src.folder}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted unpack or prepare starts over (under the lock)
    try:
        release = _unpack(src, downloads, staging)
        try:
            sizes = prepare(dataset, release, overwrite=True, verbose=False)
        except datasets.DataError as err:  # its paths are inside the staging folder, which is deleted below
            inside = f"[{', '.join(url_filename(f.url) for f in src.files)}]"
            raise DownloadError(f"{dataset}: the release files unpacked from {downloads} do not give split files: "
                                f"{str(err).replace(str(release), inside)}") from None
        print(f"{dataset}: train {sizes['train']} / val {sizes['val']} / test {sizes['test']} "
              f"(VPT: {' / '.join(map(str, datasets.FGVC_DATASETS[dataset].split_sizes))})")
        files = []
        for f in src.files:
            name = url_filename(f.url)
            size = (downloads / name).stat().st_size
            record_sum(downloads / SUMS_NAME, name, shas[name], size)  # only now: it unpacked and prepared
            files.append({"name": name, "url": f.url, "sha256": shas[name], "size": size,
                          "pins": [{"kind": p.kind, "value": p.value, "source": p.source} for p in f.pins]})
        marker = {"dataset": dataset, "title": src.title, "split_sizes": sizes, "files": files,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        runtime.write_json(release / READY_MARKER, marker)
        if root.exists():  # ours (it had a marker) but incomplete: replace it
            shutil.rmtree(root)
        os.replace(release, root)  # the commit point
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(src: DatasetSource, downloads: Path, staging: Path) -> Path:
    """Extract the archives (and copy the plain files) into staging; returns the release folder in it."""
    release = staging / src.inner if src.inner else staging
    release.mkdir(parents=True, exist_ok=True)
    for f in src.files:
        path = downloads / url_filename(f.url)
        if not f.unpack:
            shutil.copyfile(path, release / path.name)
            continue
        safe_extract(path, staging)
    missing = [name for name in src.expect if not (release / name).exists()]
    if missing:
        raise DownloadError(f"after unpacking {', '.join(url_filename(f.url) for f in src.files)} from {downloads}, "
                            f"{', '.join(str(release.relative_to(staging) / m) for m in missing)} is missing: "
                            f"not the {src.title} release archive(s)?")
    return release


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into dest with a progress bar; nothing may land outside dest (tarfile's 'data'
    filter where available, else an equivalent check). DownloadError on a damaged or unsafe archive; a full
    disk (ENOSPC) is raised as the OSError it is."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc=f"unpacking {archive.name}", unit=" files", disable=None):
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, dest, filter="data")
                else:
                    _check_member(member, dest)
                    tar.extract(member, dest)
    except DownloadError:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        raise DownloadError(f"{archive}: damaged or unsafe archive ({type(err).__name__}: "
                            f"{err.strerror or err})") from None  # never the path inside dest
    except (tarfile.TarError, EOFError, ValueError) as err:  # incl. zlib errors, FilterError
        raise DownloadError(f"{archive}: damaged or unsafe archive ({type(err).__name__}: {err})") from None


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Fallback for Pythons without tarfile's 'data' filter: regular files and folders inside dest only."""
    target = (dest / member.name).resolve()
    if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
        raise DownloadError(f"unsafe archive member {member.name!r} (outside the target folder, a link or a "
                            f"device); refusing to unpack")

# ---------------------------------------------------------------------------------------------
# 3. Instructions-only datasets
# ---------------------------------------------------------------------------------------------

CARS_HELP = "https://github.com/pytorch/vision/issues/7545"
NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"
NOAH_URL = "https://github.com/ZhangYuanhan-AI/NOAH#data-preparation"
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


def dataset_instructions(task: str, data_dir: str | os.PathLike = "data") -> str:
    """How to get a task's data by hand: what to fetch, from where, and the folder the harness reads."""
    d = Path(data_dir)
    if task in DATASETS:
        src = DATASETS[task]
        names = ", ".join(url_filename(f.url) for f in src.files)
        return (f"{task} ({src.title}) downloads automatically: python reproduce.py --task {task} --download "
                f"(or fetch_dataset). If its host is unreachable, put {names} from {src.page} (or a mirror) in "
                f"{d / 'downloads'}/ and run it again: files there are used (checked against their pinned size "
                f"and checksums). Result: {d / src.folder}/ with {', '.join(src.expect)} and {{train,val,test}}.json.")
    if task == "cars":
        return (f"Stanford Cars cannot be downloaded automatically: its original host "
                f"(ai.stanford.edu/~jkrause/cars) is gone. Get the original release files from a mirror (see "
                f"{CARS_HELP} for copies, e.g. on Kaggle): cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
                f"cars_test_annos_withlabels.mat. Arrange them as {d / 'cars'}/cars_train/*.jpg, "
                f"{d / 'cars'}/cars_test/*.jpg, {d / 'cars'}/devkit/cars_train_annos.mat and "
                f"{d / 'cars'}/cars_test_annos_withlabels.mat, then build the splits with "
                f"`python reproduce.py prepare --dataset cars --root {d / 'cars'}`.")
    if task == "nabirds":
        return (f"NABirds needs a (free) sign-up: request it at {NABIRDS_URL}, download nabirds.tar.gz and unpack "
                f"it so that {d / 'nabirds'}/images/, images.txt, image_class_labels.txt and train_test_split.txt "
                f"are directly in {d / 'nabirds'}, then build the splits with "
                f"`python reproduce.py prepare --dataset nabirds --root {d / 'nabirds'}`.")
    if task in datasets.VTAB_TASKS or task in ("vtab", "vtab-1k"):
        folder = d / "vtab-1k" / (task if task in datasets.VTAB_TASKS else "<task>")
        return (f"VTAB-1k is not downloaded automatically. Download the prepared image-folder archive linked "
                f"from {datasets.VTAB_URL} (the NOAH / RepAdapter release; the source datasets and how to build it "
                f"yourself: {NOAH_URL}) and unpack it into {d / 'vtab-1k'}/ so that each task has "
                f"{folder}/{{train800,val200,train800val200,test}}.txt (lines '<image path> <label>') and its "
                f"images. No tensorflow-datasets needed.")
    if task == "ade20k":
        return (f"ADE20K is not downloaded automatically (its host is often down). Download {ADE_URL} (about "
                f"0.9 GB) or a mirror of ADEChallengeData2016.zip and unzip it into {d}/ so that "
                f"{d / 'ADEChallengeData2016'}/images/{{training,validation}}/*.jpg and "
                f"{d / 'ADEChallengeData2016'}/annotations/{{training,validation}}/*.png exist.")
    raise DownloadError(f"unknown task {task!r}; datasets: {', '.join(list(datasets.FGVC_DATASETS) + ['ade20k'])}, "
                        f"VTAB-1k tasks: {', '.join(datasets.VTAB_TASKS)}")


# ---------------------------------------------------------------------------------------------
# 4. prepare: VPT-sized FGVC splits from the datasets' release files
# ---------------------------------------------------------------------------------------------

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
    for line_no, line in enumerate(datasets.read_list_text(_release_file(dataset, path)).splitlines(), start=1):
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
