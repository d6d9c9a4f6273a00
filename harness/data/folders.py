"""A user's own images as a classification dataset: an image-folder or CSV layout, checked and read into the
(image paths, labels) lists the FGVC readers give, so datasets.load_splits decodes and caches them as FGVC.

Layouts of a dataset folder PATH (the CSV lists are read when PATH/train.csv exists, the folders otherwise):
  folders  PATH/train/<class>/<image>, PATH/val/<class>/<image>, optional PATH/test/<class>/<image>. Images may
           lie in sub-folders of a class folder; symbolic links are followed (a loop is an error).
  CSV      PATH/train.csv, PATH/val.csv, optional PATH/test.csv: UTF-8 (a BOM is fine), one image per row,
           `image path,class`, the path relative to PATH (or absolute) and quoted when it holds a comma. Spaces
           around a field are dropped and blank lines skipped. A first row whose path field has no file
           extension and names no file is a header (`path,class`, `filename,label`).
Classes: the sorted names (code-point order, as torchvision's ImageFolder) of train's class folders, or of the
classes in train.csv, are the indices 0..C-1; every val / test class must be one of them. A split's images come
in ImageFolder's order (folders) or row order (CSV). An image belongs to one class of one split: a file listed
twice, or reached twice through links, is an error.
Evaluation: the final protocol trains on train and reports test, or val when there is no test split
(FolderDataset.eval_split; describe() says so); the sweep protocol reports val.
Ignored in the folder layout, wherever they lie: hidden names (starting with '.': .DS_Store, .ipynb_checkpoints,
macOS's ._ files) and the system entries __MACOSX, Thumbs.db, desktop.ini; FolderDataset.ignored lists them.
Every other file must be an image PIL can open: each header is read here, before any decoding.
Images go through the FGVC recipe, the paper's for datasets outside it: Resize(256) on the shorter side, then
RandomCrop(224) + horizontal flip for training and CenterCrop(224) for evaluation (datasets.decode_fgvc,
batches.py). As in torchvision's image loader, an EXIF orientation tag is not applied.
Every bad layout is a DataError: one line naming the path (the harness exits with 2).
"""
from __future__ import annotations

import csv
import errno
import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from harness.data import datasets
from harness.data.datasets import DataError

FOLDER_TASK = datasets.FOLDER_TASK
SPLITS = ("train", "val", "test")
SYSTEM_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini")   # macOS zip folders, Windows Explorer files
LAYOUT = ("expected train/<class>/<image> and val/<class>/<image> (optional test/), or train.csv and val.csv "
          "(optional test.csv) with rows `image path,class`")
ROW = "expected `image path,class`"


@dataclass(frozen=True)
class FolderDataset:
    """A checked image-folder dataset. splits: {"train", "val", optional "test": (image paths, labels)}, labels
    index `classes`; the paths are absolute (root / relative path, links not resolved)."""

    root: Path
    layout: str                                        # "folders" or "csv"
    classes: tuple[str, ...]                           # class names; a label is an index into them
    splits: dict[str, tuple[list[str], list[int]]]
    eval_split: str                                    # "test", or "val" when there is no test split
    ignored: tuple[str, ...] = ()                      # hidden / system entries skipped, relative to root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_names(self, protocol: str) -> tuple[str, str]:
        """(train split, eval split): "final" trains on train and reports eval_split, "sweep" reports val."""
        if protocol not in ("final", "sweep"):
            raise ValueError(f"protocol must be 'final' or 'sweep', got {protocol!r}")
        return "train", self.eval_split if protocol == "final" else "val"

    def describe(self) -> list[str]:
        """Lines for the harness to print: where the classes come from and the split sizes; that val stands in
        for a missing test split; what was ignored."""
        source = f"the class folders of {self.root / 'train'}" if self.layout == "folders" else self.root / "train.csv"
        counts = ", ".join(f"{name} {len(paths)}" for name, (paths, _) in self.splits.items())
        lines = [f"image-folder dataset {self.root}: {self.num_classes} classes from {source} "
                 f"({_first(self.classes, 8)}); {counts} images"]
        if self.eval_split == "val":
            missing, val = ("test/ folder", "val") if self.layout == "folders" else ("test.csv", "val.csv")
            lines.append(f"no {missing}: the final accuracy is measured on val ({self.root / val})")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} hidden or system entries (names starting with '.', "
                         f"{', '.join(SYSTEM_NAMES)}): {_first(self.ignored, 3)}")
        return lines


