"""Run configurations: paper_hparams.yaml -> one plain dict per run, and that dict -> the model.

    cfg = recipes.resolve("cub", "mocov3")                     # Table 5's row + the recipe
    cfg = recipes.resolve("ade20k", "mae", iters=4)            # every task goes through the same resolver
    model = recipes.model_from_config(cfg, num_classes=200, checkpoint="checkpoints/linear-vit-b-300ep.pth.tar")

A config holds only what defines a run's numbers (its identity). Runtime settings (device, bf16, compile,
workers, paths) live in runtime.Settings and never change which result file a run belongs to.
"""
import math
from pathlib import Path

import yaml

from harness.data import datasets
import gated_prompt as gp
from harness.runtime import UserError

HERE = Path(__file__).resolve().parents[1]   # the repository root
HPARAMS = yaml.safe_load((HERE / "paper_hparams.yaml").read_text())
RECIPE_VERSION = HPARAMS["recipe_version"]

TASKS = list(datasets.FGVC_DATASETS) + list(datasets.VTAB_TASKS) + ["ade20k"]
RECIPES = ("paper", "vpt")

# Every override flag once: config key -> type. The command line's flags are these keys with dashes.
OVERRIDE_TYPES = {"lr": float, "num_prompts": int, "gate_init": float, "batch_size": int, "epochs": int,
                  "warmup_epochs": int, "insert_at": int, "seed": int, "prompt_dropout": float,
                  "weight_decay": float, "iters": int, "arch": str, "recipe": str}
# What a user may override, per kind of task
CLASSIFICATION_OVERRIDES = ("lr", "num_prompts", "gate_init", "batch_size", "epochs", "warmup_epochs", "insert_at",
                            "seed", "prompt_dropout", "weight_decay", "arch", "recipe")
SEGMENTATION_OVERRIDES = ("lr", "num_prompts", "gate_init", "batch_size", "iters", "insert_at", "seed",
                          "prompt_dropout", "arch")
DEMO_OVERRIDES = ("lr", "epochs", "warmup_epochs", "seed")
# Settings that tests, the benchmark and the demo may also set (small models); no flag reaches them
PROGRAMMATIC = ("arch_overrides", "num_classes", "img_size")
SEGMENTATION_PROGRAMMATIC = ("aux_blocks", "head_channels")
# The keys a resolved config holds, per kind (check_config refuses any other and any missing one)
CONFIG_KEYS = {
    "classification": ("task", "ssl", "method", "recipe", "arch", "batch_size", "num_prompts", "lr", "gate_init",
                       "momentum", "weight_decay", "prompt_dropout", "epochs", "warmup_epochs", "seed", "insert_at",
                       "img_size"),
    "segmentation": ("task", "ssl", "method", "arch", "batch_size", "num_prompts", "lr", "gate_init", "momentum",
                     "weight_decay", "prompt_dropout", "iters", "seed", "insert_at", "img_size", "aux_blocks",
                     "aux_loss_weight", "head_channels", "head_lr_mult", "poly_power", "min_lr", "slide_stride",
                     "ms_ratios", "pos_embed_interpolation"),
    "demo": ("task", "ssl", "method", "arch", "arch_overrides", "img_size", "num_classes", "batch_size",
             "num_prompts", "lr", "gate_init", "epochs", "warmup_epochs", "weight_decay", "momentum",
             "prompt_dropout", "seed", "insert_at"),
}


def task_kind(task):
    """"demo", "segmentation", or datasets.task_kind's "fgvc" / "vtab"."""
    if task == "demo":
        return "demo"
    if task == "ade20k":
        return "segmentation"
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return datasets.task_kind(task)


def flag(key):
    return "--" + key.replace("_", "-")


def allowed_overrides(kind):
    """The config keys a run of this kind of task takes as overrides."""
    if kind == "demo":
        return DEMO_OVERRIDES + PROGRAMMATIC
    if kind == "segmentation":
        return SEGMENTATION_OVERRIDES + PROGRAMMATIC + SEGMENTATION_PROGRAMMATIC
    return CLASSIFICATION_OVERRIDES + PROGRAMMATIC


