"""Analyses and figures of "Improving Visual Prompt Tuning for Self-supervised Vision Transformers".

Each figure function writes a PNG plus the numbers behind it (JSON, and CSV for tables) into an output
folder and returns {"png": path, "json": path, "csv": path, ...}.

From stored runs (one JSON per run under a results folder, as the harness writes them):
    figure_insertion(results_dir, out_dir)        Figure 1: accuracy vs first prompted block k
    figure_selection_ratio(results_dir, out_dir)  Figure 4: selection ratio r_l per block (Eq. 10-11)
    figure_prompt_count(results_dir, out_dir)     Figure 7 / Table 7: accuracy vs total prompt tokens
From models:
    figure_attention(model_specs, image, out_dir) Figure 5: CLS-to-patch attention at blocks 3, 7, 12
    dip.figure_dip(models, images, blocks, ...)   Figures 2 and 9 (dip.py): Deep Image Prior inversion of block
                                                  tokens, reconstructions and their PSNR / SSIM

Run files are read with results.py: "config", "recipe_version", "lr_source", "deviations" and, depending on
the figure, "final" (with "test_acc" in percent) or "selection_ratio". Only "final"-protocol runs count, and
only runs of the paper's exact recipe (results.is_paper_run; Figure 1 at Section A.2's learning rates):
with include_other_settings (--all) the others are drawn too, apart and labelled with how they differ, and
the JSON / CSV give every series a "setting". Seeds of one plotted point are averaged; if a point was run at
several learning rates, the newest run file's lr is used.
Figure 5 rebuilds trained models from a run JSON + the <name>.prompts.pt beside it (model_from_run).

Command line: `python reproduce.py figure N ...` for every figure, 2 and 9
included; see main(). common.py holds what the figures share (image input, matplotlib files out);
matplotlib is imported only when a figure is drawn.
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from harness.figures import dip
import gated_prompt as gp
from harness import config
from harness import results
from harness.data.datasets import imagenet_normalize
from harness.figures.common import (check_blocks, eval_and_frozen, model_device, new_figure, save_figure,
                       to_image_tensor, write_csv)
from harness import runtime
from harness.runtime import EXIT_BAD_INPUT, UserError, write_json


# -----------------------------------------------------------------------------
# Run files: read with results.py (load_runs, final_metric, newest_lr_runs, summary); a figure shows only runs
# of the paper's exact recipe (results.is_paper_run) unless asked for the others, which are drawn apart

PAPER_RECIPE = "paper recipe"   # the "setting" of a run of the paper's exact recipe


def split_by_setting(runs, figure, include_other_settings=False, paper_lr=lambda cfg: None):
    """Tag each run with run["setting"]: "paper recipe" (results.is_paper_run at lr paper_lr(its typed config), None = the
    recipe's lr) or how it differs (results.how_it_differs). Returns (runs to draw, runs left out): the paper's
    runs, or every run with include_other_settings. A UserError when runs exist but none is the paper's and
    the others are not asked for."""
    for run in runs:
        paper = results.is_paper_run(run, paper_lr(results.config_of(run)))
        run["setting"] = PAPER_RECIPE if paper else results.how_it_differs(run)
    paper = [r for r in runs if r["setting"] == PAPER_RECIPE]
    others = [r for r in runs if r["setting"] != PAPER_RECIPE]
    if include_other_settings:
        return runs, []
    if not paper and others:
        examples = "; ".join(f"{r['path']}: {r['setting']}" for r in others[:3])
        raise UserError(f"{figure}: none of the {len(others)} matching run(s) is of the paper's exact recipe "
                        f"({examples}{' ...' if len(others) > 3 else ''}); --all draws them, marked as other "
                        "settings")
    return paper, others


def _left_out(runs):
    """The JSON record of runs not drawn."""
    return [{"run": r["path"], "setting": r["setting"]} for r in runs]


def _with_setting(label, setting, sep=" "):
    """A legend / title text marked with the run setting when it is not the paper's recipe."""
    return label if setting == PAPER_RECIPE else f"{label}{sep}(other settings: {setting})"


def _field(run, name):
    return run["setting"] if name == "setting" else run["config"].get(name)


def _group_order(key, names):
    """Sort key of a group: the paper's recipe before other settings, then by value."""
    setting = key[names.index("setting")] if "setting" in names else PAPER_RECIPE
    return setting != PAPER_RECIPE, tuple(map(str, key))


def _point(runs, metric):
    """Mean/std/n of final[metric] over the seeds of one point (newest lr), with the lr and run files."""
    runs = results.newest_lr_runs(runs)
    mean, std, n = results.summary([results.final_metric(r, metric) for r in runs])
    return {"mean": mean, "std": std, "n": n, "lr": runs[0]["config"].get("lr"), "runs": [r["path"] for r in runs]}


def _curves(runs, group_names, x_name, x_of, metric):
    """One series per distinct (config[name] for name in group_names; "setting" is the run's setting), with one
    point per x_of(config): {**group, x_name: [x...], "mean", "std", "n", "lr", "runs": [...] per x}.
    Unfinished runs are skipped; runs of different settings never share a point."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if results.final_metric(run, metric) is not None:
            groups[tuple(_field(run, name) for name in group_names)][x_of(run["config"])].append(run)
    series = []
    for key, by_x in sorted(groups.items(), key=lambda kv: _group_order(kv[0], group_names)):
        xs = sorted(by_x)
        points = [_point(by_x[x], metric) for x in xs]
        series.append({**dict(zip(group_names, key)), x_name: xs,
                       **{field: [p[field] for p in points] for field in ("mean", "std", "n", "lr", "runs")}})
    return series


def _finished(results_dir, metric, **filters):
    return [r for r in results.load_runs(results_dir, **filters) if results.final_metric(r, metric) is not None]


def _filter_text(filters):
    return ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None) or "no filter"


def _label(key, names, varying):
    """Legend text from the parts of a group key that differ between groups."""
    parts = [f"{v}" for v, n in zip(key, names) if n in varying]
    return " / ".join(parts) if parts else " / ".join(str(v) for v in key)


def _varying(keys, names):
    return {n for i, n in enumerate(names) if len({k[i] for k in keys}) > 1}


# -----------------------------------------------------------------------------
# Panel layout


def _grid_shape(n, max_cols=3):
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _hide_unused(axes, used):
    for ax in axes.flat[used:]:
        ax.set_visible(False)

# -----------------------------------------------------------------------------
# Figure 1: accuracy vs the block where prompts are first inserted


def figure1_lr(cfg):
    """The lr of a Figure 1 run (Section A.2: CUB 0.1 for MAE, 1.0 for MoCo v3; KITTI 0.1), from paper_hparams.yaml's
    figure1_lr; None (the recipe's lr) for other tasks, backbones and methods than VPT-shallow, and for a stored
    config this code cannot build."""
    if cfg is None or cfg.method != "vpt-shallow":
        return None
    return config.HPARAMS["figure1_lr"].get(cfg.task, {}).get(cfg.ssl)


def figure_insertion(results_dir, out_dir, method="vpt-shallow", metric="test_acc", include_other_settings=False,
                     **filters):
    """Figure 1: final accuracy vs insert_at (k = first block that sees prompts), one panel per task, one line per
    SSL backbone; the paper plots VPT-shallow. Only runs of the paper's recipe at Figure 1's lr (figure1_lr), unless
    include_other_settings: then the others are drawn too, as their own dashed lines named by how they differ.
    Runs without an insert_at key count as k = 1. Seeds of one point are averaged; pass filters (e.g. lr=0.1) to
    pick the runs. method=None takes every method."""
    filters = dict(filters, method=method)
    runs = _finished(results_dir, metric, **filters)
    if not runs:
        raise UserError(f"figure 1: no finished runs (final.{metric}) in {results_dir} ({_filter_text(filters)})")
    runs, left_out = split_by_setting(runs, "figure 1", include_other_settings, paper_lr=figure1_lr)
    names = ("task", "ssl", "method", "setting")
    series = _curves(runs, names, "insert_at", lambda c: int(c.get("insert_at", 1)), metric)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "figure1_insertion.json"),
             "csv": os.path.join(out_dir, "figure1_insertion.csv"),
             "png": os.path.join(out_dir, "figure1_insertion.png")}
    write_json(paths["json"], {"figure": 1, "metric": metric, "filters": filters, "series": series,
                               "other_settings_not_shown": _left_out(left_out)})
    write_csv(paths["csv"], ["task", "ssl", "method", "setting", "insert_at", f"{metric}_mean", f"{metric}_std",
                              "n_runs", "lr"],
               [(s["task"], s["ssl"], s["method"], s["setting"], k, round(m, 4), round(sd, 4), n, lr)
                for s in series for k, m, sd, n, lr in zip(s["insert_at"], s["mean"], s["std"], s["n"], s["lr"])])

    tasks = sorted({s["task"] for s in series}, key=str)
    varying = _varying([(s["ssl"], s["method"]) for s in series], ("ssl", "method")) | {"ssl"}
    nrows, ncols = _grid_shape(len(tasks))
    fig, axes = new_figure(nrows, ncols)
    for ax, task in zip(axes.flat, tasks):
        for s in (s for s in series if s["task"] == task):
            label = _with_setting(_label((s["ssl"], s["method"]), ("ssl", "method"), varying), s["setting"])
            ax.errorbar(s["insert_at"], s["mean"], yerr=s["std"], capsize=2, label=label, **_line_style(s["setting"]))
        ax.set_title(str(task))
        ax.set_xlabel("block where prompts are first inserted (k)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xticks(sorted({k for s in series for k in s["insert_at"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _hide_unused(axes, len(tasks))
    save_figure(fig, paths["png"], "Figure 1: accuracy vs the first block that sees prompts")
    return paths


def _line_style(setting):
    """Solid lines with dots for the paper's recipe; dashed lines with crosses for other settings."""
    return {"marker": "o"} if setting == PAPER_RECIPE else {"marker": "x", "linestyle": "--"}

# -----------------------------------------------------------------------------
# Figure 4: selection ratio (Eq. 10-11)


def _ratio_list(value):
    """A stored selection ratio as a flat list (if a history of ratios was stored, its last entry)."""
    if isinstance(value, dict):
        value = value.get("ratio") or value.get("values")
    if isinstance(value, list) and value and isinstance(value[0], list):
        value = value[-1]
    return [float(v) for v in value] if isinstance(value, list) and value else None


def figure_selection_ratio(results_dir, out_dir, include_other_settings=False, **filters):
    """Figure 4: bar chart of the stored selection ratio r_l (Eq. 11) over blocks 1..L-1, one panel per
    (task, ssl) (and method, when several gated methods are stored). Runs are averaged within a panel. Only runs of
    the paper's recipe, unless include_other_settings: then the others get panels of their own (grey bars) whose
    title says how they differ."""
    runs = []
    for run in results.load_runs(results_dir, **filters):
        run["ratio"] = _ratio_list(run.get("selection_ratio"))
        if run["ratio"] is not None:
            runs.append(run)
    if not runs:
        raise UserError(f"figure 4: no runs with a stored selection_ratio in {results_dir} ({_filter_text(filters)}); "
                        "only gated methods have one")
    runs, left_out = split_by_setting(runs, "figure 4", include_other_settings)
    groups = defaultdict(list)   # (task, ssl, method, setting) -> runs
    for run in runs:
        groups[tuple(_field(run, name) for name in ("task", "ssl", "method", "setting"))].append(run)
    panels = [_ratio_panel(key, runs) for key, runs in
              sorted(groups.items(), key=lambda kv: _group_order(kv[0], ("task", "ssl", "method", "setting")))]
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "figure4_selection_ratio.json"),
             "csv": os.path.join(out_dir, "figure4_selection_ratio.csv"),
             "png": os.path.join(out_dir, "figure4_selection_ratio.png")}
    write_json(paths["json"], {"figure": 4, "filters": filters, "panels": panels,
                               "other_settings_not_shown": _left_out(left_out)})
    write_csv(paths["csv"], ["task", "ssl", "method", "setting", "block", "ratio_mean", "ratio_std", "n_runs"],
               [(p["task"], p["ssl"], p["method"], p["setting"], b, round(m, 6), round(s, 6), p["n"])
                for p in panels for b, m, s in zip(p["blocks"], p["mean"], p["std"])])

    names = ("task", "ssl", "method")
    varying = _varying([(p["task"], p["ssl"], p["method"]) for p in panels], names) | {"task", "ssl"}
    nrows, ncols = _grid_shape(len(panels))
    fig, axes = new_figure(nrows, ncols)
    for ax, p in zip(axes.flat, panels):
        paper = p["setting"] == PAPER_RECIPE
        ax.bar(p["blocks"], p["mean"], yerr=p["std"] if p["n"] > 1 else None, capsize=2,
               color="tab:blue" if paper else "tab:gray")
        ax.set_title(_with_setting(_label((p["task"], p["ssl"], p["method"]), names, varying), p["setting"], "\n"),
                     fontsize=10 if paper else 8)
        ax.set_xlabel("block l")
        ax.set_ylabel("selection ratio r_l (Eq. 11)")
        ax.set_xticks(p["blocks"])
        ax.set_ylim(0, max(1e-6, max(m + s for m, s in zip(p["mean"], p["std"]))) * 1.1)
    _hide_unused(axes, len(panels))
    save_figure(fig, paths["png"], "Figure 4: selection ratio (Eq. 11)")
    return paths


