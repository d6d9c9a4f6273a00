"""Run configurations: the task registry, paper_hparams.yaml -> one typed, frozen config per run, and that
config -> the model.

    cfg = config.resolve("cub", "mocov3")                  # Table 5's row + the recipe: a ClassificationConfig
    cfg = config.resolve("ade20k", "mae", iters=4)         # a SegmentationConfig; every task goes through resolve
    cfg = config.resolve("cub", "dinov3")                  # a backbone without a Table 5 column: a stated default
    cfg = config.resolve("folder", "mae", **config.folder_fields(inputs.folder_dataset("photos")))   # own images
    cfg.lr, cfg.replace(seed=43), cfg.identity()           # a field, a checked copy, what a result file stores
    model = config.model_from_config(cfg, cfg.head_size(), checkpoint="checkpoints/linear-vit-b-300ep.pth.tar")

One frozen dataclass per kind of run: ClassificationConfig (FGVC, VTAB-1k), SegmentationConfig (ADE20K) and
DemoConfig (the pipeline demo). Each field's metadata says who sets it:
    CHOICE  what runs: --task, --ssl, --method
    FLAG    a command-line override of the recipe (--lr, --epochs, ...)
    CODE    set programmatically (tests, the benchmark: small models); no flag reaches it
    RECIPE  paper_hparams.yaml's value; resolve refuses an override
Construction checks every value (__post_init__): a value of the wrong type or out of range is a UserError naming
its flag, an unknown field a TypeError. A config holds only what defines a run's numbers; its identity() is what a
result file stores and is matched by. Runtime settings (device, bf16, compile, workers, paths) live in
runtime.Settings and never change which result a run is.
"""
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from harness.data import datasets
import gated_prompt as gp
from harness.runtime import UserError

HERE = Path(__file__).resolve().parents[1]   # the repository root
HPARAMS = yaml.safe_load((HERE / "paper_hparams.yaml").read_text())
RECIPE_VERSION = HPARAMS["recipe_version"]
RECIPES = ("paper", "vpt")

# -----------------------------------------------------------------------------
# The task registry: every task the harness runs, once


@dataclass(frozen=True)
class Task:
    name: str
    kind: str              # "fgvc" | "vtab" | "segmentation" | "demo"
    num_classes: int
    folders: tuple         # its dataset folder's accepted names under --data-dir, ours first (VTAB: the folder
    #                        holding the 19 task folders)
    eval_resize: int = None   # the evaluation resize before the centre crop: FGVC's shorter side (256), VTAB's
    #                           square side (224, TF1 bilinear); None where predict applies none (ADE20K, demo)

    def transform(self, crop):
        """The evaluation transform a prompt pack records and `reproduce.py predict` applies; None where there is
        none to apply (generated images, segmentation)."""
        if self.eval_resize is None:
            return None
        return {"kind": self.kind, "resize": self.eval_resize, "crop": crop}


TASKS = {name: Task(name, "fgvc", info.num_classes, datasets.DATASET_FOLDERS[name], datasets.FGVC_RESIZE)
         for name, info in datasets.FGVC_DATASETS.items()}
TASKS.update({name: Task(name, "vtab", info.num_classes, datasets.DATASET_FOLDERS["vtab"], datasets.IMAGE_SIZE)
              for name, info in datasets.VTAB_TASKS.items()})
TASKS["ade20k"] = Task("ade20k", "segmentation", 150, ("ADEChallengeData2016",))
DEMO = Task("demo", "demo", HPARAMS["demo"]["num_classes"], ())
# A user's own image folder (--task folder --data-dir PATH, read by data/folders.py): decoded, augmented and
# evaluated as FGVC; its classes are read from the folder (folder_fields), so the registry holds no count.
FOLDER = Task(datasets.FOLDER_TASK, "fgvc", 0, (), datasets.FGVC_RESIZE)
EVAL_RESIZE = {t.kind: t.eval_resize for t in TASKS.values() if t.eval_resize}   # kind -> resize, for packs


