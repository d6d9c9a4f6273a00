"""Find or fetch a run's inputs: the backbone checkpoint and the dataset folder.

    checkpoint = inputs.checkpoint_for(cfg, settings)   # --checkpoint, else the verified official file
    root = inputs.dataset_folder(cfg.task, settings)    # the dataset folder under --data-dir
    photos = inputs.folder_dataset("photos")            # a user's own image folder (--task folder), checked
    names = inputs.class_names(cfg, settings.data_dir, "train")   # the class folders' names, for a prompt pack

runs.run_one finds the checkpoint once per run and passes it down; classification finds its dataset folder here;
the config module never reaches the network.
With --download a missing file is fetched through downloads.py (checkpoints) and releases.py (datasets). Under
torchrun rank 0 goes first and the other ranks then find its result; parallel processes that are not ranks of
one job (--workers, two commands) are kept apart by downloads.py's file locks.
"""
import os

import torch

from pathlib import Path

from harness.data import datasets
from harness.data import folders
from harness import downloads
import gated_prompt as gp
from harness import config
from harness.data import releases
from harness import runtime


def checkpoint_for(cfg, settings):
    """The backbone file of a run: --checkpoint, else the official file, verified (downloaded with --download;
    rank 0 first). None for the demo's random backbone."""
    if isinstance(cfg, config.DemoConfig):
        return None
    if settings.checkpoint:   # a Hugging Face model folder: the weights file inside it
        return gp.weights_in_folder(settings.checkpoint) if os.path.isdir(settings.checkpoint) else settings.checkpoint

    def backbone_of_this_run():  # what a downloaded file must load into (checked on the meta device)
        with torch.device("meta"):
            return config.model_from_config(cfg.replace(method="linear"), 0, verbose=False)
    with runtime.main_first():
        return downloads.checkpoint_path(cfg.arch, cfg.ssl, settings.checkpoint_dir, download=settings.download,
                                         mirror=settings.mirror, model_factory=backbone_of_this_run)


def dataset_folder(task, settings):
    """The task's dataset folder under --data-dir; with --download, CUB / Flowers / Dogs are fetched first (rank 0).
    A missing folder says what to fetch from where and where to put it."""
    if settings.download and task in releases.DATASETS:   # every rank enters: a check outside would race rank 0
        with runtime.main_first():
            if runtime.is_main() and not _folder_exists(task, settings.data_dir):
                releases.fetch_dataset(task, settings.data_dir, mirror=settings.mirror)
    try:
        return datasets.dataset_root(task, settings.data_dir)
    except datasets.DataError as err:
        raise datasets.DataError(f"{err}\n{releases.dataset_instructions(task, settings.data_dir)}") from None


def folder_dataset(data_dir):
    """A user's own image-folder dataset (--task folder: --data-dir is the folder), every split listed and every
    image header read before any decoding (folders.read_folder_dataset); DataError naming the path, also for a
    folder of one class (nothing to classify)."""
    dataset = folders.read_folder_dataset(data_dir)
    if dataset.num_classes < 2:
        where = dataset.root / ("train" if dataset.layout == "folders" else "train.csv")
        raise datasets.DataError(f"{where}: one class ({dataset.classes[0]}); a classifier needs two or more")
    return dataset


def splits_of(cfg, settings, protocol):
    """(train split, eval split, dataset folder, split lists or None) of a classification run: the task's split
    names and folder under --data-dir, or a user's image folder (its lists; eval on val where it has no test),
    checked to be the folder the run was configured with."""
    if cfg.task != config.FOLDER.name:
        return (*datasets.split_names(cfg.task, protocol), dataset_folder(cfg.task, settings), None)
    dataset = configured_folder(cfg, settings.data_dir)
    return (*dataset.split_names(protocol), dataset.root, dataset.splits)


def configured_folder(cfg, data_dir):
    """The image folder of a --task folder run, read again; UserError when it is no longer the folder the run was
    configured with (config.folder_fields: its classes or images changed)."""
    dataset = folder_dataset(data_dir)
    if config.folder_fields(dataset) != {"dataset": cfg.dataset, "num_classes": cfg.num_classes}:
        raise runtime.UserError(f"{dataset.root}: the image folder is not the one this run was configured with "
                                f"({cfg.dataset}, {cfg.num_classes} classes): its images or classes changed since; "
                                "run the command again")
    return dataset


def _folder_exists(task, data_dir):
    """A folder under any accepted name (e.g. CUB_200_2011 unpacked by hand) is used as it is."""
    try:
        return datasets.dataset_root(task, data_dir).is_dir()
    except datasets.DataError:
        return False


def class_names(cfg, data_dir, split):
    """Names of a run's classes when its dataset folder has them: a user's image folder's classes; else the folder
    each class's images of `split` lie in (CUB's 001.Black_footed_Albatross, Dogs' n02085620-Chihuahua), when every
    class has its own folder. None
    otherwise (the demo, VTAB's numbered folders shared by classes, an unreadable split)."""
    if cfg.task == config.FOLDER.name:
        try:
            return list(configured_folder(cfg, data_dir).classes)
        except (datasets.DataError, runtime.UserError):
            return None
    if cfg.task_info.kind not in ("fgvc", "vtab"):
        return None
    try:
        paths, labels = datasets.read_split(cfg.task, datasets.dataset_root(cfg.task, data_dir), split)
    except (datasets.DataError, OSError):
        return None
    folders = {}
    for path, label in zip(paths, labels):
        folders.setdefault(label, set()).add(Path(path).parent.name)
    names = [next(iter(folders.get(c, {None}))) for c in range(max(folders, default=-1) + 1)]
    one_each = all(len(folders.get(c, ())) == 1 for c in range(len(names))) and len(set(names)) == len(names)
    return names if names and one_each else None