def _ratio_panel(key, runs):
    """Mean and std of the selection ratios of one panel's runs (newest lr)."""
    task, ssl, method, setting = key
    runs = results.newest_lr_runs(runs)
    lengths = {len(r["ratio"]) for r in runs}
    if len(lengths) > 1:
        raise UserError(f"figure 4: runs for {task}/{ssl}/{method} store selection ratios of different lengths "
                        f"{sorted(lengths)}: {[r['path'] for r in runs]}")
    arr = np.asarray([r["ratio"] for r in runs], dtype=np.float64)
    return {"task": task, "ssl": ssl, "method": method, "setting": setting, "blocks": list(range(1, arr.shape[1] + 1)),
            "mean": arr.mean(0).tolist(),
            "std": (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])).tolist(),
            "n": len(arr), "lr": runs[0]["config"].get("lr"), "runs": [r["path"] for r in runs]}

# -----------------------------------------------------------------------------
# Figure 7 / Table 7: accuracy vs the total number of prompt tokens


def total_prompt_tokens(stored):
    """Prompt tokens a run trains, from a result file's stored config (read as the file is, older harness versions
    included): VPT-deep inserts num_prompts at every block from insert_at to L (Figure 7: 1, 2, 4, 8 per block =
    12, 24, 48, 96 on ViT-B); the other methods insert them once."""
    n = int(stored["num_prompts"])
    if stored.get("method") != "vpt-deep":
        return n
    depth = int((stored.get("arch_overrides") or {}).get("depth") or stored.get("depth")
                or gp.ARCHS[stored.get("arch") or "vit_base"][2])
    return n * (depth - int(stored.get("insert_at", 1)) + 1)