def read_folder_dataset(path: str | os.PathLike) -> FolderDataset:
    """The dataset in folder `path`, every split listed and checked (layout, classes, links, each image's
    header) before anything is decoded; DataError names the first problem."""
    root = Path(os.path.abspath(os.path.expanduser(path)))
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; {LAYOUT}" if root.exists()
                        else f"{root}: image-folder dataset not found; {LAYOUT}")
    if (root / "train.csv").is_file():
        dataset = _read_csv_layout(root)
    elif (root / "train").is_dir():
        dataset = _read_folder_layout(root)
    else:
        raise DataError(f"{root}: no train/ folder and no train.csv ({_contents(root)}); {LAYOUT}")
    _check_each_file_once(dataset)
    _check_images(path for paths, _ in dataset.splits.values() for path in paths)
    return dataset


def load_folder_splits(dataset: FolderDataset, names, cache_dir: str | os.PathLike | None = None,
                       stream: tuple[str, ...] = ()) -> dict:
    """{name: ImageSplit (or StreamedSplit for names in stream)} of the named splits, decoded and cached exactly
    as an FGVC dataset's (task FOLDER_TASK, cache entries keyed by the folder and its files)."""
    unknown = [name for name in names if name not in dataset.splits]
    if unknown:
        raise ValueError(f"{dataset.root} has no split {', '.join(unknown)}; it has {', '.join(dataset.splits)}")
    return datasets.load_splits(FOLDER_TASK, dataset.root, names, cache_dir=cache_dir, stream=stream,
                                lists=dataset.splits)


def is_ignored(name: str) -> bool:
    """Hidden (leading '.') and operating-system entries, skipped in the folder layout."""
    return name.startswith(".") or name in SYSTEM_NAMES

# --- the folder layout ------------------------------------------------------------------------------------


def _read_folder_layout(root: Path) -> FolderDataset:
    if not (root / "val").is_dir():
        raise DataError(f"{root}: no val/ folder (the held-out images, val/<class>/<image>)")
    ignored: list[str] = []
    class_folders = {split: _class_folders(root, split, ignored) for split in SPLITS if (root / split).is_dir()}
    classes = tuple(sorted(class_folders["train"]))
    index = {name: label for label, name in enumerate(classes)}
    for split, found in class_folders.items():
        for name, folder in found.items():
            if name not in index:
                raise DataError(f"{folder}: class {name!r} has no folder in {root / 'train'}")
    splits = {}
    for split, found in class_folders.items():
        paths, labels = [], []
        for name in sorted(found):
            images = _images_below(root, found[name], ignored)
            if not images:
                raise DataError(f"{found[name]}: empty class folder (no images)")
            paths += images
            labels += [index[name]] * len(images)
        splits[split] = (paths, labels)
    return FolderDataset(root, "folders", classes, splits, "test" if "test" in splits else "val",
                         tuple(sorted(ignored)))


def _class_folders(root: Path, split: str, ignored: list[str]) -> dict[str, Path]:
    """{class name: folder} of one split folder; a file beside the class folders is an error."""
    folder, found = root / split, {}
    for name in _listdir(folder):
        path = folder / name
        if is_ignored(name):
            ignored.append(path.relative_to(root).as_posix())
            continue
        if not stat.S_ISDIR(_stat(path).st_mode):
            raise DataError(f"{path}: a file directly in {split}/; each image goes in its class folder, "
                            f"{split}/<class>/<image>")
        found[name] = path
    if not found:
        raise DataError(f"{folder}: no class folders (expected {split}/<class>/<image>)")
    return found