def find_task(name):
    """The registry's entry of a task name ("demo" and "folder" included); UserError naming the choices for any
    other."""
    if name in (DEMO.name, FOLDER.name):
        return DEMO if name == DEMO.name else FOLDER
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, {FOLDER.name}")
    return TASKS[name]

# -----------------------------------------------------------------------------
# Configs


CHOICE = {"set_by": "choice"}   # what runs: --task, --ssl, --method
FLAG = {"set_by": "flag"}       # a command-line override: --name-with-dashes
CODE = {"set_by": "code"}       # set programmatically (tests, the benchmark); no flag reaches it
RECIPE = {"set_by": "recipe"}   # paper_hparams.yaml's value; resolve refuses an override


def flag(name):
    """The command-line flag of a config field: lr -> --lr, num_prompts -> --num-prompts."""
    return "--" + name.replace("_", "-")


class RunConfig:
    """What every kind of run config shares: checks at construction, replace, identity, the model's overrides."""
    recipe: ClassVar[str] = "paper"   # ClassificationConfig makes it a field (--recipe vpt)

    @classmethod
    def fields_set_by(cls, *who):
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["set_by"] in who)

    @classmethod
    def flags(cls):
        """The fields a command line may override for this kind of run."""
        return cls.fields_set_by("flag")

    @classmethod
    def overridable(cls):
        """The fields resolve takes as overrides: flags and programmatic settings."""
        return cls.fields_set_by("flag", "code")

    def __post_init__(self):
        """Every field of its type (a UserError naming the flag), then every value in its range (check)."""
        for f in dataclasses.fields(self):   # YAML and JSON give lists; a frozen config keeps tuples
            if isinstance(getattr(self, f.name), list) and f.type is tuple:
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, f.type, optional=f.default is None):
                raise UserError(f"{flag(f.name)} {value!r} is not usable: it must be "
                                f"{WANT.get(f.name, _TYPE_WORDS[f.type])}")
        self.check()

    def check(self):
        """Refuse a value no run can take (UserError naming the flag and the accepted range)."""
        if config_class(self.task) is not type(self):   # UserError for an unknown task, too
            raise UserError(f"--task {self.task} is not a task of a {type(self).__name__}")
        if self.ssl not in gp.SSL_POOLING or self.method not in gp.METHODS:
            raise UserError(f"--ssl must be one of {', '.join(gp.SSL_POOLING)} and --method one of "
                            f"{', '.join(gp.METHODS)}")
        if self.arch not in gp.ARCHS or self.recipe not in RECIPES:
            raise UserError(f"--arch must be one of {', '.join(gp.ARCHS)} and --recipe one of {', '.join(RECIPES)}")
        if self.ssl == "dinov3" and self.arch not in gp.DINOV3_ARCHS:
            raise UserError(f"--arch {self.arch} --ssl dinov3: DINOv3 has no such release here (ViT-H+/16 and "
                            f"ViT-7B/16 have SwiGLU MLPs, not supported); --arch {' / '.join(gp.DINOV3_ARCHS)}")
        depth = (self.arch_overrides or {}).get("depth", gp.ARCHS[self.arch][2])
        checks = [("batch_size", self.batch_size >= 1), ("lr", self.lr > 0), ("weight_decay", self.weight_decay >= 0),
                  ("prompt_dropout", 0 <= self.prompt_dropout < 1), ("seed", self.seed >= 0),
                  ("num_prompts", self.method == "linear" or self.num_prompts >= 1)] + self.schedule_checks()
        for name, ok in checks:
            if not ok:
                raise UserError(f"{flag(name)} {getattr(self, name)} is not usable: it must be {WANT[name]}")
        if not 1 <= self.insert_at <= depth:
            raise UserError(f"--insert-at {self.insert_at} is not usable: it must be a block in 1..{depth} "
                            f"({self.arch} has {depth} blocks)")
        dataset = getattr(self, "dataset", None)
        if (self.task == FOLDER.name) != (dataset is not None) or (dataset is not None and not self.num_classes):
            raise UserError(f"--task {FOLDER.name} takes its classes and identity from the image folder it reads "
                            "(config.folder_fields), and only that task takes a dataset")

    def schedule_checks(self):
        """(field, in range) of the kind's own schedule: epochs or iterations."""
        return [("epochs", self.epochs >= 1), ("warmup_epochs", self.warmup_epochs >= 0)]

    def schedule_problem(self):
        """A sentence when the lr schedule never leaves the warm-up (--epochs at or below --warmup-epochs: epoch 1
        runs at lr 0 and no epoch reaches the recipe's lr), else None."""
        if self.warmup_epochs > 0 and self.epochs <= self.warmup_epochs:
            return (f"--epochs {self.epochs} is at or below the warm-up ({self.warmup_epochs} epochs): the lr "
                    f"never leaves the warm-up and epoch 1 runs at lr 0; add --warmup-epochs N with N < "
                    f"{self.epochs} (0: no warm-up)")
        return None

    def replace(self, **changes):
        """A copy with `changes`, checked like any config."""
        return dataclasses.replace(self, **changes)

    def identity(self):
        """The config as a result file stores it (plain JSON values; unset optional fields left out): what a stored
        result and a saved training state are matched by."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.default is None and getattr(self, f.name) is None)}

    @property
    def task_info(self):
        """The task's registry entry (kind, classes, folders, evaluation transform)."""
        return find_task(self.task)

    def head_size(self):
        """The classification head's size: num_classes when set (demo, small test runs), else the task's."""
        return self.num_classes or self.task_info.num_classes

    def vit_overrides(self):
        """ViT settings beyond the architecture's (gated_prompt.vit_config keywords)."""
        return dict(self.arch_overrides or {})