def figure_prompt_count(results_dir, out_dir, methods=("vpt-deep", "gated", "gated+temp"), metric="test_acc",
                        include_other_settings=False, **filters):
    """Figure 7 / Table 7: final accuracy vs total prompt tokens, one panel per (ssl, task), one line per
    method. Also writes Table 7 as CSV: one row per (tokens, method, setting), one column per task, and their mean
    (AVG, only where every task has a run). Only runs of the paper's recipe (Section A.2: Table 1's lr), unless
    include_other_settings: then the others are drawn too, as their own dashed lines named by how they differ."""
    filters = dict(filters, method=list(methods) if methods is not None else None)
    runs = [r for r in _finished(results_dir, metric, **filters) if r["config"].get("num_prompts") is not None]
    if not runs:
        raise UserError(f"figure 7: no finished runs (final.{metric}) with num_prompts in {results_dir} "
                        f"({_filter_text(filters)})")
    runs, left_out = split_by_setting(runs, "figure 7", include_other_settings)
    series = _curves(runs, ("ssl", "task", "method", "setting"), "prompt_tokens", total_prompt_tokens, metric)
    tasks = sorted({s["task"] for s in series}, key=str)
    table = _table7(series, tasks)

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "figure7_prompt_count.json"),
             "csv": os.path.join(out_dir, "table7_prompt_count.csv"),
             "png": os.path.join(out_dir, "figure7_prompt_count.png")}
    write_json(paths["json"], {"figure": 7, "metric": metric, "filters": filters, "series": series, "table7": table,
                               "other_settings_not_shown": _left_out(left_out)})
    fmt = lambda v: "" if v is None else round(v, 2)  # noqa: E731
    write_csv(paths["csv"], ["ssl", "prompt_tokens", "method", "setting"] + [str(t) for t in tasks] + ["AVG"],
               [[r["ssl"], r["prompt_tokens"], r["method"], r["setting"]] + [fmt(r[t]) for t in tasks] + [fmt(r["AVG"])]
                for r in table])

    panels = sorted({(s["ssl"], s["task"]) for s in series}, key=lambda k: tuple(map(str, k)))
    nrows, ncols = _grid_shape(len(panels))
    fig, axes = new_figure(nrows, ncols)
    for ax, (ssl, task) in zip(axes.flat, panels):
        for s in (s for s in series if (s["ssl"], s["task"]) == (ssl, task)):
            ax.errorbar(s["prompt_tokens"], s["mean"], yerr=s["std"], capsize=2,
                        label=_with_setting(s["method"], s["setting"]), **_line_style(s["setting"]))
        ticks = sorted({n for s in series if (s["ssl"], s["task"]) == (ssl, task) for n in s["prompt_tokens"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{task} ({ssl})")
        ax.set_xlabel("number of prompt tokens (total)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _hide_unused(axes, len(panels))
    save_figure(fig, paths["png"], "Figure 7: accuracy vs number of prompt tokens")
    return paths


def _table7(series, tasks):
    """Table 7's rows: one per (ssl, tokens, method, setting), a value per task and their mean (AVG, only where
    every task has one)."""
    cell = {(s["ssl"], n, s["method"], s["setting"], s["task"]): m
            for s in series for n, m in zip(s["prompt_tokens"], s["mean"])}
    rows = sorted({k[:4] for k in cell}, key=lambda r: (str(r[0]), r[1], str(r[2]), r[3] != PAPER_RECIPE, r[3]))
    table = []
    for ssl, n, method, setting in rows:
        values = [cell.get((ssl, n, method, setting, t)) for t in tasks]
        avg = float(np.mean(values)) if all(v is not None for v in values) else None
        table.append({"ssl": ssl, "prompt_tokens": n, "method": method, "setting": setting,
                      **dict(zip(tasks, values)), "AVG": avg})
    return table

# -----------------------------------------------------------------------------
# Figure 5: self-attention maps


def backbone_twin(model):
    """A prompt-free ("linear" method) copy of model's frozen backbone with the same weights: the
    "frozen backbone" row of Figure 5."""
    # The twin copies an existing model's architecture (its gated_prompt ViTConfig) and weights, so it is built
    # from those two directly: there is no run config to resolve and no file to load.
    twin = gp.VisionTransformer(model.cfg, gp.prompt_config("linear", num_classes=0))
    twin.load_state_dict(model.backbone_state_dict())
    return twin.to(model_device(model)).eval()


@torch.no_grad()
def cls_attention_maps(model, image, blocks=(3, 7, 12)):
    """{block: [gh, gw]} attention of CLS to each patch after softmax, averaged over heads (Figure 5).
    Prompt tokens (if any) take part in the softmax but are not shown. image: [3,H,W] in [0,1]."""
    check_blocks(model, blocks)
    x = imagenet_normalize(image[None].to(model_device(model)), max_value=1.0)
    gh, gw = x.shape[-2] // model.cfg.patch_size, x.shape[-1] // model.cfg.patch_size
    with eval_and_frozen(model):
        attns = model.attention_maps(x, blocks=tuple(blocks))
    # sequence = [CLS, prompts, patches]: the patches are always the last gh*gw tokens
    return {b: attns[b][0, :, 0, -gh * gw:].float().mean(0).reshape(gh, gw).cpu() for b in blocks}


def figure_attention(model_specs, image, out_dir, blocks=(3, 7, 12)):
    """Figure 5: one row per (label, model) (e.g. frozen backbone / gated / gated + temperatures), one
    column per block: CLS-to-patch attention averaged over heads, upsampled and overlaid on the image.
    image: path, PIL image or [3,H,W] tensor in [0,1]; resized to each model's input size."""
    if not model_specs:
        raise UserError("figure 5: no models given")
    rows = []
    for label, model in model_specs:
        img = to_image_tensor(image, model.cfg.img_size)
        rows.append((label, img, cls_attention_maps(model, img, blocks)))
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "figure5_attention.json"),
             "png": os.path.join(out_dir, "figure5_attention.png")}
    maps_by_model = {label: {str(b): maps[b].tolist() for b in blocks} for label, _, maps in rows}
    write_json(paths["json"], {"figure": 5, "blocks": list(blocks), "models": maps_by_model,
                               "note": "CLS-to-patch softmax attention averaged over heads, on the patch grid"})

    fig, axes = new_figure(len(rows), 1 + len(blocks), panel_size=(2.6, 2.6))
    for r, (label, img, maps) in enumerate(rows):
        picture = img.permute(1, 2, 0).numpy()
        axes[r, 0].imshow(picture)
        axes[r, 0].set_ylabel(label)
        if r == 0:
            axes[r, 0].set_title("image")
        for c, b in enumerate(blocks, start=1):
            heat = F.interpolate(maps[b][None, None], size=img.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)  # per-map min-max for display
            axes[r, c].imshow(picture)
            axes[r, c].imshow(heat.numpy(), cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, c].set_title(f"block {b}")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, paths["png"], "Figure 5: CLS-to-patch self-attention (mean over heads)")
    return paths

# -----------------------------------------------------------------------------
# Models for Figures 2, 5 and 9 from files


def model_from_run(run_path, checkpoint, device="cpu"):
    """Rebuild a trained model: config.model_from_config of its run JSON's config on the backbone file it was trained on,
    with the prompt-side weights the harness saves beside the JSON as <name>.prompts.pt. Returns (model, run)."""
    run_path = os.fspath(run_path)
    with open(run_path) as f:
        run = json.load(f)
    cfg = run.get("config") if isinstance(run, dict) else None
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise UserError(f"{run_path}: not a run JSON with a config (expected the harness's result file)")
    prompts_path = run_path[:-len(".json")] + ".prompts.pt" if run_path.endswith(".json") else run_path + ".prompts.pt"
    if not os.path.isfile(prompts_path):
        raise UserError(f"{prompts_path}: the trained prompts of {run_path} are missing (the harness writes them "
                        "beside the run JSON)")
    state = torch.load(prompts_path, map_location="cpu", weights_only=True)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0   # the trained head's size
    try:
        cfg = config.from_identity(cfg)
    except UserError as e:
        raise UserError(f"{run_path}: its config {e} (written by an older harness?)") from None
    model = config.model_from_config(cfg, num_classes, checkpoint, verbose=False)
    try:
        model.load_prompt_state_dict(state)
    except ValueError as e:
        raise UserError(f"{prompts_path} does not fit the model of {run_path}: {e}") from None
    return model.to(device).eval(), run


def backbone_from_file(checkpoint, arch="vit_base", img_size=224, device="cpu", ssl="mae", **arch_overrides):
    """A prompt-free backbone (the "linear" method, no head) loaded from any format load_backbone reads: the config
    config.resolve gives for a linear probe with no prompts, built by config.model_from_config. ssl ("mae" or
    "mocov3") sets only the pooling, which the figures' token and attention reads do not use."""
    # Any classification task resolves to the same backbone; CUB's row only fills training fields unused here.
    cfg = config.resolve("cub", ssl, "linear", arch=arch, img_size=img_size, arch_overrides=arch_overrides,
                          num_prompts=0, gate_init=0.0, prompt_dropout=0.0)
    return config.model_from_config(cfg, 0, checkpoint, verbose=False).to(device).eval()


def image_files(paths, limit=None):
    """Image paths from files and folders (a folder: its .jpg/.jpeg/.png files, sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path)
                            if n.lower().endswith((".jpg", ".jpeg", ".png")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"image not found: {path}")
    if not files:
        raise UserError(f"no images in {paths}")
    return files[:limit] if limit else files

# -----------------------------------------------------------------------------
# Command line: python reproduce.py figure N ...


def _parse_filter(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--filter expects KEY=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def parse_args(argv=None):
    """The figure command line's arguments."""
    p = runtime.ArgumentParser(
        prog="reproduce.py figure", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw a figure of the paper; writes PNG + JSON/CSV under --out-dir.",
        epilog="""examples:
  reproduce.py figure 1 --filter lr=0.1                 accuracy vs first prompted block (stored runs)
  reproduce.py figure 4                                 selection ratios of the stored gated runs
  reproduce.py figure 4 --all                           ... and of runs of other settings, marked as such
  reproduce.py figure 7 --filter ssl=mae                accuracy vs prompt tokens + Table 7 (stored runs)
  reproduce.py figure 5 --image bird.jpg --checkpoint checkpoints/mae_pretrain_vit_base.pth \\
      --run results/cub/mae/RUN-gated.json --run results/cub/mae/RUN-gated+temp.json
  reproduce.py figure 2 --image images/ --max-images 100 --backbone supervised=ViT-B_16.npz \\
      --backbone "MoCo v3=linear-vit-b-300ep.pth.tar" --backbone MAE=mae_pretrain_vit_base.pth   (also writes 9)""")
    p.add_argument("number", type=int, choices=[1, 2, 4, 5, 7, 9], help="figure number (2 and 9 are one analysis)")
    p.add_argument("--results-dir", default="results", help="where the run JSONs are (default ./results)")
    p.add_argument("--out-dir", help="where the figure goes (default <results-dir>/figures)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="figures 1/4/7: keep runs whose config has KEY=VALUE (repeatable)")
    p.add_argument("--all", dest="include_other_settings", action="store_true",
                   help="figures 1/4/7: also draw runs that are not of the paper's exact recipe (shortened, other "
                        "settings, older recipe version, another lr), each marked with how it differs")
    p.add_argument("--method", default="vpt-shallow", help="figure 1: the method plotted (default vpt-shallow; "
                                                           "'any' for all)")
    p.add_argument("--image", action="append", default=[], help="figures 2/5/9: an image file or folder (repeatable)")
    p.add_argument("--max-images", type=int, default=None, help="figures 2/9: use at most this many images")
    p.add_argument("--run", action="append", default=[], help="figure 5: a run JSON (one row each; its .prompts.pt "
                                                              "must be beside it)")
    p.add_argument("--checkpoint", help="figure 5: the backbone file the runs were trained on")
    p.add_argument("--backbone", action="append", default=[], metavar="LABEL=FILE",
                   help="figures 2/9: a backbone to invert (repeatable; one row / line each)")
    p.add_argument("--arch", default="vit_base", choices=list(gp.ARCHS), help="figures 2/9: backbone size")
    p.add_argument("--arch-overrides", type=json.loads, default={},
                   help="figures 2/9: JSON dict of ViT config overrides (small test models)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--blocks", type=int, nargs="+", help="blocks shown (figure 5 default: 3 7 12; "
                                                         "figures 2/9 default: 1 4 7 10 12)")
    p.add_argument("--steps", type=int, default=1000, help="figures 2/9: DIP optimisation steps per image and block")
    p.add_argument("--lr", type=float, default=0.01, help="figures 2/9: DIP Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    return p.parse_args(argv)


def main(argv=None):
    """`python reproduce.py figure N ...`: draw figure N, print where its files are."""
    args = parse_args(argv)
    out_dir = args.out_dir or os.path.join(args.results_dir, "figures")
    paths = FIGURES[args.number](args, out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if args.number in (1, 4, 7):
        _note_left_out(paths["json"])
    return 0


def _filters(args):
    return dict(_parse_filter(f) for f in args.filter)


def _device_of(args):
    """--device, else cuda if available."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _figure_1(args, out_dir):
    return figure_insertion(args.results_dir, out_dir, method=None if args.method == "any" else args.method,
                            include_other_settings=args.include_other_settings, **_filters(args))


def _figure_4(args, out_dir):
    return figure_selection_ratio(args.results_dir, out_dir, include_other_settings=args.include_other_settings,
                                  **_filters(args))


def _figure_7(args, out_dir):
    return figure_prompt_count(args.results_dir, out_dir, include_other_settings=args.include_other_settings,
                               **_filters(args))


def _figure_5(args, out_dir):
    """Rows: the frozen backbone the runs were trained on, then each --run's trained model."""
    if not (args.image and args.run and args.checkpoint):
        raise UserError("figure 5 needs --image, --checkpoint and at least one --run")
    specs = []
    for run_path in args.run:
        model, run = model_from_run(run_path, args.checkpoint, _device_of(args))
        if not specs:   # first row: the frozen backbone the prompts were trained on
            specs.append((f"{run['config'].get('ssl', 'backbone')} (frozen)", backbone_twin(model)))
        specs.append((run["config"]["method"], model))
    image = image_files(args.image[:1])[0]
    return figure_attention(specs, image, out_dir, blocks=tuple(args.blocks or (3, 7, 12)))


def _figures_2_and_9(args, out_dir):
    """One model per --backbone LABEL=FILE (a bare FILE is labelled by its name)."""
    if not (args.image and args.backbone):
        raise UserError("figures 2/9 need --image (file or folder) and at least one --backbone LABEL=FILE")
    models, device = [], _device_of(args)
    for spec in args.backbone:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(spec), spec
        models.append((label, backbone_from_file(path, args.arch, args.img_size, device, **args.arch_overrides)))
    return dip.figure_dip(models, image_files(args.image, args.max_images), tuple(args.blocks or (1, 4, 7, 10, 12)),
                      out_dir, steps=args.steps, lr=args.lr, seed=args.seed)


FIGURES = {1: _figure_1, 2: _figures_2_and_9, 4: _figure_4, 5: _figure_5, 7: _figure_7, 9: _figures_2_and_9}


def _note_left_out(json_path):
    """Say how many runs of other settings a stored-run figure left out (its JSON lists them)."""
    with open(json_path) as f:
        left_out = json.load(f)["other_settings_not_shown"]
    if left_out:
        print(f"note: {len(left_out)} run(s) are not of the paper's exact recipe and are not shown (listed in "
              f"{json_path}); --all draws them, marked as other settings")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, gp.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