def _images_below(root: Path, class_folder: Path, ignored: list[str]) -> list[str]:
    """Every file under a class folder, links followed, in torchvision ImageFolder's order (folders by path,
    files by name). A link back to a folder on the way down (root included) is a loop, named."""
    found: list[tuple[str, list[str]]] = []
    on_the_way = {}   # (device, inode) -> path of the folders from root down to the one being read
    for folder in (root, class_folder.parent, class_folder):
        info = _stat(folder)
        on_the_way[info.st_dev, info.st_ino] = folder

    def walk(folder: Path) -> None:
        files = []
        for name in _listdir(folder):
            path = folder / name
            if is_ignored(name):
                ignored.append(path.relative_to(root).as_posix())
                continue
            info = _stat(path)
            if not stat.S_ISDIR(info.st_mode):
                files.append(_regular_file(path, info))
                continue
            key = (info.st_dev, info.st_ino)
            if key in on_the_way:
                raise DataError(f"{path}: symbolic link loop (it leads back to {on_the_way[key]})")
            on_the_way[key] = path
            walk(path)
            del on_the_way[key]
        found.append((str(folder), files))

    walk(class_folder)
    return [os.path.join(folder, name) for folder, files in sorted(found) for name in files]


def _regular_file(path: Path, info: os.stat_result) -> str:
    """path's name, refusing a pipe, socket or device (opening one could block or never end)."""
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file (a pipe, socket or device), so not an image")
    return path.name


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as err:
        raise DataError(f"{folder}: cannot read the folder ({err.strerror})") from None