@dataclass(frozen=True)
class ClassificationConfig(RunConfig):
    """FGVC and VTAB-1k: Table 5's row for (task, ssl) on Section A.2's recipe."""
    task: str = field(metadata=CHOICE)
    ssl: str = field(metadata=CHOICE)
    method: str = field(metadata=CHOICE)
    recipe: str = field(metadata=FLAG)             # "paper", or "vpt": VPT's own recipe for its baselines
    arch: str = field(metadata=FLAG)
    batch_size: int = field(metadata=FLAG)
    num_prompts: int = field(metadata=FLAG)
    lr: float = field(metadata=FLAG)
    gate_init: float = field(metadata=FLAG)
    momentum: float = field(metadata=RECIPE)
    weight_decay: float = field(metadata=FLAG)
    prompt_dropout: float = field(metadata=FLAG)
    epochs: int = field(metadata=FLAG)
    warmup_epochs: int = field(metadata=FLAG)
    seed: int = field(metadata=FLAG)
    insert_at: int = field(metadata=FLAG)
    img_size: int = field(metadata=CODE)
    arch_overrides: dict = field(default=None, metadata=CODE)   # small models: embed_dim, depth, ...
    num_classes: int = field(default=None, metadata=CODE)       # None: the task's class count
    table5_cell: str = field(default=None, metadata=RECIPE)     # "task/ssl" of the Table 5 values used where the
    #                                                             paper has none for this run (table5_cell()); None
    #                                                             for the paper's own cells
    dataset: str = field(default=None, metadata=CODE)           # --task folder: the image folder (folder_fields)