def resolve(task="demo", ssl="mae", method="gated+temp", **overrides):
    """The run's config: recipe -> Table 5 row for (task, ssl) -> method defaults -> overrides.
    Overrides that do not apply to the task are refused (UserError naming the flag); None means "not given"."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    kind = task_kind(task)
    if ssl not in gp.SSL_POOLING or method not in gp.METHODS:
        raise UserError(f"--ssl must be one of {', '.join(gp.SSL_POOLING)} and --method one of {', '.join(gp.METHODS)}")
    if kind == "demo":
        cfg = {k: v for k, v in HPARAMS["demo"].items() if k != "methods"}
        cfg.update(task="demo", method=method)
    elif kind == "segmentation":
        batch_size, num_prompts, lr, gate_init = HPARAMS["table5"][task][ssl]
        cfg = dict(task=task, ssl=ssl, method=method, batch_size=batch_size, num_prompts=num_prompts, lr=lr,
                   gate_init=gate_init, **HPARAMS["segmentation"])
        cfg.update(HPARAMS["methods"][method])
    else:
        batch_size, num_prompts, lr, gate_init = HPARAMS["table5"][task][ssl]
        recipe = {k: v for k, v in HPARAMS["recipe"].items() if k != "lr_grid"}
        cfg = dict(task=task, ssl=ssl, method=method, recipe="paper", batch_size=batch_size,
                   num_prompts=num_prompts, lr=lr, gate_init=gate_init, **recipe)
        cfg.update(HPARAMS["methods"][method])
    allowed = allowed_overrides(kind)
    refused = sorted(set(overrides) - set(allowed))
    if refused:
        what = {"demo": "the demo (generated data, a fixed small model)", "segmentation": "ADE20K (SETR-PUP)"}
        raise UserError(f"{', '.join(map(flag, refused))} does not apply to {what.get(kind, task)}; it takes "
                        f"{', '.join(flag(k) for k in allowed if k not in PROGRAMMATIC + SEGMENTATION_PROGRAMMATIC)}")
    if overrides.get("recipe", "paper") == "vpt":
        if method not in ("vpt-shallow", "vpt-deep"):
            raise UserError(f"--recipe vpt is VPT's own recipe for its baselines; not for --method {method}")
        cfg["prompt_dropout"] = HPARAMS["vpt_recipe"]["prompt_dropout"][method]
    cfg.update(overrides)
    check_config(cfg)
    return cfg


def _config_kind(task):
    kind = task_kind(task)
    return kind if kind in ("demo", "segmentation") else "classification"


def check_config(cfg):
    """Refuse a config with unknown or missing keys, or a value no run can take (UserError naming the flag and
    the accepted range). Every config is checked here, where resolve makes it."""
    kind = _config_kind(cfg.get("task", "demo"))
    required = set(CONFIG_KEYS[kind])
    optional = set(PROGRAMMATIC) | (set(SEGMENTATION_PROGRAMMATIC) if kind == "segmentation" else set())
    missing, unknown = sorted(required - set(cfg)), sorted(set(cfg) - required - optional)
    if missing or unknown:
        raise UserError(f"config of {cfg.get('task')}: " + "; ".join(
            part for part in (f"missing keys {', '.join(missing)}" if missing else "",
                              f"unknown keys {', '.join(unknown)}" if unknown else "") if part))
    if cfg["arch"] not in gp.ARCHS or cfg.get("recipe", "paper") not in RECIPES:
        raise UserError(f"--arch must be one of {', '.join(gp.ARCHS)} and --recipe one of {', '.join(RECIPES)}")
    depth = (cfg.get("arch_overrides") or {}).get("depth", gp.ARCHS[cfg["arch"]][2])
    checks = [("batch_size", _is_int(cfg["batch_size"]) and cfg["batch_size"] >= 1, "a whole number >= 1"),
              ("lr", _is_number(cfg["lr"]) and cfg["lr"] > 0, "a number > 0"),
              ("weight_decay", _is_number(cfg["weight_decay"]) and cfg["weight_decay"] >= 0, "a number >= 0"),
              ("gate_init", _is_number(cfg["gate_init"]), "a finite number"),
              ("prompt_dropout", _is_number(cfg["prompt_dropout"]) and 0 <= cfg["prompt_dropout"] < 1,
               "in [0, 1)"),
              ("seed", _is_int(cfg["seed"]) and cfg["seed"] >= 0, "a whole number >= 0"),
              ("insert_at", _is_int(cfg["insert_at"]) and 1 <= cfg["insert_at"] <= depth,
               f"a block in 1..{depth} ({cfg['arch']} has {depth} blocks)")]
    if cfg["method"] != "linear":
        checks.append(("num_prompts", _is_int(cfg["num_prompts"]) and cfg["num_prompts"] >= 1,
                       "a whole number >= 1 (--method linear trains no prompts)"))
    if kind == "segmentation":
        checks.append(("iters", _is_int(cfg["iters"]) and cfg["iters"] >= 1, "a whole number >= 1"))
    else:
        checks += [("epochs", _is_int(cfg["epochs"]) and cfg["epochs"] >= 1, "a whole number >= 1"),
                   ("warmup_epochs", _is_int(cfg["warmup_epochs"]) and cfg["warmup_epochs"] >= 0,
                    "a whole number >= 0")]
    for key, ok, want in checks:
        if not ok:
            raise UserError(f"{flag(key)} {cfg[key]} is not usable: it must be {want}")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def schedule_problem(cfg):
    """A sentence when the lr schedule never leaves the warm-up (--epochs at or below --warmup-epochs: epoch 1
    runs at lr 0 and no epoch reaches the recipe's lr), else None."""
    if "epochs" in cfg and cfg["warmup_epochs"] > 0 and cfg["epochs"] <= cfg["warmup_epochs"]:
        return (f"--epochs {cfg['epochs']} is at or below the warm-up ({cfg['warmup_epochs']} epochs): the lr "
                f"never leaves the warm-up and epoch 1 runs at lr 0; add --warmup-epochs N with N < {cfg['epochs']} "
                "(0: no warm-up)")
    return None


def sweep_grid(cfg):
    """The learning-rate search of --sweep, as overrides per run: Section A.2's lr grid (the paper's recipe),
    or VPT's lr x weight-decay grid with lr given per 256 images (--recipe vpt)."""
    if task_kind(cfg["task"]) == "segmentation":
        raise UserError("ADE20K uses SETR-PUP's fixed recipe (Section A.2); --sweep is for classification")
    if task_kind(cfg["task"]) == "demo":
        return [{"lr": cfg["lr"]}]
    if cfg.get("recipe") == "vpt":
        vpt = HPARAMS["vpt_recipe"]
        return [{"lr": base * cfg["batch_size"] / 256, "weight_decay": wd}
                for base in vpt["lr_grid"][task_kind(cfg["task"])] for wd in vpt["weight_decay_grid"]]
    return [{"lr": lr} for lr in HPARAMS["recipe"]["lr_grid"]]


def model_from_config(cfg, num_classes, checkpoint=None, verbose=True, trust_pickle=False, **vit_overrides):
    """The model of a config -- the one place every caller (training, segmentation, benchmark, figures) builds
    one. num_classes 0: no head (segmentation, features). vit_overrides: e.g. fused_attention=False."""
    vit = dict(cfg.get("arch_overrides") or {}, **vit_overrides)
    if "pos_embed_interpolation" in cfg:
        vit["pos_embed_interpolation"] = cfg["pos_embed_interpolation"]
    return gp.build_model(cfg["arch"], cfg["ssl"], cfg["method"], num_classes=num_classes, checkpoint=checkpoint,
                          img_size=cfg["img_size"], vit_overrides=vit, verbose=verbose,
                          num_prompts=cfg["num_prompts"], gate_init=cfg["gate_init"], insert_at=cfg["insert_at"],
                          prompt_dropout=cfg["prompt_dropout"], trust_pickle=trust_pickle)


def num_classes(cfg):
    """The head's size: the dataset's class count unless the config sets one (demo, small test runs)."""
    if cfg.get("num_classes"):
        return cfg["num_classes"]
    if task_kind(cfg["task"]) == "segmentation":
        return 0
    return datasets.num_classes(cfg["task"])


NAME_KEYS = ("task", "ssl", "arch", "method", "num_prompts", "insert_at", "lr", "seed")


def recipe_of(cfg):
    """The config the recipe gives for this run's task, backbone, method, size, prompt count and insertion block:
    what `cfg` must equal (lr and seed aside) to be a run of the paper's recipe."""
    allowed = allowed_overrides(task_kind(cfg["task"]))
    keep = {k: cfg[k] for k in ("arch", "num_prompts", "insert_at", "recipe") if k in cfg and k in allowed}
    return resolve(cfg["task"], cfg["ssl"], cfg["method"], **keep)


def deviations(cfg):
    """{key: value} where `cfg` departs from its recipe, for keys a result file's name does not already show
    (epochs, iters, gate_init, ...). Empty for a run of the recipe."""
    base = recipe_of(cfg)
    return {k: cfg.get(k) for k in sorted(set(cfg) | set(base))
            if k not in NAME_KEYS and cfg.get(k) != base.get(k)}
