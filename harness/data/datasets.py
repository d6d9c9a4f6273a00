"""Classification data for the Gated Prompt Tuning harness (FGVC and VTAB-1k).

Sections, top to bottom:
  1. registries, task metadata and the accepted dataset folder names
  2. split-list readers for the on-disk layouts, raising DataError on bad input (class ids checked)
  3. decode-once image cache: each image resized once (FGVC: whole shorter-side-256 image; VTAB:
     224x224) and kept as uint8 in one ragged buffer (threaded decode, optional memory-mapped disk cache)
  4. synthetic images (for the demo and the benchmark)
Batches of these images (crop/flip on the device, shards, padding) are batches.py's.
The json splits are built from each dataset's own release files by releases.prepare.
"""
from __future__ import annotations

import codecs
import colorsys
import errno
import functools
import hashlib
import json
import math
import os
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from harness.runtime import UMASK, atomic_write, format_bytes, free_disk_bytes, remove_dead_temporaries, write_text

# ---------------------------------------------------------------------------------------------
# 1. Registries and metadata
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE = 224  # the ViT input resolution
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Images [..., 3, H, W] with values in 0..max_value (uint8 pixels: 255; floats in [0, 1]: 1) -> float32
    (x / max_value - mean) / std with ImageNet's mean and std: the one normalisation of every model input
    (training batches, segmentation, predict, figures). A new tensor; autograd flows through it."""
    mean, std = _imagenet_stats(images.device)
    return images.to(torch.float32, copy=True).div_(max_value).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1))

# FGVC transforms in VPT (KMnP/vpt, src/data/transforms.py, get_transforms with size 224): train =
# Resize(256) + RandomCrop(224) + RandomHorizontalFlip(0.5); eval = Resize(256) + CenterCrop(224); then
# ToTensor + ImageNet Normalize. Resize(256) is given an INT, so torchvision scales the SHORTER side to
# 256 and the longer to int(256 * longer / shorter) -- not a square Resize((256, 256)). We run that
# exact torchvision call on each PIL image once and cache the whole resized image as uint8; the loader
# then crops per batch: RandomCrop's offsets uniform over each image's own extent (both axes), flip with
# p=0.5, CenterCrop with torchvision's offset rounding. Outputs equal VPT's pipeline pixel for pixel.
FGVC_RESIZE = 256
# VTAB in VPT (src/data/datasets/tf_dataset.py, preprocess_fn): tf.image.resize(image, [224, 224]), no
# augmentation, then /255 and ImageNet mean/std. VPT imports tensorflow.compat.v1, whose tf.image.resize
# is TF1's resize_images: the ResizeBilinear kernel with align_corners=False and half_pixel_centers=False,
# i.e. bilinear, output pixel d samples source d * in / out (not TF2's half-pixel (d + 0.5) * in / out - 0.5),
# no antialiasing. We compute exactly that (resize_like_tf) and round to uint8 for the cache, where TF keeps
# float32: at most half a grey level apart.


@dataclass(frozen=True)
class FgvcInfo:
    image_dir: str  # image folder relative to the dataset root; json keys are relative to it
    num_classes: int
    split_sizes: tuple[int, int, int]  # VPT's (train, val, test) split sizes
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


# The 19 VTAB-1k task folders in the paper's canonical order: Natural, Specialized, Structured.
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


# A user's own image-folder dataset (its layouts and checks: folders.py). Decoded, cached and augmented as FGVC.
FOLDER_TASK = "folder"


def task_kind(task: str) -> str:
    """"fgvc" or "vtab"."""
    if task in FGVC_DATASETS or task == FOLDER_TASK:
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
    sweep train800 -> val200 (the VTAB-1k protocol: tune on 800/200, then train on all 1000 images).
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


# Byte-order marks, the longest first (UTF-32-LE's starts with UTF-16-LE's)
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def read_list_text(path: Path) -> str:
    """The text of a split list, split json or release table. With a byte-order mark: its encoding (UTF-8,
    UTF-16, UTF-32), the mark dropped. Without one: UTF-8, with bytes that are not UTF-8 (a Latin-1 file name)
    kept as they are (surrogateescape), so that a listed path names the same bytes as the file on disk whatever
    encoding the list was written in. A file holding NUL bytes (UTF-16 without a mark) is a DataError naming it."""
    data = path.read_bytes()
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data[len(mark):].decode(encoding)
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: starts with a {encoding} byte-order mark but is not {encoding} text "
                                f"(byte {err.start + len(mark)}); save it as UTF-8") from None
    if b"\0" in data:
        raise DataError(f"{path}: holds NUL bytes (UTF-16 or UTF-32 without a byte-order mark?); save it as UTF-8")
    return data.decode("utf-8", "surrogateescape")


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
    """One VPT split json, checked: a non-empty object {relative image path: integer class id}, each image once."""
    def one_id_per_image(pairs):
        anno = {}
        for key, cid in pairs:
            if key in anno and anno[key] != cid:
                raise DataError(f"{path}: image {key!r} is listed twice, with class ids {anno[key]!r} and {cid!r}")
            anno[key] = cid
        return anno
    try:
        anno = json.loads(read_list_text(path), object_pairs_hook=one_id_per_image)
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
    paths, labels, first_seen = [], [], {}
    for line_no, line in enumerate(read_list_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{line_no}: malformed line {line!r}, expected '<image path> <label>'")
        label = int(parts[1])
        if not 0 <= label < n_classes:
            raise DataError(f"{list_file}:{line_no}: label {label} out of range for {task} ({n_classes} classes)")
        seen_line, seen_label = first_seen.setdefault(parts[0], (line_no, label))
        if seen_label != label:
            raise DataError(f"{list_file}:{line_no}: {parts[0]!r} is listed again with label {label} (label "
                            f"{seen_label} on line {seen_line})")
        paths.append(str(task_dir / parts[0]))
        labels.append(label)
    if not paths:
        raise DataError(f"{list_file}: no images listed")
    return paths, labels


# ---------------------------------------------------------------------------------------------
# 3. Decode-once cache: every image resized once, kept whole as uint8 in one ragged buffer
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageSplit:
    """One decoded split; images of different sizes lie back to back in one uint8 buffer.

    pixels: uint8 [total_pixels, 3], every image's pixels row-major, channels last (host, memory-mapped
    or device). offsets: int64 [N], index of image n's first pixel in pixels. sizes: int64 [N, 2],
    (height, width) of image n. labels: int64 [N].
    """

    task: str
    split: str
    pixels: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_dense(cls, task: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> "ImageSplit":
        """Ragged split from same-sized uint8 images [N, 3, H, W] (e.g. make_synthetic_images)."""
        n, channels, height, width = images.shape
        if images.dtype != torch.uint8 or channels != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        pixels = images.permute(0, 2, 3, 1).reshape(n * height * width, 3)
        sizes = torch.tensor([[height, width]], dtype=torch.int64).repeat(n, 1)
        return cls(task, split, pixels, torch.from_numpy(_offsets(sizes.numpy())), sizes, labels.long())

    def image(self, n: int) -> torch.Tensor:
        """uint8 [3, h, w] view of image n."""
        height, width = self.sizes[n].tolist()
        start = int(self.offsets[n])
        return self.pixels[start:start + height * width].view(height, width, 3).permute(2, 0, 1)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """First-pixel index of each image packed back to back: exclusive cumulative sum of h * w."""
    areas = sizes[:, 0].astype(np.int64) * sizes[:, 1]
    return np.cumsum(areas) - areas


def resized_size(width: int, height: int, short: int = FGVC_RESIZE) -> tuple[int, int]:
    """(height, width) that torchvision's Resize(short) gives a width x height image: the shorter side
    becomes `short` and the longer int(short * longer / shorter) (torchvision's _compute_resized_output_size)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _open_rgb(path: str) -> Image.Image:
    """Fully decoded RGB PIL image; DataError names the file if it is missing, truncated or corrupt, or its pixels
    have no 8-bit RGB meaning (see _to_rgb)."""
    if not os.path.isfile(path):
        raise DataError(f"image file {path} not found")
    try:
        with Image.open(path) as img:
            img.load()  # the full decode: truncated/corrupt files fail here
            return _to_rgb(img, path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """PIL's convert("RGB") (what VPT's loaders call), except where it would lose the picture: 16-bit grey levels
    (PIL clips them at 255: a white image) are scaled to 8 bits, round(v / 257); transparent pixels (alpha, or a
    palette / colour marked transparent, whose stored colour is arbitrary) show white, composited; 32-bit integer
    and float pixels, which have no one 8-bit scale, are refused. CMYK goes through PIL's conversion."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):   # PNG has no 32-bit levels
        levels = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(levels / 257).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        raise DataError(f"image {path} has {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels, which "
                        "have no 8-bit conversion; save it as an 8- or 16-bit image")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header only, without decoding the pixels."""
    if not os.path.isfile(path):
        raise DataError(f"image file {path} not found")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def decode_fgvc(path: str) -> np.ndarray:
    """uint8 [h, w, 3]: VPT's Resize(256) on the PIL image (torchvision, bilinear), the whole image."""
    return np.asarray(TF.resize(_open_rgb(path), FGVC_RESIZE, interpolation=InterpolationMode.BILINEAR))


def decode_vtab(path: str) -> np.ndarray:
    """uint8 [224, 224, 3]: the decoded image resized with resize_like_tf_batch."""
    return resize_like_tf_batch(np.asarray(_open_rgb(path))[None], IMAGE_SIZE)[0]


def resize_like_tf(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, size, size]: resize_like_tf_batch of one channels-first image."""
    pixels = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    return torch.from_numpy(resize_like_tf_batch(pixels[None], size)[0]).permute(2, 0, 1).contiguous()


def resize_like_tf_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, h, w, C] -> uint8 [B, size, size, C] (channels last, as decoded and cached) as VPT's tf.image.resize:
    TF1 ResizeBilinear with half_pixel_centers False, no antialiasing. Rows first, then columns: output d samples
    source x = d * in / out and is low * (1 - t) + high * t, with low = floor(x), high = min(low + 1, in - 1),
    t = x - low, all float32 (see _tf_taps); then rounded half to even.

    Each pass is a few whole-array ops on rows of pixels: a row's channels stay interleaved, so the row pass copies
    whole rows and the column pass gathers (column, channel) pairs by one flat index, and every weight multiplies a
    contiguous run. No clamp is needed: both passes take convex combinations of values in 0..255, so with float32
    rounding every value stays below 255.001 and rounds into 0..255.
    """
    batch, height, width, channels = images.shape
    rows = _lerp(images.reshape(batch, height, width * channels), _tf_taps(height, size), 1)   # [B, size, w * C]
    low, high, t, rest = _tf_taps(width, size)
    to_flat = lambda columns: (columns[:, None] * channels + np.arange(channels)).ravel()   # noqa: E731
    pixels = _lerp(rows, (to_flat(low), to_flat(high), np.repeat(t, channels), np.repeat(rest, channels)), 2)
    np.rint(pixels, out=pixels)
    return pixels.astype(np.uint8).reshape(batch, size, size, channels)


@functools.lru_cache(maxsize=1024)
def _tf_taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, t, 1 - t), each [size], of TF1's bilinear sampling of n source pixels at size outputs: output d
    samples x = d * scale in float32, scale = n / size rounded to float32 (as TF computes it)."""
    x = np.arange(size, dtype=np.float32) * np.float32(n / size)
    low = np.minimum(np.floor(x).astype(np.int64), n - 1)
    t = x - low.astype(np.float32)
    return low, np.minimum(low + 1, n - 1), t, np.float32(1) - t


def _lerp(values: np.ndarray, taps: tuple, axis: int) -> np.ndarray:
    """float32 values.take(low) * (1 - t) + values.take(high) * t along axis (the weights broadcast over what follows
    it). values: uint8 or float32."""
    low, high, t, rest = taps
    shape = (-1,) + (1,) * (values.ndim - axis - 1)
    out = values.take(low, axis=axis).astype(np.float32, copy=False)
    out *= rest.reshape(shape)
    upper = values.take(high, axis=axis).astype(np.float32, copy=False)
    upper *= t.reshape(shape)
    out += upper
    return out


def _parallel_map(fn, items: list, desc: str) -> list:
    """fn over items in a thread pool (PIL and torch release the GIL) with a progress bar."""
    pool = ThreadPoolExecutor(max_workers=min(16, max(2, os.cpu_count() or 2)))
    try:  # disable=None: no bar when stderr is not a terminal
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=None))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on the first bad image, skip the rest


def image_sizes(task: str, paths: list[str]) -> np.ndarray:
    """int64 [N, 2] (height, width) each image will have once decoded; FGVC reads only the headers."""
    if task_kind(task) == "vtab":
        return np.full((len(paths), 2), IMAGE_SIZE, dtype=np.int64)
    headers = _parallel_map(_header_size, paths, f"reading {task} image sizes")
    return np.array([resized_size(width, height) for width, height in headers], dtype=np.int64).reshape(-1, 2)


def decode_images(task: str, paths: list[str], pixels: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                  desc: str) -> None:
    """Decode every image into its slot pixels[offsets[i]:offsets[i] + h * w] (threads, progress bar)."""
    decode = decode_fgvc if task_kind(task) == "fgvc" else decode_vtab

    def decode_into(i: int) -> None:
        image = decode(paths[i])
        if image.shape[:2] != tuple(sizes[i]):  # the header and the decoded file disagree
            raise DataError(f"image {paths[i]} decoded to {image.shape[0]}x{image.shape[1]}, expected "
                            f"{sizes[i][0]}x{sizes[i][1]} from its header")
        pixels[offsets[i]:offsets[i] + image.shape[0] * image.shape[1]] = image.reshape(-1, 3)

    _parallel_map(decode_into, range(len(paths)), desc)


def load_splits(task: str, root: str | os.PathLike, names: list[str] | tuple[str, ...],
                cache_dir: str | os.PathLike | None = None, stream: tuple[str, ...] = (),
                lists: dict | None = None) -> dict:
    """{name: ImageSplit}: read and check every named split list first, then decode each split once
    (or memory-map it from cache_dir). Names in `stream` become StreamedSplits instead: decoded while they
    are read, never cached. root: dataset_root(task, data_dir). lists: {name: (paths, labels)} read and
    checked elsewhere (an image-folder dataset, folders.py) instead of read_split's."""
    lists = {name: lists[name] if lists is not None else read_split(task, root, name) for name in names}
    return {name: StreamedSplit(task, Path(root), name, paths, labels) if name in stream
            else _decode_split(task, Path(root), name, paths, labels, cache_dir)
            for name, (paths, labels) in lists.items()}


# A streamed split, once read whole, is kept in this process for the next run that reads it, so the runs of a task,
# one after another, decode its test split once: at most KEEP_DECODED_BYTES of uint8 pixels in all (the least
# recently read split is dropped first), and a split only when it fits in half the memory available as its
# decoding starts; larger splits are decoded again by every run. 16 GiB holds any one VTAB-1k test split at
# 224 px (the largest, dsprites: 73,728 images, 11.1 GB; sun397 3.3 GB; cifar 1.5 GB).
KEEP_DECODED_BYTES = 16 << 30
_kept_splits: dict[tuple, ImageSplit] = {}   # see StreamedSplit._key; least recently read first


class StreamedSplit:
    """A split decoded chunk by chunk while it is read, never cached on disk: for a split a run reads once (the
    VTAB test set, evaluated once at the end), whose persistent uint8 cache would only cost disk (~58 GB for all
    19 VTAB test sets at 224 px). `chunks` decodes `chunk` images at a time with the decoding thread pool, the
    next chunk in the background while the current one is used: peak memory two chunks. When the range fits
    KEEP_DECODED_BYTES, the chunks are decoded into one buffer instead, kept once the range has been read to its
    end; later passes over the same range and files (another run of the task, with a new StreamedSplit) read it
    from memory, chunk by chunk as before, so their batches are byte-equal."""

    def __init__(self, task: str, root: Path, split: str, paths: list[str], labels: list[int], chunk: int = 4096):
        self.task, self.root, self.split, self.paths, self.labels, self.chunk = task, root, split, paths, labels, chunk

    def __len__(self) -> int:
        return len(self.paths)

    def chunks(self, start: int = 0, stop: int | None = None):
        """ImageSplits of images start..stop-1 in order, `chunk` at a time."""
        stop = len(self) if stop is None else stop
        bounds = [(a, min(a + self.chunk, stop)) for a in range(start, stop, self.chunk)]
        if not bounds:
            return
        key = self._key(start, stop)
        whole = _kept_splits.pop(key, None)
        if whole is not None:
            _kept_splits[key] = whole   # now the most recently read
            for a, b in bounds:
                yield self._part(whole, start, a, b)
            return
        whole = self._reserve(start, stop)

        def decode(bound):
            a, b = bound
            if whole is None:
                return _decode_split(self.task, self.root, self.split, self.paths[a:b], self.labels[a:b], None)
            part = self._part(whole, start, a, b)
            decode_images(self.task, self.paths[a:b], part.pixels.numpy(), part.offsets.numpy(), part.sizes.numpy(),
                          f"decoding {self.task}/{self.split}")
            return part
        with ThreadPoolExecutor(max_workers=1) as ahead:
            pending = ahead.submit(decode, bounds[0])
            for k in range(len(bounds)):
                current = pending.result()
                pending = ahead.submit(decode, bounds[k + 1]) if k + 1 < len(bounds) else None
                yield current
        if whole is not None:   # read to the end (a pass left early, or failed, keeps nothing)
            _kept_splits[key] = whole

    def _key(self, start: int, stop: int) -> tuple:
        """What identifies the pixels of images start..stop-1: the task, the split, the range and _cache_key (the
        dataset folder, each file's path, size and modification time). Labels are always this split's own."""
        return self.task, self.split, start, stop, _cache_key(self.root, self.paths[start:stop])

    def _reserve(self, start: int, stop: int) -> ImageSplit | None:
        """An undecoded buffer for images start..stop-1 if they are to be kept (see KEEP_DECODED_BYTES), after
        dropping the least recently read kept splits that would not leave room; else None."""
        for key in [key for key in _kept_splits if key[:4] == (self.task, self.split, start, stop)]:
            del _kept_splits[key]   # the same range before its files changed
        sizes = image_sizes(self.task, self.paths[start:stop])
        need = 3 * int(np.prod(sizes, axis=1).sum())
        if need > KEEP_DECODED_BYTES:
            return None
        while _kept_splits and kept_bytes() + need > KEEP_DECODED_BYTES:
            del _kept_splits[next(iter(_kept_splits))]
        available = _available_memory()
        if available is not None and need > available // 2:
            return None
        return ImageSplit(self.task, self.split, torch.from_numpy(np.empty((need // 3, 3), dtype=np.uint8)),
                          torch.from_numpy(_offsets(sizes)), torch.from_numpy(sizes),
                          torch.tensor(self.labels[start:stop], dtype=torch.int64))

    def _part(self, whole: ImageSplit, start: int, a: int, b: int) -> ImageSplit:
        """Images a..b-1 as a view of the buffer of images start..stop-1, with this split's labels."""
        first = int(whole.offsets[a - start])
        last = int(whole.offsets[b - 1 - start] + whole.sizes[b - 1 - start].prod())
        return ImageSplit(self.task, self.split, whole.pixels[first:last], whole.offsets[a - start:b - start] - first,
                          whole.sizes[a - start:b - start], torch.tensor(self.labels[a:b], dtype=torch.int64))


def kept_bytes() -> int:
    """Bytes of pixels of the streamed splits kept in this process."""
    return sum(split.pixels.numel() for split in _kept_splits.values())


def forget_kept_splits() -> None:
    """Drop every kept streamed split (the next pass decodes again)."""
    _kept_splits.clear()


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations without swapping (Linux MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _decode_split(task: str, root: Path, split: str, paths: list[str], labels: list[int],
                  cache_dir: str | os.PathLike | None) -> ImageSplit:
    desc = f"decoding {task}/{split}"
    if cache_dir is None:
        sizes = image_sizes(task, paths)
        offsets = _offsets(sizes)
        pixels = np.empty((int(np.prod(sizes, axis=1).sum()), 3), dtype=np.uint8)
        decode_images(task, paths, pixels, offsets, sizes, desc)
    else:
        pixels, offsets, sizes = _cached_decode(Path(cache_dir), task, root, split, paths, desc)
    return ImageSplit(task, split, torch.from_numpy(pixels), torch.from_numpy(offsets), torch.from_numpy(sizes),
                      torch.tensor(labels, dtype=torch.int64))


# Part of the cache key: change it whenever the cached pixels would change. (Caches from before the
# ragged format are single .npy files of central 256x256 squares under other names; never read.)
CACHE_RECIPE = ("ragged-v3 fgvc: torchvision Resize(256) on PIL, whole image; "
                "vtab: TF1 tf.image.resize bilinear 224x224, half_pixel_centers=False, no antialias")


def _cache_key(root: Path, paths: list[str]) -> str:
    """What determines a split's pixels: the recipe, the dataset folder's absolute path and each listed file's
    path, size and modification time. Another copy of a dataset, or a re-downloaded file, is another entry."""
    h = hashlib.sha256(os.fsencode(f"{CACHE_RECIPE}\n{os.path.realpath(root)}\n"))
    for p in paths:
        try:
            st = os.stat(p)
            h.update(os.fsencode(f"{os.path.relpath(p, root)}\t{st.st_size}\t{st.st_mtime_ns}\n"))
        except OSError:   # a missing file is reported by the decoder, naming it
            h.update(os.fsencode(f"{os.path.relpath(p, root)}\tmissing\n"))
    return h.hexdigest()[:16]


def _cache_files(cache_dir: Path, task: str, root: Path, split: str, paths: list[str]) -> tuple[Path, Path, Path]:
    """(pixels .npy, index .npy, checksum .json) of a split's cache entry, named by task, split and _cache_key."""
    stem = f"{task}-{split}-{_cache_key(root, paths)}"
    return cache_dir / f"{stem}.pixels.npy", cache_dir / f"{stem}.index.npy", cache_dir / f"{stem}.check.json"


def _file_crc(path: Path) -> int:
    """CRC-32 of a whole file, read in 16 MiB chunks (zlib's crc32 runs at GB/s: a flipped byte is caught
    at the cost of one read per run)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _cached_decode(cache_dir: Path, task: str, root: Path, split: str, paths: list[str],
                   desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels, offsets, sizes) memory-mapped from the cache, else decoded into a new cache entry.

    Each file is written to a temporary name and renamed (atomic); the checksum file, written last, marks
    the entry complete, so a crash never leaves an entry that loads. Temporary pixel files of killed runs
    (*.pixels.npy.tmp<pid>@<host>, as large as a split) are removed first. The pixel file is memory-mapped, and
    a page of a mapped file that the disk cannot back kills the process (SIGBUS): so the free space is checked
    first and the whole file is allocated (posix_fallocate) before a pixel is written; a disk without room is a
    DataError naming the space needed, and nothing is left behind.
    """
    files = _cache_files(cache_dir, task, root, split, paths)
    cached = _load_cache(*files, len(paths))
    if cached is not None:
        return cached
    if files[2].is_file():
        print(f"cache entry {files[0].name} does not match its checksum {files[2].name} (corrupt or edited); "
              "decoding again")
    pixels_file, index_file, check_file = files
    sizes = image_sizes(task, paths)
    offsets = _offsets(sizes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(cache_dir, recursive=False)
    check_file.unlink(missing_ok=True)
    tmp = pixels_file.with_name(f"{pixels_file.name}.tmp{os.getpid()}@{socket.gethostname()}")
    shape = (int(np.prod(sizes, axis=1).sum()), 3)
    if free_disk_bytes(cache_dir) < shape[0] * 3:
        raise _cache_disk_full(cache_dir, f"{task}/{split}", shape[0] * 3)
    try:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _allocate(tmp, cache_dir, f"{task}/{split}")
        decode_images(task, paths, pixels, offsets, sizes, desc)
        pixels.flush()
        del pixels
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, pixels_file)
    finally:
        tmp.unlink(missing_ok=True)
    index = np.stack([offsets, sizes[:, 0], sizes[:, 1]], axis=1)
    atomic_write(index_file, lambda f: np.save(f, index))
    write_text(check_file, json.dumps({"pixels_crc32": _file_crc(pixels_file), "index_crc32": _file_crc(index_file)}))
    cached = _load_cache(pixels_file, index_file, check_file, len(paths))
    if cached is None:
        raise DataError(f"the cache entry {pixels_file} + {index_file.name} does not read back after writing")
    return cached


def _cache_disk_full(cache_dir: Path, what: str, need: int) -> DataError:
    return DataError(f"the disk is full: the decode cache of {what} needs {format_bytes(need)} in {cache_dir}, which "
                     f"has {format_bytes(free_disk_bytes(cache_dir))} free; free some space or pass --cache-dir on "
                     "a disk with room")


def _allocate(path: Path, cache_dir: Path, what: str) -> None:
    """Give the (sparse) file at `path` all its disk blocks now, so that writing through its memory map cannot
    meet a full disk; on file systems without posix_fallocate the free-space check stands alone."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _cache_disk_full(cache_dir, what, size) from None   # EOPNOTSUPP, EINVAL: not supported


def _load_cache(pixels_file: Path, index_file: Path, check_file: Path,
                n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cache entry if all three files exist, the CRCs in check_file match the other two files, and they
    agree with each other and with n images; else None."""
    if not (pixels_file.is_file() and index_file.is_file() and check_file.is_file()):
        return None
    try:
        check = json.loads(check_file.read_text())
        if (check.get("pixels_crc32") != _file_crc(pixels_file)
                or check.get("index_crc32") != _file_crc(index_file)):
            return None
        index = np.load(index_file)
        pixels = np.load(pixels_file, mmap_mode="c")  # copy-on-write: writable for torch, file untouched
    except (OSError, ValueError, AttributeError):
        return None
    if index.shape != (n, 3) or index.dtype != np.int64 or pixels.dtype != np.uint8 or pixels.ndim != 2:
        return None
    offsets, sizes = np.ascontiguousarray(index[:, 0]), np.ascontiguousarray(index[:, 1:])
    if (pixels.shape[1] != 3 or not np.array_equal(offsets, _offsets(sizes))
            or pixels.shape[0] != int(np.prod(sizes, axis=1).sum())):
        return None
    return pixels, offsets, sizes


# ---------------------------------------------------------------------------------------------
# 4. Synthetic data (the demo and the benchmark)
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
