"""Tests for harness/data/folders.py: a user's own image-folder dataset (folders or CSV lists), read into the
FGVC decode path. Images are small PNG / JPEG files written here with PIL; expectations come from torchvision
(ImageFolder's classes and samples, the Resize(256) + CenterCrop(224) transforms) and hand-written literals."""
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

from harness.data import batches, datasets, folders
from harness.data.datasets import DataError

# Class names whose sorted order is not their writing order (digits < upper case < lower case in code points).
CLASSES = ["banana_2", "apple", "Zebra", "10", "9"]
VPT_EVAL = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])


def write_image(path, seed, size=None, fmt=None):
    """A small random RGB image file (PNG or JPEG by the suffix); size (width, height) varies with the seed."""
    rng = np.random.default_rng(seed)
    width, height = size or (int(rng.integers(12, 40)), int(rng.integers(12, 40)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def make_dataset(root, test=True, per_class=(3, 2, 2)):
    """root/{train,val[,test]}/<class>/ with per_class images per split, PNG and JPEG mixed, one nested folder;
    val lacks the class "9" (a subset of train's classes)."""
    seed = 0
    for split, count in zip(("train", "val", "test"), per_class):
        if split == "test" and not test:
            continue
        for name in CLASSES:
            if split == "val" and name == "9":
                continue
            for n in range(count):
                seed += 1
                suffix = ".jpg" if n % 2 else ".png"
                sub = "a_sub/" if split == "train" and n == 2 else ""  # images in a nested folder count too
                write_image(root / split / name / f"{sub}img{n}{suffix}", seed)
    return root


def pairs(dataset, split):
    """[(image path, class name)] of a split, in the reader's order."""
    paths, labels = dataset.splits[split]
    return [(path, dataset.classes[label]) for path, label in zip(paths, labels)]


def imagefolder_pairs(folder):
    reference = ImageFolder(str(folder))
    return [(path, reference.classes[label]) for path, label in reference.samples]


# --- the folder layout ---------------------------------------------------------------------------------------


def test_classes_and_samples_equal_torchvision_imagefolder(tmp_path):
    root = make_dataset(tmp_path / "mine")
    dataset = folders.read_folder_dataset(root)
    assert dataset.classes == ("10", "9", "Zebra", "apple", "banana_2")  # sorted by code point, by hand
    assert list(dataset.classes) == ImageFolder(str(root / "train")).classes
    assert dataset.num_classes == 5 and dataset.layout == "folders" and dataset.root == root
    for split in ("train", "val", "test"):
        assert pairs(dataset, split) == imagefolder_pairs(root / split), split
    assert len(dataset.splits["train"][0]) == 15 and len(dataset.splits["val"][0]) == 8
    assert dataset.splits["train"][0][:3] == [str(root / "train/10/img0.png"), str(root / "train/10/img1.jpg"),
                                              str(root / "train/10/a_sub/img2.png")]
    assert dataset.splits["val"][1] == [0, 0, 2, 2, 3, 3, 4, 4]  # val has no "9" (index 1): train's indices kept
    assert dataset.eval_split == "test" and dataset.split_names("final") == ("train", "test")
    assert dataset.split_names("sweep") == ("train", "val")
    assert folders.read_folder_dataset(root) == dataset  # twice in a row: the same answer


def test_without_test_folder_evaluation_uses_val_and_says_so(tmp_path):
    root = make_dataset(tmp_path / "mine", test=False)
    dataset = folders.read_folder_dataset(root)
    assert set(dataset.splits) == {"train", "val"}
    assert dataset.eval_split == "val" and dataset.split_names("final") == ("train", "val")
    assert f"no test/ folder: the final accuracy is measured on val ({root / 'val'})" in dataset.describe()
    with_test = folders.read_folder_dataset(make_dataset(tmp_path / "other"))
    assert not any("final accuracy" in line for line in with_test.describe())
    with pytest.raises(ValueError, match="protocol"):
        dataset.split_names("test")


def test_hidden_and_system_entries_are_ignored_and_listed(tmp_path):
    root = make_dataset(tmp_path / "mine")
    clean = folders.read_folder_dataset(root)
    (root / "train/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train/apple/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_image(root / "train/.ipynb_checkpoints/img0-checkpoint.png", 99)  # would be a class if read
    write_image(root / "val/apple/.ipynb_checkpoints/img0-checkpoint.png", 98)
    (root / "train/apple/._img0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork: not an image
    write_image(root / "train/__MACOSX/apple/img0.png", 97)
    (root / "test/9/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "test/9/desktop.ini").write_text("[.ShellClassInfo]\n")
    dataset = folders.read_folder_dataset(root)
    assert dataset.classes == clean.classes and dataset.splits == clean.splits
    assert dataset.ignored == ("test/9/Thumbs.db", "test/9/desktop.ini", "train/.DS_Store", "train/.ipynb_checkpoints",
                               "train/__MACOSX", "train/apple/.DS_Store", "train/apple/._img0.png",
                               "val/apple/.ipynb_checkpoints")
    assert ("ignored 8 hidden or system entries (names starting with '.', __MACOSX, Thumbs.db, desktop.ini): "
            "test/9/Thumbs.db, test/9/desktop.ini, train/.DS_Store, ... (5 more)") in dataset.describe()
    assert not any("ignored" in line for line in clean.describe())


def test_describe_names_the_layout_and_counts(tmp_path):
    root = make_dataset(tmp_path / "mine")
    assert folders.read_folder_dataset(root).describe() == [
        f"image-folder dataset {root}: 5 classes from the class folders of {root / 'train'} "
        f"(10, 9, Zebra, apple, banana_2); train 15, val 8, test 10 images"]


def test_symlinked_class_and_image_are_followed(tmp_path):
    root = make_dataset(tmp_path / "mine", test=False)
    outside = tmp_path / "elsewhere"
    write_image(outside / "kiwi/a.png", 7)
    write_image(outside / "b.png", 8)
    os.symlink(outside / "kiwi", root / "train/kiwi")
    os.symlink(outside / "b.png", root / "train/apple/b.png")
    dataset = folders.read_folder_dataset(root)
    assert "kiwi" in dataset.classes
    assert pairs(dataset, "train") == imagefolder_pairs(root / "train")


# --- the CSV layout -------------------------------------------------------------------------------------------


def write_csv(path, rows, header=None, encoding="utf-8"):
    lines = ([header] if header else []) + [",".join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def csv_from_folders(root, header="path,class", shuffle_seed=0, encoding="utf-8"):
    """train.csv / val.csv / test.csv listing every image of the folder layout, rows shuffled."""
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        rows = [(os.path.relpath(path, root), name) for path, name in imagefolder_pairs(root / split)]
        random.Random(shuffle_seed).shuffle(rows)
        write_csv(root / f"{split}.csv", rows, header, encoding)


@pytest.mark.parametrize("header", ["path,class", "filename,label", None])
def test_csv_lists_give_the_same_splits_as_the_folders(tmp_path, header):
    root = make_dataset(tmp_path / "mine")
    from_folders = folders.read_folder_dataset(root)
    csv_from_folders(root, header)
    from_csv = folders.read_folder_dataset(root)
    assert from_csv.layout == "csv" and from_folders.layout == "folders"
    assert from_csv.classes == from_folders.classes and from_csv.eval_split == "test"
    for split in ("train", "val", "test"):
        assert sorted(pairs(from_csv, split)) == sorted(pairs(from_folders, split)), split
    rows = (root / "train.csv").read_text().splitlines()[1 if header else 0:]
    assert [os.path.relpath(p, root) for p, _ in pairs(from_csv, "train")] == [r.split(",")[0] for r in rows]
    assert from_csv.describe()[0].startswith(f"image-folder dataset {root}: 5 classes from {root / 'train.csv'} ")


def test_csv_quoting_bom_spaces_blank_lines_and_absolute_paths(tmp_path):
    root = tmp_path / "mine"
    write_image(root / "pics/a, b.png", 1)
    write_image(root / "pics/c.jpg", 2)
    write_image(root / "pics/e.png", 4)
    write_image(tmp_path / "elsewhere/d.png", 3)
    (root / "train.csv").write_bytes(
        ('\ufeffpath,class\n"pics/a, b.png",cat\n\n pics/c.jpg , dog \n'
         f"{tmp_path / 'elsewhere/d.png'},cat\n").encode())
    write_csv(root / "val.csv", [("pics/e.png", "dog")])
    dataset = folders.read_folder_dataset(root)
    assert dataset.classes == ("cat", "dog") and dataset.eval_split == "val"
    assert pairs(dataset, "train") == [(str(root / "pics/a, b.png"), "cat"), (str(root / "pics/c.jpg"), "dog"),
                                       (str(tmp_path / "elsewhere/d.png"), "cat")]


# --- bad layouts: one line naming the path, a DataError (the harness exits 2 on it) ----------------------------


def bad_folder_cases(root):
    """(name, how to damage a good folder dataset at root, the exact message)."""
    train, val = root / "train", root / "val"
    layout = ("expected train/<class>/<image> and val/<class>/<image> (optional test/), or train.csv and val.csv "
              "(optional test.csv) with rows `image path,class`")
    return [
        ("missing", lambda: shutil.rmtree(root), f"{root}: image-folder dataset not found; {layout}"),
        ("a file", lambda: (shutil.rmtree(root), root.write_text("x")),
         f"{root}: not a folder; {layout}"),
        ("no train", lambda: shutil.rmtree(train),
         f"{root}: no train/ folder and no train.csv (the folder holds: test/, val/); {layout}"),
        ("no val", lambda: shutil.rmtree(val),
         f"{root}: no val/ folder (the held-out images, val/<class>/<image>)"),
        ("no class folders", lambda: [shutil.rmtree(d) for d in train.iterdir()],
         f"{train}: no class folders (expected train/<class>/<image>)"),
        ("image beside the classes", lambda: write_image(train / "stray.png", 1),
         f"{train / 'stray.png'}: a file directly in train/; each image goes in its class folder, "
         f"train/<class>/<image>"),
        ("empty class", lambda: (train / "empty").mkdir(), f"{train / 'empty'}: empty class folder (no images)"),
        ("class with only hidden files", lambda: write_image(train / "hidden/.x.png", 1),
         f"{train / 'hidden'}: empty class folder (no images)"),
        ("val class not in train", lambda: write_image(val / "kiwi/a.png", 1),
         f"{val / 'kiwi'}: class 'kiwi' has no folder in {train}"),
        ("test class not in train", lambda: write_image(root / "test/Kiwi/a.png", 1),
         f"{root / 'test/Kiwi'}: class 'Kiwi' has no folder in {train}"),
        ("not an image", lambda: (train / "apple/notes.txt").write_text("a note"),
         f"{train / 'apple/notes.txt'}: not a readable image (PIL cannot identify its format)"),
        ("empty image file", lambda: (val / "apple/zero.jpg").write_bytes(b""),
         f"{val / 'apple/zero.jpg'}: not a readable image (PIL cannot identify its format)"),
        ("broken symlink", lambda: os.symlink(root / "gone.png", train / "apple/link.png"),
         f"{train / 'apple/link.png'}: broken symbolic link (its target {root / 'gone.png'} does not exist)"),
        ("symlink loop to an ancestor", lambda: os.symlink(train, train / "apple/loop"),
         f"{train / 'apple/loop'}: symbolic link loop (it leads back to {train})"),
        ("symlink to itself", lambda: os.symlink(train / "apple/self", train / "apple/self"),
         f"{train / 'apple/self'}: symbolic link loop"),
        ("same image in two classes", lambda: os.symlink(train / "banana_2/img0.png", train / "apple/dup.png"),
         f"{train / 'banana_2/img0.png'} and {train / 'apple/dup.png'} are the same file; an image belongs to one "
         f"class of one split"),
        ("val image linked to train", lambda: os.link(train / "apple/img0.png", val / "apple/img9.png"),
         f"{val / 'apple/img9.png'} and {train / 'apple/img0.png'} are the same file; an image belongs to one "
         f"class of one split"),
        ("empty test", lambda: [shutil.rmtree(d) for d in (root / "test").iterdir()],
         f"{root / 'test'}: no class folders (expected test/<class>/<image>)"),
    ]


CASE_NAMES = [case[0] for case in bad_folder_cases(Path("/x"))]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_folder_layout_is_one_line_naming_the_path(tmp_path, case):
    root = make_dataset(tmp_path / "mine", per_class=(1, 1, 1))
    _, damage, message = next(c for c in bad_folder_cases(root) if c[0] == case)
    damage()
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    assert str(err.value) == message and "\n" not in message


def bad_csv_cases(root):
    train_csv, val_csv = root / "train.csv", root / "val.csv"
    return [
        ("missing file", lambda: write_csv(train_csv, [("a.png", "cat"), ("nope.png", "dog")], "path,class"),
         f"{train_csv}:3: image file {root / 'nope.png'} not found"),
        ("broken symlink", lambda: write_csv(train_csv, [("a.png", "cat"), ("link.png", "dog")]),
         f"{train_csv}:2: image file {root / 'link.png'} is a broken symbolic link (its target "
         f"{root / 'gone.png'} does not exist)"),
        ("no class", lambda: write_csv(train_csv, [("a.png", "cat"), ("b.png",)]),
         f"{train_csv}:2: row 'b.png' has no class (expected `image path,class`)"),
        ("empty class", lambda: write_csv(train_csv, [("a.png", "cat"), ("b.png", " ")]),
         f"{train_csv}:2: row 'b.png, ' has no class (expected `image path,class`)"),
        ("no path", lambda: write_csv(train_csv, [("a.png", "cat"), ("", "dog")]),
         f"{train_csv}:2: row ',dog' has no image path (expected `image path,class`)"),
        ("three fields", lambda: write_csv(train_csv, [("a.png", "cat", "x")]),
         f"{train_csv}:1: row 'a.png,cat,x' has 3 fields (expected `image path,class`; quote a path that "
         f"holds a comma)"),
        ("duplicate with two classes", lambda: write_csv(train_csv, [("a.png", "cat"), ("b.png", "dog"),
                                                                     ("./a.png", "dog")]),
         f"{train_csv}:3: ./a.png is listed again with class 'dog'; line 1 gives it class 'cat'"),
        ("duplicate row", lambda: write_csv(train_csv, [("a.png", "cat"), ("b.png", "dog"), ("a.png", "cat")]),
         f"{train_csv}:3: a.png is listed twice (also line 1)"),
        ("in two splits", lambda: write_csv(val_csv, [("c.png", "dog"), ("a.png", "cat")]),
         f"{val_csv}:2: a.png is also listed in {train_csv} (line 2); an image belongs to one split"),
        ("not utf-8", lambda: write_csv(train_csv, [("a.png", "cat"), ("b.png", "caf\xe9")], encoding="latin-1"),
         f"{train_csv}:2: not UTF-8 text (byte 0xe9); save the list as UTF-8"),
        ("empty list", lambda: train_csv.write_text("path,class\n\n"), f"{train_csv}: no images listed"),
        ("val class not in train", lambda: write_csv(val_csv, [("c.png", "dog"), ("d.png", "eel")]),
         f"{val_csv}:2: class 'eel' has no image in {train_csv}"),
        ("no val.csv", lambda: val_csv.unlink(), f"{root}: no val.csv beside {train_csv}"),
        ("folder, not image", lambda: write_csv(train_csv, [("a.png", "cat"), ("sub", "dog")]),
         f"{train_csv}:2: image file {root / 'sub'} is a folder"),
        ("not an image", lambda: write_csv(train_csv, [("a.png", "cat"), ("notes.txt", "dog")]),
         f"{root / 'notes.txt'}: not a readable image (PIL cannot identify its format)"),
        ("symlink loop", lambda: write_csv(train_csv, [("a.png", "cat"), ("self.png", "dog")]),
         f"{train_csv}:2: image file {root / 'self.png'} is a symbolic link loop"),
    ]


@pytest.mark.parametrize("case", [case[0] for case in bad_csv_cases(Path("/x"))])
def test_bad_csv_list_is_one_line_naming_the_path(tmp_path, case):
    root = tmp_path / "mine"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(root / name, len(name))
    (root / "sub").mkdir()
    (root / "notes.txt").write_text("a note")
    os.symlink(root / "self.png", root / "self.png")
    os.symlink(root / "gone.png", root / "link.png")
    write_csv(root / "train.csv", [("a.png", "cat"), ("b.png", "dog")], "path,class")
    write_csv(root / "val.csv", [("c.png", "dog")])
    folders.read_folder_dataset(root)  # the good lists read
    _, damage, message = next(c for c in bad_csv_cases(root) if c[0] == case)
    damage()
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    assert str(err.value) == message and "\n" not in message


def test_symlink_loop_below_a_class_folder_is_named_not_followed_forever(tmp_path):
    """A link to an ancestor two levels up, in a nested folder: named as a loop, the reader stops."""
    root = make_dataset(tmp_path / "mine", test=False, per_class=(1, 1, 0))
    nested = root / "train/apple/deep/er"
    nested.mkdir(parents=True)
    write_image(nested / "x.png", 1)
    os.symlink(root / "train/apple", nested / "up")
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    assert str(err.value) == f"{nested / 'up'}: symbolic link loop (it leads back to {root / 'train/apple'})"


def test_unreadable_folder_and_list_are_named(tmp_path, monkeypatch):
    """A folder or list the user may not read (simulated where this test runs as root, who reads everything)."""
    root = make_dataset(tmp_path / "mine", per_class=(1, 1, 1))
    locked = root / "train/apple"
    if os.geteuid() == 0:
        listdir = os.listdir
        def refuse(path):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return listdir(path)
        monkeypatch.setattr(os, "listdir", refuse)
    else:
        locked.chmod(0)
    try:
        with pytest.raises(DataError) as err:
            folders.read_folder_dataset(root)
    finally:
        locked.chmod(0o755)
    assert str(err.value) == f"{locked}: cannot read the folder (Permission denied)"
    monkeypatch.undo()
    (root / "train.csv").mkdir()   # a folder where the list should be
    write_csv(root / "val.csv", [("val/apple/img0.png", "apple")])
    assert folders.read_folder_dataset(root).layout == "folders"
    (root / "train.csv").rmdir()
    write_csv(root / "train.csv", [("train/apple/img0.png", "apple")])
    real_read_bytes = Path.read_bytes
    def refuse_list(self):
        if self.name == "train.csv":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", refuse_list)
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    assert str(err.value) == f"{root / 'train.csv'}: cannot read the list (Permission denied)"


def test_pipe_is_refused_not_opened(tmp_path):
    """A named pipe among the images would block PIL's open forever: refused by its file type."""
    root = make_dataset(tmp_path / "mine", per_class=(1, 1, 1))
    os.mkfifo(root / "train/apple/pipe.png")
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    refused = "not a regular file (a pipe, socket or device), so not an image"
    assert str(err.value) == f"{root / 'train/apple/pipe.png'}: {refused}"
    (root / "train/apple/pipe.png").unlink()
    os.mkfifo(root / "pipe.png")
    write_csv(root / "train.csv", [("pipe.png", "apple")])
    write_csv(root / "val.csv", [("val/apple/img0.png", "apple")])
    with pytest.raises(DataError) as err:
        folders.read_folder_dataset(root)
    assert str(err.value) == f"{root / 'pipe.png'}: {refused}"


# --- decoding: the FGVC path, unchanged ---------------------------------------------------------------------


def test_folder_task_is_decoded_and_cropped_as_fgvc(tmp_path, monkeypatch):
    """The splits are FGVC ImageSplits: cached image = torchvision Resize(256) of the file, evaluation batches =
    Resize(256) + CenterCrop(224) + Normalize on the PIL image, training batches = 224 crops of the resized image
    (some mirrored); read twice, the second time from the decode cache."""
    root = tmp_path / "mine"
    shapes = {"train": [(30, 20), (17, 33)], "val": [(25, 25), (40, 21)], "test": [(21, 40)]}
    for split, sizes in shapes.items():
        for n, size in enumerate(sizes):
            name = f"{'cat' if n == 0 else 'dog'}/{n}.{'jpg' if n else 'png'}"
            write_image(root / split / name, n + 10 * len(split), size)
    dataset = folders.read_folder_dataset(root)
    assert datasets.task_kind(folders.FOLDER_TASK) == "fgvc"
    cache = tmp_path / "cache"
    decoded = []
    decode_fgvc = datasets.decode_fgvc
    monkeypatch.setattr(datasets, "decode_fgvc", lambda path: decoded.append(path) or decode_fgvc(path))
    first = folders.load_folder_splits(dataset, ["train", "val", "test"], cache_dir=cache)
    assert sorted(decoded) == sorted(p for paths, _ in dataset.splits.values() for p in paths)
    second = folders.load_folder_splits(dataset, ["train", "val", "test"], cache_dir=cache)
    assert len(decoded) == 5   # the second time, every split from the cache
    streamed = folders.load_folder_splits(dataset, ["test"], stream=("test",))["test"]
    assert isinstance(streamed, datasets.StreamedSplit) and streamed.paths == dataset.splits["test"][0]
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.pixels.npy")) == ["folder"] * 3
    for split, sizes in shapes.items():
        paths, labels = dataset.splits[split]
        for loaded in (first[split], second[split]):
            assert loaded.task == "folder" and loaded.labels.tolist() == labels
            for n, path in enumerate(paths):
                expected = torch.from_numpy(np.array(T.Resize(256)(Image.open(path).convert("RGB"))))
                assert torch.equal(loaded.image(n), expected.permute(2, 0, 1))
        images = torch.cat([x for x, _ in batches.BatchLoader(first[split], 8, train=False)])[:len(paths)]
        for n, path in enumerate(paths):
            assert torch.equal(images[n], VPT_EVAL(Image.open(path).convert("RGB"))), (split, n)
    train = batches.BatchLoader(first["train"], 2, train=True, augment=True, seed=3)
    resized = [torch.from_numpy(np.array(T.Resize(256)(Image.open(path).convert("RGB")))).permute(2, 0, 1)
               for path in dataset.splits["train"][0]]
    flips = 0
    for epoch in range(4):
        train.set_epoch(epoch)
        crops = torch.cat([x for x, _ in train])
        for crop, n in zip(crops, train.sample_indices().tolist()):
            crop = to_uint8(crop)
            found, mirrored = crop_position(crop, resized[n]), crop_position(crop.flip(-1), resized[n])
            assert found or mirrored, "a training image is not a 224 crop of the resized file"
            flips += found is None
    assert 0 < flips < 8


def to_uint8(image):
    """A loader image [3, h, w] back to its uint8 pixels: (x * std + mean) * 255."""
    mean = torch.tensor(datasets.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(datasets.IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().to(torch.uint8)


def crop_position(crop, image):
    """(top, left) where the uint8 crop [3, c, c] lies in the uint8 image [3, H, W], or None."""
    size = crop.shape[-1]
    corner = (image[:, :image.shape[1] - size + 1, :image.shape[2] - size + 1] == crop[:, :1, :1]).all(0)
    for top, left in corner.nonzero().tolist():
        if torch.equal(image[:, top:top + size, left:left + size], crop):
            return top, left
    return None