@dataclass(frozen=True)
class SegmentationConfig(RunConfig):
    """ADE20K with SETR-PUP: Table 5's row on mmsegmentation's SETR-PUP recipe (paper_hparams.yaml)."""
    task: str = field(metadata=CHOICE)
    ssl: str = field(metadata=CHOICE)
    method: str = field(metadata=CHOICE)
    arch: str = field(metadata=FLAG)
    batch_size: int = field(metadata=FLAG)
    num_prompts: int = field(metadata=FLAG)
    lr: float = field(metadata=FLAG)
    gate_init: float = field(metadata=FLAG)
    momentum: float = field(metadata=RECIPE)
    weight_decay: float = field(metadata=RECIPE)
    prompt_dropout: float = field(metadata=FLAG)
    iters: int = field(metadata=FLAG)
    seed: int = field(metadata=FLAG)
    insert_at: int = field(metadata=FLAG)
    img_size: int = field(metadata=CODE)                 # the training crop
    aux_blocks: tuple = field(metadata=CODE)             # blocks (1..L) read by the auxiliary heads
    aux_loss_weight: float = field(metadata=RECIPE)
    head_channels: int = field(metadata=CODE)
    head_lr_mult: float = field(metadata=RECIPE)
    poly_power: float = field(metadata=RECIPE)
    min_lr: float = field(metadata=RECIPE)
    slide_stride: int = field(metadata=RECIPE)
    ms_ratios: tuple = field(metadata=RECIPE)
    pos_embed_interpolation: str = field(metadata=RECIPE)
    arch_overrides: dict = field(default=None, metadata=CODE)
    num_classes: int = field(default=None, metadata=CODE)
    table5_cell: str = field(default=None, metadata=RECIPE)

    def schedule_checks(self):
        return [("iters", self.iters >= 1)]

    def schedule_problem(self):
        return None

    def head_size(self):
        """0: the backbone carries no classification head (SETR-PUP's heads are the segmenter's own)."""
        return self.num_classes or 0

    def vit_overrides(self):
        return dict(super().vit_overrides(), pos_embed_interpolation=self.pos_embed_interpolation)


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """The pipeline demo: generated images and a small random ViT (paper_hparams.yaml's `demo:`)."""
    task: str = field(metadata=CHOICE)
    method: str = field(metadata=CHOICE)
    ssl: str = field(metadata=RECIPE)
    arch: str = field(metadata=RECIPE)
    arch_overrides: dict = field(metadata=CODE)
    img_size: int = field(metadata=CODE)
    num_classes: int = field(metadata=CODE)
    batch_size: int = field(metadata=RECIPE)
    num_prompts: int = field(metadata=RECIPE)
    lr: float = field(metadata=FLAG)
    gate_init: float = field(metadata=RECIPE)
    epochs: int = field(metadata=FLAG)
    warmup_epochs: int = field(metadata=FLAG)
    weight_decay: float = field(metadata=RECIPE)
    momentum: float = field(metadata=RECIPE)
    prompt_dropout: float = field(metadata=RECIPE)
    seed: int = field(metadata=FLAG)
    insert_at: int = field(metadata=RECIPE)


CONFIGS = (ClassificationConfig, SegmentationConfig, DemoConfig)
# Every override flag once, with its type: the command line's flags are these names with dashes
OVERRIDE_TYPES = {f.name: f.type for cls in CONFIGS for f in dataclasses.fields(cls) if f.metadata["set_by"] == "flag"}


def config_class(task_name):
    """The config class of a task: DemoConfig, SegmentationConfig or ClassificationConfig."""
    kind = find_task(task_name).kind
    return {"demo": DemoConfig, "segmentation": SegmentationConfig}.get(kind, ClassificationConfig)


# What a value must be, in the words of a refusal
WANT = {"batch_size": "a whole number >= 1", "lr": "a number > 0", "weight_decay": "a number >= 0",
        "gate_init": "a finite number", "prompt_dropout": "in [0, 1)", "seed": "a whole number >= 0",
        "num_prompts": "a whole number >= 1 (--method linear trains no prompts)", "epochs": "a whole number >= 1",
        "warmup_epochs": "a whole number >= 0", "iters": "a whole number >= 1", "insert_at": "a block number"}
_TYPE_WORDS = {int: "a whole number", float: "a finite number", str: "a string", tuple: "a list",
               dict: "a dict of ViT settings"}


def _has_type(value, kind, optional=False):
    if value is None:
        return optional
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is tuple:
        return isinstance(value, tuple) and all(_has_type(v, float) for v in value)
    return isinstance(value, kind)


def _plain(value):
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value


def from_identity(stored):
    """The config a result file's "config" holds (identity()'s output); UserError when it is not one this code
    can build (another harness version, an edited file)."""
    if not isinstance(stored, dict) or not isinstance(stored.get("task"), str):
        raise UserError("not a run config (no task)")
    cls = config_class(stored["task"])
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in stored)
    unknown = sorted(set(stored) - names)
    if missing or unknown:
        raise UserError("; ".join(part for part in (f"lacks {', '.join(missing)}" if missing else "",
                                                    f"has unknown keys {', '.join(unknown)}" if unknown else "")
                                  if part))
    return cls(**stored)