def _stat(path: Path) -> os.stat_result:
    """os.stat through links; DataError names a broken link, a link loop or an unreadable entry."""
    info, problem = _stat_or_problem(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return info


def _stat_or_problem(path: Path) -> tuple[os.stat_result | None, str | None]:
    """(os.stat through links, None), or (None, what is wrong: "not found", "broken symbolic link (...)",
    "symbolic link loop", "cannot be read (...)")."""
    try:
        return os.stat(path), None
    except ValueError:   # a NUL character in the name
        return None, "not found"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symbolic link loop"
        if err.errno == errno.ENOENT and os.path.islink(path):
            return None, f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        if err.errno == errno.ENOENT:
            return None, "not found"
        return None, f"cannot be read ({err.strerror})"

# --- the CSV layout ---------------------------------------------------------------------------------------


def _read_csv_layout(root: Path) -> FolderDataset:
    train_csv = root / "train.csv"
    if not (root / "val.csv").is_file():
        raise DataError(f"{root}: no val.csv beside {train_csv}")
    seen: dict[str, tuple[Path, int, str]] = {}   # normalised image path -> (list, line, class) that gave it
    rows = {split: _read_csv(root / f"{split}.csv", root, seen) for split in SPLITS
            if (root / f"{split}.csv").is_file()}
    classes = tuple(sorted({name for _, name, _ in rows["train"]}))
    index = {name: label for label, name in enumerate(classes)}
    for split in ("val", "test"):
        for _, name, line in rows.get(split, ()):
            if name not in index:
                raise DataError(f"{root / f'{split}.csv'}:{line}: class {name!r} has no image in {train_csv}")
    splits = {split: ([path for path, _, _ in listed], [index[name] for _, name, _ in listed])
              for split, listed in rows.items()}
    return FolderDataset(root, "csv", classes, splits, "test" if "test" in splits else "val")


def _read_csv(list_file: Path, root: Path, seen: dict) -> list[tuple[str, str, int]]:
    """[(image path, class name, line)] of one list, each row checked: two fields, the file exists and is
    listed once in all the lists read so far (`seen`)."""
    try:
        data = list_file.read_bytes()
    except OSError as err:
        raise DataError(f"{list_file}: cannot read the list ({err.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{list_file}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the list as "
                        "UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    listed, first = [], True
    try:
        for row in reader:
            line, fields = reader.line_num, [field.strip() for field in row]
            if not any(fields):
                continue
            if first and len(fields) <= 2 and not Path(fields[0]).suffix and not (root / fields[0]).exists():
                first = False   # a header row
                continue
            first = False
            listed.append(_check_row(list_file, line, row, fields, root, seen))
    except csv.Error as err:
        raise DataError(f"{list_file}:{reader.line_num}: {err}") from None
    if not listed:
        raise DataError(f"{list_file}: no images listed")
    return listed


def _check_row(list_file: Path, line: int, row: list[str], fields: list[str], root: Path,
               seen: dict) -> tuple[str, str, int]:
    where, text = f"{list_file}:{line}", ",".join(row)
    if len(fields) > 2:
        raise DataError(f"{where}: row {text!r} has {len(fields)} fields ({ROW}; quote a path that holds a comma)")
    if len(fields) < 2 or not fields[1]:
        raise DataError(f"{where}: row {text!r} has no class ({ROW})")
    if not fields[0]:
        raise DataError(f"{where}: row {text!r} has no image path ({ROW})")
    name, path = fields[1], root / fields[0]
    key = os.path.normpath(path)
    if key in seen:
        other_file, other_line, other_name = seen[key]
        if other_file != list_file:
            raise DataError(f"{where}: {fields[0]} is also listed in {other_file} (line {other_line}); an image "
                            "belongs to one split")
        if other_name != name:
            raise DataError(f"{where}: {fields[0]} is listed again with class {name!r}; line {other_line} gives "
                            f"it class {other_name!r}")
        raise DataError(f"{where}: {fields[0]} is listed twice (also line {other_line})")
    seen[key] = (list_file, line, name)
    info, problem = _stat_or_problem(path)
    if problem == "not found":
        raise DataError(f"{where}: image file {path} not found")
    if problem is not None:
        raise DataError(f"{where}: image file {path} is a {problem}" if "link" in problem
                        else f"{where}: image file {path} {problem}")
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{where}: image file {path} is a folder")
    _regular_file(path, info)
    return str(path), name, line

# --- checks common to both layouts ------------------------------------------------------------------------


def _check_each_file_once(dataset: FolderDataset) -> None:
    """No file twice in the dataset, under another name either (a link, a hard link): it would be an image of
    two classes, or in training and evaluation at once."""
    first: dict[tuple[int, int], str] = {}
    for paths, _ in dataset.splits.values():
        for path in paths:
            info = os.stat(path)
            other = first.setdefault((info.st_dev, info.st_ino), path)
            if other != path:
                raise DataError(f"{path} and {other} are the same file; an image belongs to one class of one split")


def _check_images(paths) -> None:
    """Every file's image header readable by PIL (threads; the pixels are read when decoded)."""
    pool = ThreadPoolExecutor(max_workers=min(16, max(2, os.cpu_count() or 2)))
    try:
        problem = next((p for p in pool.map(_image_problem, list(paths)) if p is not None), None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)   # on the first bad image, skip the rest
    if problem is not None:
        raise DataError(problem)


def _image_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.size
        return None
    except Image.UnidentifiedImageError:
        return f"{path}: not a readable image (PIL cannot identify its format)"
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)).replace("\n", " ")
        return f"{path}: not a readable image ({reason})"


def _contents(folder: Path) -> str:
    names = [name + ("/" if (folder / name).is_dir() else "") for name in _listdir(folder) if not is_ignored(name)]
    return f"the folder holds: {_first(names, 6)}" if names else "the folder is empty"


def _first(names, n: int) -> str:
    """The first n names joined, and how many more there are."""
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
