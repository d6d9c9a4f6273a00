"""Reproduce Gated Prompt Tuning (Yoo et al., ICML 2023): one paper cell, a sweep, or a whole table.

    python reproduce.py                                   # pipeline demo on generated data (CPU, no downloads)
    python reproduce.py --task cub --ssl mocov3           # one cell of Table 1 with the paper's recipe
    python reproduce.py --task cub --ssl mocov3 --download   # ... fetching the checkpoint and CUB first
    python reproduce.py --task dtd --ssl mae --sweep      # the paper's lr search, then the final run
    python reproduce.py --table 1                         # stored results next to the paper's numbers
    python reproduce.py --table 1 --run                   # run every missing cell of Table 1, then print it
    python reproduce.py download --ssl mae --arch vit_base   # fetch and verify a backbone checkpoint
    python reproduce.py prepare --dataset cub             # VPT-sized splits from the release files
    python reproduce.py figure 4                          # analyses (see `python reproduce.py figure -h`)
    python reproduce.py predict --pack RUN.pack.pt photos/   # top-5 classes per image (see `predict -h`)

Reads top to bottom: arguments -> config (recipes.resolve, paper_hparams.yaml) -> runs (trainer.py for
classification, segmentation.py for ADE20K: data -> model -> train -> evaluate) -> result files (results.py)
-> summary or table. No other module imports this one.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from concurrent.futures import as_completed
from pathlib import Path

import torch
from tqdm import tqdm

import analysis
import data
import downloads
import gated_prompt as gp
import predict
import recipes
import releases
import results
import runtime
import segmentation
import trainer

OVERRIDES = (("--lr", float), ("--num-prompts", int), ("--gate-init", float), ("--batch-size", int),
             ("--epochs", int), ("--warmup-epochs", int), ("--insert-at", int), ("--seed", int),
             ("--prompt-dropout", float), ("--weight-decay", float), ("--iters", int))

# --- 1. arguments ---------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--task", choices=recipes.TASKS, metavar="TASK",
                      help="FGVC: cub nabirds flowers cars dogs; VTAB-1k: " + " ".join(data.VTAB_TASKS) + "; ade20k")
    what.add_argument("--ssl", choices=["mae", "mocov3"], default="mae", help="self-supervised backbone (default mae)")
    what.add_argument("--method", choices=list(gp.METHODS), default="gated+temp",
                      help="gated+temp is the paper's method (default); gated = without temperatures; "
                           "gated-hard = Gumbel-sigmoid gates (Table 4); vpt-shallow, vpt-deep, linear = baselines")
    what.add_argument("--demo", action="store_true", help="pipeline demo on generated data (the default with no --task)")
    what.add_argument("--table", choices=["1", "2", "3", "4", "6", "7", "8"], help="print a paper table from stored results")
    what.add_argument("--run", action="store_true", help="with --table: run every missing cell first (one command "
                                                          "for a whole table; add --sweep, --seeds, --workers)")
    what.add_argument("--all", action="store_true", help="with --table: also list stored runs of other settings")
    what.add_argument("--print-config", action="store_true", help="print the resolved run configuration and exit")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--sweep", action="store_true", help="search the lr grid on the validation split first")
    proto.add_argument("--seeds", type=int, default=1, help="repeat the final run with N seeds, report mean +- std")
    proto.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    proto.add_argument("--recipe", choices=recipes.RECIPES, default=None,
                       help="paper (default): Table 5's settings for every method; vpt: VPT's own recipe for the "
                            "VPT baselines (lr x weight-decay search with lr per 256 images; needs --sweep)")
    over = p.add_argument_group("overrides of paper_hparams.yaml (a run that departs from the paper's recipe is "
                                "stored under its own name and never fills a paper cell)")
    for name, kind in OVERRIDES:
        over.add_argument(name, type=kind, default=None)
    over.add_argument("--arch", choices=list(gp.ARCHS), default=None, help="backbone size (default vit_base)")
    paths = p.add_argument_group("paths and hardware (never change which result a run is)")
    paths.add_argument("--data-dir", default="data", help="holds cub/ (or CUB_200_2011/) nabirds/ flowers/ cars/ "
                                                          "dogs/ vtab-1k/ ADEChallengeData2016/ (default ./data)")
    paths.add_argument("--checkpoint", help="backbone file (default: checkpoints/<official file name>)")
    paths.add_argument("--download", action="store_true",
                       help="fetch a missing official checkpoint (verified) and CUB / Flowers / Dogs")
    paths.add_argument("--mirror", default=None, help="base URL replacing the official hosts (or GATED_PROMPT_MIRROR)")
    paths.add_argument("--results-dir", default="results", help="one JSON per run is written here")
    paths.add_argument("--cache-dir", default=None, help="decoded images between runs (default <results-dir>/cache)")
    paths.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    paths.add_argument("--fp32", action="store_true", help="disable bf16 autocast (the official code's numerics)")
    paths.add_argument("--no-compile", action="store_true", help="disable torch.compile on CUDA")
    paths.add_argument("--workers", type=int, default=None,
                       help="independent runs (sweep, seeds, --table N --run) in parallel, one per GPU (default: all GPUs)")
    return p.parse_args(argv)


def settings_from(args):
    return runtime.Settings.for_device(
        args.device, fp32=args.fp32, no_compile=args.no_compile, results_dir=args.results_dir,
        data_dir=args.data_dir, cache_dir=args.cache_dir, checkpoint=args.checkpoint, resume=args.resume,
        download=args.download, mirror=args.mirror, workers=args.workers)

# --- 2. configuration -----------------------------------------------------------------------------


def overrides_from(args):
    """The config overrides given on the command line (None = not given)."""
    keys = [name[2:].replace("-", "_") for name, _ in OVERRIDES] + ["arch", "recipe"]
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def resolve_config(args):
    return recipes.resolve(args.task or "demo", args.ssl, args.method, **overrides_from(args))

# --- 3. runs --------------------------------------------------------------------------------------


def run_one(cfg, protocol, settings, lr_source="recipe"):
    """One config end to end: its stored result if finished, else train and evaluate, then write the result."""
    files = results.run_files(settings.results_dir, cfg, protocol)
    stored = results.stored_result(files, cfg)
    if stored is not None:
        if runtime.is_main():
            print(f"{files.result} exists; reusing it (delete it to run again)")
        return stored
    if recipes.task_kind(cfg["task"]) == "segmentation":
        body, prompt_state = segmentation.train_segmentation(cfg, settings, files.state)
    else:
        body, prompt_state = trainer.run_classification(cfg, protocol, settings)
    result = results.new_result(cfg, protocol, lr_source, settings, body, runtime.code_version())
    if runtime.is_main():
        results.write_result(files, result, prompt_state)
        print(f"wrote {files.result}")
    return result


def lr_source(args):
    """Where a run's lr comes from (results.is_paper_run also accepts a command-line lr equal to the recipe's)."""
    return "command line" if args.lr is not None else "recipe"


def run_cells(cfgs, args, settings):
    """Cells (one, or a whole table): all sweep runs, then all final runs (--seeds each), through one queue."""
    sources = [lr_source(args)] * len(cfgs)
    if args.sweep:
        grids = [recipes.sweep_grid(c) for c in cfgs]
        jobs = [(dict(c, **point), "sweep", "sweep grid") for c, grid in zip(cfgs, grids) for point in grid]
        scores = iter(val_score(r) for r in run_queue(jobs, settings))
        picked = []
        for c, grid in zip(cfgs, grids):
            by_point = [(next(scores), point) for point in grid]
            best = max(by_point, key=lambda s: s[0])[1]  # the first (smallest lr) among ties, as VPT's tuner
            picked.append(dict(c, **best))
            if runtime.is_main():
                print(f"{c['task']}/{c['ssl']}/{c['method']} sweep (val acc): "
                      + ", ".join(f"{_point_text(p)}: {s:.2f}" for s, p in by_point) + f" -> {_point_text(best)}")
        cfgs, sources = picked, ["sweep"] * len(picked)
    jobs = [(dict(c, seed=c["seed"] + i), "final", source) for c, source in zip(cfgs, sources)
            for i in range(args.seeds)]
    done = run_queue(jobs, settings)
    return cfgs, [done[i * args.seeds:(i + 1) * args.seeds] for i in range(len(cfgs))]


def _point_text(point):
    return " ".join(f"{k} {v:g}" for k, v in point.items())


def val_score(result):
    return next(v for k, v in result["final"].items() if k.endswith("_acc"))


def run_queue(jobs, settings):
    """Independent runs, in order. With several workers (default: one per visible GPU), that many processes
    each take one GPU and run one job at a time; results come back in job order either way."""
    workers = settings.workers or (torch.cuda.device_count() if settings.device.type == "cuda" else 1)
    if workers <= 1 or len(jobs) <= 1 or runtime.world()[1] > 1:
        done = []
        for i, (cfg, protocol, source) in enumerate(jobs):
            if len(jobs) > 1 and runtime.is_main():
                print(f"=== run {i + 1}/{len(jobs)}: {results.run_name(cfg, protocol)}")
            done.append(run_one(cfg, protocol, settings, source))
        return done
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for i in range(workers):
        devices.put(f"cuda:{i}" if settings.device.type == "cuda" else "cpu")
    quiet = dataclasses.replace(settings, quiet=True)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(devices,)) as pool:
        futures = [pool.submit(_worker_run, cfg, protocol, quiet, source) for cfg, protocol, source in jobs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=f"runs on {workers} workers"):
            pass
        return [f.result() for f in futures]


def _worker_init(devices):
    global _WORKER_DEVICE
    _WORKER_DEVICE = torch.device(devices.get())
    if _WORKER_DEVICE.type == "cuda":
        torch.cuda.set_device(_WORKER_DEVICE)
    else:
        torch.set_num_threads(1)


def _worker_run(cfg, protocol, settings, source):
    return run_one(cfg, protocol, dataclasses.replace(settings, device=_WORKER_DEVICE), source)


def run_table(number, args, settings):
    """Queue every cell of a table (sweeps first with --sweep), spread over the GPUs, then print it."""
    cfgs = [recipes.resolve(**dict(spec, **{k: v for k, v in overrides_from(args).items() if k == "recipe"}))
            for spec in results.table_cells(number)]
    if runtime.is_main():
        print(f"Table {number}: {len(cfgs)} cells x {args.seeds} seed(s)" + (" after lr sweeps" if args.sweep else ""))
    classification = [c for c in cfgs if recipes.task_kind(c["task"]) != "segmentation"]
    if classification:
        run_cells(classification, args, settings)
    segmentation_cells = [c for c in cfgs if c not in classification]
    if segmentation_cells:
        run_cells(segmentation_cells, argparse.Namespace(**dict(vars(args), sweep=False)), settings)

# --- 4. output ------------------------------------------------------------------------------------


def print_summary(cfg, runs):
    """The cell's number(s), mean ± std over seeds, and the paper's number when the run is its exact recipe."""
    for metric in [k for k in runs[0]["final"] if k in ("test_acc", "miou_ss", "miou_ms", "val_acc")]:
        mean, std, n = results.summary([r["final"][metric] for r in runs])
        paper = results.paper_value(runs[0], metric)
        differs = "" if results.is_paper_run(runs[0]) else f"   (not the paper's recipe: {results.how_it_differs(runs[0])})"
        print(f"{cfg['task']} / {cfg['ssl']} / {cfg['method']}: {metric} {mean:.2f}"
              + (f" ± {std:.2f} over {n} seeds" if n > 1 else "")
              + (f"   (paper: {paper:.2f})" if paper is not None else differs))


def run_demo(args, settings):
    print("PIPELINE DEMO - generated images, a small randomly initialised ViT, CPU-sized. These are NOT the\n"
          "paper's numbers; they show the harness end to end. For a paper cell: --task cub --ssl mocov3.\n")
    settings = dataclasses.replace(settings, results_dir=str(Path(settings.results_dir) / "demo"), compile=False)
    shutil.rmtree(settings.results_dir, ignore_errors=True)  # the demo always runs afresh
    rows = []
    for method in recipes.HPARAMS["demo"]["methods"]:
        cfg = recipes.resolve("demo", method=method, **overrides_from(args))
        print(f"--- {method}")
        rows.append((method, run_one(cfg, "final", settings, lr_source(args))))
    print("\nDEMO RESULTS (generated data; not comparable to the paper)")
    print(f"{'method':<14}{'test acc %':>12}{'train img/s':>14}")
    for method, r in rows:
        print(f"{method:<14}{r['final']['test_acc']:>12.2f}{r['history'][-1]['images_per_second']:>14.0f}")
    ratio = rows[-1][1]["selection_ratio"]
    print("\nlearned selection ratio r_l (Eq. 11), blocks 1..L-1:")
    print("  " + "  ".join(f"{l + 1}:{r:.2f}" for l, r in enumerate(ratio)))
    print(f"results: {settings.results_dir}")

# --- main -----------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"prepare": prepare_main, "figure": analysis.main, "download": download_main,
                   "predict": predict.main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    args = parse_args(argv)
    if args.run and not args.table:
        raise runtime.UserError("--run goes with --table N")
    if args.table and not args.run:
        return results.print_table(args.table, args.results_dir, show_all=args.all)
    if args.print_config:
        cfg = resolve_config(args)
        print(json.dumps(cfg, indent=2))
        if cfg["method"] in ("vpt-shallow", "vpt-deep") and cfg.get("recipe") == "paper":
            print("note: the VPT baselines run Table 5's batch size and lr of the paper's method (the paper lists "
                  "none for them); --recipe vpt --sweep runs VPT's own recipe", file=sys.stderr)
        return
    runtime.init_distributed()
    settings = settings_from(args)
    if args.table:
        run_table(args.table, args, settings)
        return results.print_table(args.table, args.results_dir, show_all=args.all) if runtime.is_main() else None
    if args.demo or not args.task:
        return run_demo(args, settings)
    cfg = resolve_config(args)
    if cfg.get("recipe") == "vpt" and not args.sweep and (args.lr is None or args.weight_decay is None):
        raise runtime.UserError("--recipe vpt picks lr and weight decay on val: add --sweep (or give --lr and "
                                "--weight-decay)")
    if args.sweep:
        recipes.sweep_grid(cfg)  # refuses ADE20K before anything runs
    (cfg,), (runs,) = run_cells([cfg], args, settings)
    if runtime.is_main():
        print_summary(cfg, runs)


def prepare_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py prepare",
                                description="Build VPT-sized train/val/test json splits of an FGVC dataset from "
                                            "its official release files (fixed seed 42).")
    p.add_argument("--dataset", required=True, choices=list(data.FGVC_DATASETS))
    p.add_argument("--root", help="the dataset folder holding the release files and images (default: found under "
                                  "--data-dir by its release name, e.g. data/CUB_200_2011)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = p.parse_args(argv)
    root = args.root or data.dataset_root(args.dataset, args.data_dir)
    print(releases.prepare(args.dataset, root, overwrite=args.overwrite))


def download_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py download",
                                description="Fetch and verify an official backbone checkpoint (SHA-256 recorded in "
                                            "checkpoints/SHA256SUMS), or an FGVC dataset with a stable archive.")
    p.add_argument("--ssl", choices=["mae", "mocov3"], default="mae")
    p.add_argument("--arch", choices=list(gp.ARCHS), default="vit_base")
    p.add_argument("--dataset", choices=list(data.FGVC_DATASETS) + ["vtab-1k", "ade20k"],
                   help="fetch a dataset instead (CUB, Flowers, Dogs; the others print where to get them)")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--mirror", default=None, help="base URL replacing the official hosts (or GATED_PROMPT_MIRROR)")
    args = p.parse_args(argv)
    if args.dataset:
        print(releases.fetch_dataset(args.dataset, args.data_dir, mirror=args.mirror))
    else:
        print(downloads.checkpoint_path(args.arch, args.ssl, args.checkpoint_dir, download=True, mirror=args.mirror))


if __name__ == "__main__":
    try:
        main()
    except (runtime.UserError, data.DataError, gp.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(runtime.EXIT_BAD_INPUT)
    except runtime.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