# -----------------------------------------------------------------------------
# paper_hparams.yaml -> a config


def resolve(task="demo", ssl="mae", method="gated+temp", **overrides):
    """The run's config: recipe -> Table 5 row for (task, ssl) -> method defaults -> overrides. Overrides that do
    not apply to the task are refused (UserError naming the flag); None means "not given"."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    info = find_task(task)
    if ssl not in gp.SSL_POOLING or method not in gp.METHODS:
        raise UserError(f"--ssl must be one of {', '.join(gp.SSL_POOLING)} and --method one of {', '.join(gp.METHODS)}")
    cls = config_class(task)
    if cls is DemoConfig:
        values = {k: v for k, v in HPARAMS["demo"].items() if k != "methods"}
        values.update(task="demo", method=method)
    else:
        row, column = table5_cell(task, ssl)
        batch_size, num_prompts, lr, gate_init = HPARAMS["table5"][row][column]
        recipe = HPARAMS["segmentation"] if cls is SegmentationConfig else dict(
            {k: v for k, v in HPARAMS["recipe"].items() if k != "lr_grid"}, recipe="paper")
        values = dict(task=task, ssl=ssl, method=method, batch_size=batch_size, num_prompts=num_prompts, lr=lr,
                      gate_init=gate_init, **recipe)
        if (row, column) != (task, ssl):
            values["table5_cell"] = f"{row}/{column}"
        values.update(HPARAMS["methods"][method])
    allowed = cls.overridable()
    refused = sorted(set(overrides) - set(allowed))
    if refused:
        what = {DemoConfig: "the demo (generated data, a fixed small model)", SegmentationConfig: "ADE20K (SETR-PUP)"}
        raise UserError(f"{', '.join(map(flag, refused))} does not apply to {what.get(cls, info.name)}; it takes "
                        f"{', '.join(map(flag, cls.flags()))}")
    if overrides.get("recipe", "paper") == "vpt":
        if method not in ("vpt-shallow", "vpt-deep"):
            raise UserError(f"--recipe vpt is VPT's own recipe for its baselines; not for --method {method}")
        values["prompt_dropout"] = HPARAMS["vpt_recipe"]["prompt_dropout"][method]
    values.update(overrides)
    return cls(**values)


def table5_cell(task, ssl):
    """(task, ssl) of the Table 5 values a run uses: its own, or paper_hparams.yaml's stated defaults where the paper
    has none -- the FGVC row `beyond_paper.folder_row` for a user's image folder, the column
    `beyond_paper.ssl_column` for a backbone the paper did not test."""
    defaults = HPARAMS["beyond_paper"]
    row = defaults["folder_row"] if task == FOLDER.name else task
    return row, ssl if ssl in HPARAMS["table5"][row] else defaults["ssl_column"]


def outside_paper(cfg):
    """In words, which Table 5 values a run outside the paper uses in place of its own (table5_cell); None for a
    run of one of the paper's cells."""
    cell = getattr(cfg, "table5_cell", None)
    if cell is None:
        return None
    row, column = cell.split("/")
    missing = ([f"no row for your own images (--task {cfg.task}): the FGVC recipe with {row}'s row"]
               if row != cfg.task else []) + ([f"no {cfg.ssl} column: its {column} column"] if column != cfg.ssl else [])
    batch_size, num_prompts, lr, gate_init = HPARAMS["table5"][row][column]
    return (f"Table 5 has {'; '.join(missing)} (batch {batch_size}, {num_prompts} prompts, lr {lr:g}, gate init "
            f"{gate_init:g})")


def folder_fields(dataset):
    """The config fields a user's image-folder dataset (data/folders.py's FolderDataset) fixes: num_classes, and
    `dataset`: the folder's name and a digest of its classes and split lists (paths relative to the folder), so two
    folders, or a folder whose images changed, are two runs, while a moved copy is the same run."""
    listing = {"classes": list(dataset.classes),
               "splits": {name: [[os.path.relpath(path, dataset.root), label] for path, label in zip(paths, labels)]
                          for name, (paths, labels) in sorted(dataset.splits.items())}}
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset.root).name).strip("._")[:40] or "images"
    return {"dataset": f"{name}-{digest}", "num_classes": dataset.num_classes}


def sweep_grid(cfg):
    """The learning-rate search of --sweep, as overrides per run: Section A.2's lr grid (the paper's recipe),
    or VPT's lr x weight-decay grid with lr given per 256 images (--recipe vpt)."""
    if isinstance(cfg, SegmentationConfig):
        raise UserError("ADE20K uses SETR-PUP's fixed recipe (Section A.2); --sweep is for classification")
    if isinstance(cfg, DemoConfig):
        return [{"lr": cfg.lr}]
    if cfg.recipe == "vpt":
        vpt = HPARAMS["vpt_recipe"]
        return [{"lr": base * cfg.batch_size / 256, "weight_decay": wd}
                for base in vpt["lr_grid"][cfg.task_info.kind] for wd in vpt["weight_decay_grid"]]
    return [{"lr": lr} for lr in HPARAMS["recipe"]["lr_grid"]]


def seeds_of(cfg, n):
    """The seeds of --seeds n: the run's seed, +1, +2, ...; --recipe vpt at its default seed: VPT's final-run
    seeds 42, 44, 82, 100, 800 (the first n; beyond five, 801, 802, ...)."""
    vpt_seeds = HPARAMS["vpt_recipe"]["seeds"]
    if cfg.recipe == "vpt" and cfg.seed == vpt_seeds[0]:
        return list(vpt_seeds[:n]) + [vpt_seeds[-1] + i for i in range(1, n - len(vpt_seeds) + 1)]
    return [cfg.seed + i for i in range(n)]


def model_from_config(cfg, num_classes, checkpoint=None, verbose=True, trust_pickle=False, **vit_overrides):
    """The model of a config -- the one place every caller (training, segmentation, benchmark, figures) builds
    one. num_classes 0: no head (segmentation, features). vit_overrides: e.g. fused_attention=False."""
    return gp.build_model(cfg.arch, cfg.ssl, cfg.method, num_classes=num_classes, checkpoint=checkpoint,
                          img_size=cfg.img_size, vit_overrides=dict(cfg.vit_overrides(), **vit_overrides),
                          verbose=verbose, num_prompts=cfg.num_prompts, gate_init=cfg.gate_init,
                          insert_at=cfg.insert_at, prompt_dropout=cfg.prompt_dropout, trust_pickle=trust_pickle)

# -----------------------------------------------------------------------------
# A config against its recipe


# in a result's file name (dataset: --task folder's image folder)
NAME_KEYS = ("task", "dataset", "ssl", "arch", "method", "num_prompts", "insert_at", "lr", "seed")


def recipe_of(cfg):
    """The config the recipe gives for this run's task, backbone, method, size, prompt count and insertion block:
    what `cfg` must equal (lr and seed aside) to be a run of the paper's recipe."""
    allowed = type(cfg).overridable()
    keep = {name: getattr(cfg, name) for name in ("arch", "num_prompts", "insert_at", "recipe") if name in allowed}
    if cfg.task == FOLDER.name:   # the image folder is what the run is on, not a departure from the recipe
        keep.update(dataset=cfg.dataset, num_classes=cfg.num_classes)
    return resolve(cfg.task, cfg.ssl, cfg.method, **keep)


def deviations(cfg):
    """{field: value} where `cfg` departs from its recipe, for fields a result file's name does not already show
    (epochs, iters, gate_init, ...). Empty for a run of the recipe."""
    base = recipe_of(cfg)
    return {f.name: getattr(cfg, f.name) for f in sorted(dataclasses.fields(cfg), key=lambda f: f.name)
            if f.name not in NAME_KEYS and getattr(cfg, f.name) != getattr(base, f.name)}
