"""Classification data for the Gated Prompt Tuning harness (FGVC and VTAB-1k).

Sections, top to bottom:
  1. registries and task metadata (REFERENCE.md section 3)
  2. split-list readers for the on-disk layouts, raising DataError on bad input
  3. decode-once image cache (threaded PIL decode, optional .npy disk cache)
  4. BatchLoader: seeded, shardable batches with crop/flip done as tensor indexing
  5. prepare: VPT-sized FGVC json splits built from each dataset's own release files
  6. synthetic images (for the demo and the benchmark)
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from runtime import write_text

# ---------------------------------------------------------------------------------------------
# 1. Registries and metadata
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE = 224  # the ViT input resolution
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Transforms, checked against VPT's official code (KMnP/vpt, src/data/transforms.py, get_transforms
# with size 224): train = Resize(256) + RandomCrop(224) + RandomHorizontalFlip(0.5); eval = Resize(256)
# + CenterCrop(224); then ToTensor + ImageNet Normalize. Resize(256) is given an INT, so torchvision
# scales the SHORTER side to 256 and keeps the aspect ratio -- it is not a square Resize((256, 256)).
# A fixed-shape uint8 cache needs square images, so we cache the central 256x256 square of the
# short-side-256 image. Eval output is then identical to VPT's (two centred crops compose exactly);
# train random crops are drawn from that central square, i.e. slightly less translation along an
# image's long side than VPT.
FGVC_RESIZE = 256
# VTAB in VPT (src/data/datasets/tf_dataset.py, preprocess_fn): tf.image.resize(image, [224, 224]), no
# augmentation, then /255 and ImageNet mean/std. We compute TF2's tf.image.resize default: bilinear,
# half-pixel centres, no antialiasing (what torch's interpolate computes with align_corners=False,
# antialias=False), rounded to uint8 for the cache where TF keeps float32 (at most half a grey level
# apart). VPT imports tensorflow.compat.v1, whose tf.image.resize is TF1's resize_images: ResizeBilinear
# with half_pixel_centers=False, which samples source x = target x * s (s = in / out) instead of
# (target x + 0.5) * s - 0.5, i.e. (s - 1) / 2 source pixels apart from ours.


@dataclass(frozen=True)
class FgvcInfo:
    image_dir: str  # image folder relative to the dataset root; json keys are relative to it
    num_classes: int
    split_sizes: tuple[int, int, int]  # VPT's (train, val, test) sizes, REFERENCE.md section 3
    url: str  # official download page


FGVC_DATASETS = {
    "cub": FgvcInfo("images", 200, (5394, 600, 5794),
                    "https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "nabirds": FgvcInfo("images", 555, (21536, 2393, 24633), "https://dl.allaboutbirds.org/nabirds"),
    "flowers": FgvcInfo("", 102, (1020, 1020, 6149), "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    # The Stanford Cars page has been offline at times; mirrors of the same files exist (e.g. Kaggle).
    "cars": FgvcInfo("", 196, (7329, 815, 8041), "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"),
    "dogs": FgvcInfo("Images", 120, (10800, 1200, 8580), "http://vision.stanford.edu/aditya86/ImageNetDogs/"),
}
FGVC_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class VtabInfo:
    num_classes: int
    group: str  # "natural" | "specialized" | "structured"


# The 19 VTAB-1k task folders in the paper's canonical order (REFERENCE.md section 3).
VTAB_TASKS = {
    "cifar": VtabInfo(100, "natural"),
    "caltech101": VtabInfo(102, "natural"),
    "dtd": VtabInfo(47, "natural"),
    "oxford_flowers102": VtabInfo(102, "natural"),
    "oxford_iiit_pet": VtabInfo(37, "natural"),
    "svhn": VtabInfo(10, "natural"),
    "sun397": VtabInfo(397, "natural"),
    "patch_camelyon": VtabInfo(2, "specialized"),
    "eurosat": VtabInfo(10, "specialized"),
    "resisc45": VtabInfo(45, "specialized"),
    "diabetic_retinopathy": VtabInfo(5, "specialized"),
    "clevr_count": VtabInfo(8, "structured"),
    "clevr_dist": VtabInfo(6, "structured"),
    "dmlab": VtabInfo(6, "structured"),
    "kitti": VtabInfo(4, "structured"),
    "dsprites_loc": VtabInfo(16, "structured"),
    "dsprites_ori": VtabInfo(16, "structured"),
    "smallnorb_azi": VtabInfo(18, "structured"),
    "smallnorb_ele": VtabInfo(9, "structured"),
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
# Image-folder VTAB-1k as used by PyTorch PETL code (preprocessed zip linked from RepAdapter/NOAH);
# the benchmark itself: https://google-research.github.io/task_adaptation/
VTAB_URL = "https://github.com/luogen1996/RepAdapter#data-preparation"


class DataError(Exception):
    """Missing or malformed dataset files; the message names the path (the harness exits with 2)."""


# Folder names accepted under the data directory, first match wins. The first name is ours; the others
# are the names the releases unpack to or that common loaders use: CUB_200_2011.tgz unpacks to
# CUB_200_2011/, the NABirds tarball to nabirds/, torchvision's Flowers102 and StanfordCars datasets
# use flowers-102/ and stanford_cars/. "vtab" holds the VTAB-1k task folders (the NOAH/RepAdapter
# archive unpacks to vtab-1k/).
DATASET_FOLDERS = {
    "cub": ("cub", "CUB_200_2011"),
    "nabirds": ("nabirds", "NABirds"),
    "flowers": ("flowers", "oxford_flowers102", "flowers102", "flowers-102", "102flowers"),
    "cars": ("cars", "Cars", "stanford_cars", "StanfordCars"),
    "dogs": ("dogs", "Stanford_Dogs", "StanfordDogs", "stanford_dogs"),
    "vtab": ("vtab-1k", "VTAB-1k", "vtab"),
}


def task_kind(task: str) -> str:
    """"fgvc" or "vtab"."""
    if task in FGVC_DATASETS:
        return "fgvc"
    if task in VTAB_TASKS:
        return "vtab"
    raise ValueError(f"unknown task {task!r}; known: {sorted(FGVC_DATASETS) + list(VTAB_TASKS)}")


def num_classes(task: str) -> int:
    """Number of classes of an FGVC dataset or VTAB task."""
    return FGVC_DATASETS[task].num_classes if task_kind(task) == "fgvc" else VTAB_TASKS[task].num_classes


def dataset_root(task: str, data_dir: str | os.PathLike) -> Path:
    """The dataset folder of an FGVC task, or the folder holding a VTAB task's folder, under data_dir.

    The first existing folder among DATASET_FOLDERS' names; DataError lists every accepted path.
    """
    if task_kind(task) == "fgvc":
        candidates = [Path(data_dir) / name for name in DATASET_FOLDERS[task]]
        found = [path for path in candidates if path.is_dir()]
        where, url = "", FGVC_DATASETS[task].url
    else:
        candidates = [Path(data_dir) / name for name in DATASET_FOLDERS["vtab"]]
        found = [path for path in candidates if (path / task).is_dir()]
        where, url = f" holding the task folder {task}/", VTAB_URL
    if found:
        return found[0]
    raise DataError(f"{task}: no dataset folder{where} found; looked for {', '.join(map(str, candidates))}. "
                    f"Download it from {url}")


def split_names(task: str, protocol: str) -> tuple[str, str]:
    """(train split, eval split): "final" = train -> test, "sweep" = lr search on held-out val.

    FGVC: final train -> test, sweep train -> val. VTAB: final train800val200 -> test,
    sweep train800 -> val200 (REFERENCE.md section 3, VTAB protocol).
    """
    splits = {
        ("fgvc", "final"): ("train", "test"),
        ("fgvc", "sweep"): ("train", "val"),
        ("vtab", "final"): ("train800val200", "test"),
        ("vtab", "sweep"): ("train800", "val200"),
    }
    if protocol not in ("final", "sweep"):
        raise ValueError(f"protocol must be 'final' or 'sweep', got {protocol!r}")
    return splits[task_kind(task), protocol]


# ---------------------------------------------------------------------------------------------
# 2. Split-list readers
# ---------------------------------------------------------------------------------------------


def read_split(task: str, root: str | os.PathLike, split: str) -> tuple[list[str], list[int]]:
    """Image paths and 0-based labels of one split, validated against the task's class count.

    FGVC: root is the dataset folder holding {train,val,test}.json. VTAB: root holds the task folders.
    """
    if task_kind(task) == "fgvc":
        return _read_fgvc_split(task, Path(root), split)
    return _read_vtab_split(task, Path(root), split)


def _read_fgvc_split(dataset: str, root: Path, split: str) -> tuple[list[str], list[int]]:
    """VPT json layout: {relative image path: class id}. Every split file present is read and checked
    (see _fgvc_class_index), so all splits share one id -> index mapping."""
    info = FGVC_DATASETS[dataset]
    if split not in FGVC_SPLITS:
        raise ValueError(f"FGVC split must be one of {FGVC_SPLITS}, got {split!r}")
    if not root.is_dir():
        raise DataError(
            f"{dataset}: dataset folder {root} not found (expected {{train,val,test}}.json there and images "
            f"under {root / info.image_dir}). Download it from {info.url}, then build the split files with "
            f"`python reproduce.py prepare --dataset {dataset} --root {root}`.")
    split_file = root / f"{split}.json"
    if not split_file.is_file():
        raise DataError(f"{dataset}: split file {split_file} not found; build it from the release files with "
                        f"`python reproduce.py prepare --dataset {dataset} --root {root}`.")
    annotations = {s: _read_json_split(root / f"{s}.json") for s in FGVC_SPLITS if (root / f"{s}.json").is_file()}
    index_of = _fgvc_class_index(dataset, root, annotations)
    _check_eval_ids_in_train(root, annotations)
    image_root = root / info.image_dir
    anno = annotations[split]
    return [str(image_root / key) for key in anno], [index_of[cid] for cid in anno.values()]


def _read_json_split(path: Path) -> dict[str, int]:
    """One VPT split json, checked: a non-empty object {relative image path: integer class id}."""
    try:
        anno = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed json ({err.msg})") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f"{path}: expected a non-empty json object {{relative image path: class id}}")
    for key, cid in anno.items():
        if type(cid) is not int:  # also rejects true/false, which Python treats as ints
            raise DataError(f"{path}: image {key!r} has class id {cid!r}; class ids must be integers")
    return anno


def _fgvc_class_index(dataset: str, root: Path, annotations: dict[str, dict[str, int]]) -> dict[int, int]:
    """Class id -> class index, one mapping for every split file in `annotations` ({split: json}).

    With C classes: if every id is in 0..C-1, index = id. Otherwise the ids are official ids (e.g.
    NABirds' non-contiguous ones) and get VPT's mapping, the position in sorted order -- allowed only
    when the files together hold exactly C distinct ids. (VPT's json_dataset.py sorts each split's ids
    on its own; that is the same mapping as long as every split holds every class.) Anything else is
    a DataError naming an offending entry, so a stray id can never become an extra class.
    """
    n_classes = FGVC_DATASETS[dataset].num_classes
    ids = {cid for anno in annotations.values() for cid in anno.values()}
    if all(0 <= cid < n_classes for cid in ids):
        return {cid: cid for cid in ids}
    if len(ids) == n_classes:
        return {cid: index for index, cid in enumerate(sorted(ids))}
    name, key, cid = next((name, key, cid) for name, anno in annotations.items() for key, cid in anno.items()
                          if not 0 <= cid < n_classes)
    raise DataError(f"{root / f'{name}.json'}: image {key!r} has class id {cid}, outside 0..{n_classes - 1} "
                    f"({dataset} has {n_classes} classes). Ids outside that range are read as official ids "
                    f"(mapped by sorted order) only when the split files together hold exactly {n_classes} "
                    f"distinct ids; they hold {len(ids)}.")


def _check_eval_ids_in_train(root: Path, annotations: dict[str, dict[str, int]]) -> None:
    """Every class id of val.json / test.json must occur in train.json (when train.json exists)."""
    if "train" not in annotations:
        return
    train_ids = set(annotations["train"].values())
    for name in ("val", "test"):
        for key, cid in annotations.get(name, {}).items():
            if cid not in train_ids:
                raise DataError(f"{root / f'{name}.json'}: image {key!r} has class id {cid}, which no image in "
                                f"{root / 'train.json'} has")


def _read_vtab_split(task: str, root: Path, split: str) -> tuple[list[str], list[int]]:
    """VTAB-1k image-folder layout: <root>/<task>/<split>.txt, lines "<path relative to task dir> <label>"."""
    if split not in VTAB_SPLITS:
        raise ValueError(f"VTAB split must be one of {VTAB_SPLITS}, got {split!r}")
    task_dir = root / task
    if not task_dir.is_dir():
        raise DataError(f"VTAB-1k task folder {task_dir} not found (expected {', '.join(VTAB_SPLITS)} .txt lists "
                        f"there). Get the VTAB-1k image folders, see {VTAB_URL}")
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"VTAB-1k split list {list_file} not found")
    n_classes = VTAB_TASKS[task].num_classes
    paths, labels = [], []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{line_no}: malformed line {line!r}, expected '<image path> <label>'")
        label = int(parts[1])
        if not 0 <= label < n_classes:
            raise DataError(f"{list_file}:{line_no}: label {label} out of range for {task} ({n_classes} classes)")
        paths.append(str(task_dir / parts[0]))
        labels.append(label)
    if not paths:
        raise DataError(f"{list_file}: no images listed")
    return paths, labels


# ---------------------------------------------------------------------------------------------
# 3. Decode-once cache
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageSplit:
    """One decoded split: uint8 images [N, 3, S, S] (host or memory-mapped) and int64 labels [N]."""

    task: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor


def cached_image_size(task: str) -> int:
    """Side of the cached square images: 256 for FGVC (cropped to 224 on the fly), 224 for VTAB."""
    return FGVC_RESIZE if task_kind(task) == "fgvc" else IMAGE_SIZE


def decode_image(path: str, size: int, keep_aspect: bool) -> np.ndarray:
    """Decode one image to uint8 [3, size, size] with PIL bilinear resizing; DataError names the file.

    keep_aspect=True: shorter side -> size, then the central square (VPT's FGVC Resize(256), see top).
    keep_aspect=False: stretch to size x size with resize_like_tf (VTAB).
    """
    if not os.path.isfile(path):
        raise DataError(f"image file {path} not found")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # forces the full decode; truncated/corrupt files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None
    if keep_aspect:
        img = TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.BILINEAR), size)
    else:
        return resize_like_tf(torch.from_numpy(np.array(img)).permute(2, 0, 1), size).numpy()
    return np.array(img).transpose(2, 0, 1)  # np.array: writable, unlike np.asarray of a PIL image


def resize_like_tf(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, size, size] as TF2's tf.image.resize(image, [size, size]) (see top)."""
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def decode_images(paths: list[str], out: np.ndarray, keep_aspect: bool, desc: str) -> None:
    """Decode paths into out [N, 3, S, S] with a thread pool (PIL releases the GIL) and a progress bar."""
    size = out.shape[-1]

    def decode_into(i: int) -> None:
        out[i] = decode_image(paths[i], size, keep_aspect)

    pool = ThreadPoolExecutor(max_workers=min(16, max(2, os.cpu_count() or 2)))
    try:  # disable=None: no bar when stderr is not a terminal
        for _ in tqdm(pool.map(decode_into, range(len(paths))), total=len(paths), desc=desc, disable=None):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on the first bad image, skip the rest


def load_split(task: str, root: str | os.PathLike, split: str, *,
               cache_dir: str | os.PathLike | None = None) -> ImageSplit:
    """Read a split list and decode its images once (or memory-map them from cache_dir if cached).

    The cache file is keyed by task, split, size and a hash of the listed image paths (relative to
    root) and the resize recipe, so LR-sweep runs reuse it; it does not notice edited image files.
    """
    paths, labels = read_split(task, root, split)
    size, keep_aspect = cached_image_size(task), task_kind(task) == "fgvc"
    shape = (len(paths), 3, size, size)
    desc = f"decoding {task}/{split}"
    if cache_dir is None:
        images = np.empty(shape, dtype=np.uint8)
        decode_images(paths, images, keep_aspect, desc)
    else:
        recipe = f"keep_aspect={keep_aspect} size={size} pil-bilinear\n"
        relative = "\n".join(os.path.relpath(p, root) for p in paths)
        digest = hashlib.sha256((recipe + relative).encode()).hexdigest()[:16]
        images = _cached_decode(Path(cache_dir) / f"{task}-{split}-{size}px-{digest}.npy",
                                paths, shape, keep_aspect, desc)
    return ImageSplit(task, split, torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64))


def _cached_decode(cache_file: Path, paths: list[str], shape: tuple, keep_aspect: bool, desc: str) -> np.ndarray:
    """Memory-map cache_file if it holds the right array, else decode straight into a new one atomically."""
    if cache_file.is_file():
        cached = np.load(cache_file, mmap_mode="c")  # copy-on-write: writable for torch, file untouched
        if cached.shape == shape and cached.dtype == np.uint8:
            return cached
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.tmp{os.getpid()}")
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        decode_images(paths, images, keep_aspect, desc)
        images.flush()
        del images
        os.replace(tmp, cache_file)  # atomic: concurrent ranks/runs never see a partial file
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(cache_file, mmap_mode="c")


# ---------------------------------------------------------------------------------------------
# 4. Batches
# ---------------------------------------------------------------------------------------------


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous eval shard [start, stop) of rank: no padding, shards cover 0..n-1 exactly once."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for (seed, epoch); hashing avoids seed+epoch collisions such as (42, 1) == (43, 0)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class BatchLoader:
    """(float32 normalized images [B, 3, crop, crop], int64 labels [B]) batches from uint8 images.

    train=True: a fresh shuffle each epoch (call set_epoch), a pure function of (seed, epoch); ranks
    take strided slices of the permutation padded by wrapping, like torch's DistributedSampler
    (drop_last=False), so every rank has the same count. augment=True (FGVC train): per-sample random
    crop + horizontal flip (p=0.5) drawn from the same generator. Otherwise: center crop.
    train=False: contiguous unpadded shards (see shard_range / sample_indices) for exact gathering.
    Images stay on the host (each batch moved with non_blocking) unless images_on_device=True.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, train: bool,
                 augment: bool = False, crop_size: int = IMAGE_SIZE, seed: int = 42, rank: int = 0,
                 world_size: int = 1, device: str | torch.device | None = None, images_on_device: bool = False):
        if augment and not train:
            raise ValueError("augment applies to training batches only")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if images.dtype != torch.uint8 or images.shape[-1] < crop_size or len(images) != len(labels):
            raise ValueError("expected uint8 images [N, 3, S, S] with S >= crop_size and N labels")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images_on_device = images_on_device
        self.images = images.to(self.device) if images_on_device else images
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.augment, self.crop_size = batch_size, train, augment, crop_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle/augmentation the next iteration uses."""
        self.epoch = epoch

    def sample_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices this rank visits, in batch order (eval: its contiguous shard)."""
        return self._plan(self.epoch if epoch is None else epoch)[0]

    def __len__(self) -> int:
        n = len(self.labels)
        start, stop = shard_range(n, self.rank, self.world_size)
        per_rank = math.ceil(n / self.world_size) if self.train else stop - start
        return math.ceil(per_rank / self.batch_size)

    def _plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's order and, if augmenting, per-sample (top, left, flip) rows [M, 3] (CPU tensors)."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(*shard_range(n, self.rank, self.world_size)), None
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        total = math.ceil(n / self.world_size) * self.world_size
        order = torch.randperm(n, generator=generator).repeat(math.ceil(total / n))[:total]
        crops = None
        if self.augment:
            max_offset = self.images.shape[-1] - self.crop_size
            top = torch.randint(0, max_offset + 1, (total,), generator=generator)
            left = torch.randint(0, max_offset + 1, (total,), generator=generator)
            flip = (torch.rand(total, generator=generator) < 0.5).long()
            crops = torch.stack([top, left, flip], dim=1)[self.rank::self.world_size]
        return order[self.rank::self.world_size], crops

    def __iter__(self):
        order, crops = self._plan(self.epoch)
        # non_blocking: these small per-epoch copies must not synchronize the device either
        order_on_device = order.to(self.device, non_blocking=True)
        crops = crops.to(self.device, non_blocking=True) if crops is not None else None
        for start in range(0, len(order), self.batch_size):
            batch = slice(start, start + self.batch_size)
            images = self._fetch(order[batch], order_on_device[batch])
            if crops is not None:
                images = random_crop_flip(images, crops[batch], self.crop_size)
            else:
                images = center_crop(images, self.crop_size)
            yield self._normalize(images), self.labels[order_on_device[batch]]

    def _fetch(self, host_index: torch.Tensor, device_index: torch.Tensor) -> torch.Tensor:
        if self.images_on_device:
            return self.images[device_index]
        batch = self.images[host_index]
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # pinned source makes the copy truly asynchronous
        return batch.to(self.device, non_blocking=True)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 (x / 255 - mean) / std: the same ops as ToTensor + Normalize."""
        return images.float().div_(255).sub_(self._mean).div_(self._std)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Center crop [B, C, S, S] -> [B, C, size, size] with torchvision's offset rounding."""
    offset = int(round((images.shape[-1] - size) / 2.0))
    return images[..., offset:offset + size, offset:offset + size]


def random_crop_flip(images: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample crop at crops[:, 0:2] (top, left) and horizontal flip where crops[:, 2] == 1.

    One advanced-indexing gather on the images' device, no per-image Python loop.
    """
    steps = torch.arange(size, device=images.device)
    rows = crops[:, 0:1] + steps  # [B, size]
    cols = crops[:, 1:2] + torch.where(crops[:, 2:3] == 1, size - 1 - steps, steps)
    batch = torch.arange(len(images), device=images.device).view(-1, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return images[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------
# 5. prepare: VPT-sized FGVC splits from the datasets' release files
# ---------------------------------------------------------------------------------------------

PREPARE_SEED = 42


def prepare(dataset: str, root: str | os.PathLike, *, overwrite: bool = False,
            seed: int = PREPARE_SEED) -> dict[str, int]:
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


# ---------------------------------------------------------------------------------------------
# 6. Synthetic data (the demo and the benchmark)
# ---------------------------------------------------------------------------------------------


def make_synthetic_images(num_classes: int, n_per_class: int, size: int,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy class-conditional images: uint8 [N, 3, size, size] and int64 labels [N], class-major.

    Class c has a fixed colour (golden-ratio hue steps) and stripes (horizontal for even c, vertical
    for odd c, period size/2, /4 or /8); seed only changes stripe phase, brightness and pixel noise,
    so sets made with different seeds share the classes. Survives crops and horizontal flips.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    colours = torch.tensor([colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.85, 0.9) for c in range(num_classes)])
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    coordinate = torch.where((labels % 2 == 0).view(-1, 1, 1), ys, xs).float()
    period = (size / 2.0 ** (1 + (labels // 2) % 3)).view(-1, 1, 1)
    phase = 2 * math.pi * torch.rand(len(labels), 1, 1, generator=generator)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * coordinate / period + phase)
    brightness = 0.9 + 0.2 * torch.rand(len(labels), 1, 1, 1, generator=generator)
    images = colours[labels].view(-1, 3, 1, 1) * (0.55 + 0.45 * stripes[:, None]) * brightness
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels
