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
import shlex
import shutil
import sys
import tempfile
from concurrent.futures import as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from harness.figures import analysis
from harness.data import datasets
from harness import downloads
from harness import inputs
import gated_prompt as gp
from harness import serving
from harness import recipes
from harness.data import releases
from harness import results
from harness import runtime
from harness import segmentation
from harness import classification

# Defaults of the flags whose absence a mode must see (a flag a mode cannot apply is refused by name)
DEFAULTS = dict(ssl="mae", method="gated+temp", seeds=1, data_dir="data", results_dir="results")
# Flags each mode takes; any other flag given is refused (exit 2 naming it). Config overrides are checked by
# recipes.resolve against the task (e.g. --iters is ADE20K's).
RUNTIME_FLAGS = ("results_dir", "device", "fp32", "no_compile", "print_config")
MODE_FLAGS = {
    "demo": RUNTIME_FLAGS + ("demo", "method") + recipes.DEMO_OVERRIDES,
    "cell": RUNTIME_FLAGS + ("task", "ssl", "method", "sweep", "seeds", "resume", "data_dir", "checkpoint",
                             "trust_pickle", "download", "mirror", "cache_dir", "workers") + tuple(recipes.OVERRIDE_TYPES),
    "table-run": RUNTIME_FLAGS + ("table", "run", "all", "sweep", "seeds", "resume", "data_dir", "checkpoint",
                                  "trust_pickle", "download", "mirror", "cache_dir", "workers") + tuple(recipes.OVERRIDE_TYPES),
    "table": ("table", "all", "results_dir"),
}

# --- 1. arguments ---------------------------------------------------------------------------------


def parse_args(argv):
    """The parsed flags with their defaults filled in; args.given holds the flags the user typed."""
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--task", choices=recipes.TASKS, metavar="TASK",
                      help="FGVC: cub nabirds flowers cars dogs; VTAB-1k: " + " ".join(datasets.VTAB_TASKS) + "; ade20k")
    what.add_argument("--ssl", choices=["mae", "mocov3"], help="self-supervised backbone (default mae)")
    what.add_argument("--method", choices=list(gp.METHODS),
                      help="gated+temp is the paper's method (default); gated = without temperatures; "
                           "gated-hard = Gumbel-sigmoid gates (Table 4); vpt-shallow, vpt-deep, linear = baselines")
    what.add_argument("--demo", action="store_true", help="pipeline demo on generated data (the default with no "
                                                          "--task; --method runs only that method)")
    what.add_argument("--table", choices=["1", "2", "3", "4", "6", "7", "8"], help="print a paper table from stored results")
    what.add_argument("--run", action="store_true", help="with --table: run every missing cell first (one command "
                                                          "for a whole table; overrides, --sweep, --seeds, --workers "
                                                          "apply to every cell)")
    what.add_argument("--all", action="store_true", help="with --table: also list stored runs of other settings")
    what.add_argument("--print-config", action="store_true", help="print the resolved run configuration(s) and exit "
                                                                  "(with --table N: every queued cell; a dry run)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--sweep", action="store_true", help="search the lr grid on the validation split first "
                                                            "(a diverging lr is recorded as failed)")
    proto.add_argument("--seeds", type=int, help="repeat the final run with N seeds, report mean +- std (paper "
                                                 "recipe: seeds 42, 43, ...; --recipe vpt: VPT's 42, 44, 82, 100, 800)")
    proto.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    proto.add_argument("--recipe", choices=recipes.RECIPES, default=None,
                       help="paper (default): Table 5's settings for every method; vpt: VPT's own recipe for the "
                            "VPT baselines (lr x weight-decay search with lr per 256 images; needs --sweep)")
    over = p.add_argument_group("overrides of paper_hparams.yaml (a run that departs from the paper's recipe is "
                                "stored under its own name and never fills a paper cell)")
    for key, kind in recipes.OVERRIDE_TYPES.items():
        if key not in ("arch", "recipe"):
            over.add_argument(recipes.flag(key), type=kind, default=None)
    over.add_argument("--arch", choices=list(gp.ARCHS), default=None, help="backbone size (default vit_base)")
    paths = p.add_argument_group("paths and hardware (never change which result a run is)")
    paths.add_argument("--data-dir", help="holds cub/ (or CUB_200_2011/) nabirds/ flowers/ cars/ "
                                          "dogs/ vtab-1k/ ADEChallengeData2016/ (default ./data)")
    paths.add_argument("--checkpoint", help="backbone file (default: checkpoints/<official file name>)")
    paths.add_argument("--trust-pickle", action="store_true",
                       help="unpickle a backbone file's objects beyond tensors and the safe extras (this runs code "
                            "from the file: only for files you trust)")
    paths.add_argument("--download", action="store_true",
                       help="fetch a missing official checkpoint (verified) and CUB / Flowers / Dogs")
    paths.add_argument("--mirror", default=None, help="base URL replacing the official hosts (or GATED_PROMPT_MIRROR)")
    paths.add_argument("--results-dir", help="one JSON per run is written here (default ./results)")
    paths.add_argument("--cache-dir", default=None, help="decoded images between runs (default <results-dir>/cache)")
    paths.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    paths.add_argument("--fp32", action="store_true", help="disable bf16 autocast (the official code's numerics)")
    paths.add_argument("--no-compile", action="store_true", help="disable torch.compile on CUDA")
    paths.add_argument("--workers", type=int, default=None,
                       help="independent runs (sweep, seeds, --table N --run) in parallel, one per GPU (default: all GPUs)")
    args = p.parse_args(argv)
    args.given = sorted(k for k, v in vars(args).items() if v is not None and v is not False)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def mode_of(args):
    if args.table:
        return "table-run" if args.run or args.print_config else "table"
    return "demo" if args.demo or not args.task else "cell"


def check_flags(args):
    """Refuse, by name, a flag the chosen mode cannot apply, and values no run can take: before any work."""
    mode = mode_of(args)
    if args.run and not args.table:
        raise runtime.UserError("--run goes with --table N")
    what = {"demo": "the demo (generated data, a fixed small model)", "table": "printing a table (add --run to "
            "run its missing cells)", "table-run": f"--table {args.table} --run (the table sets the tasks, "
            "backbones and methods)", "cell": "a single cell"}[mode]
    refused = [k for k in args.given if k not in MODE_FLAGS[mode] and not (mode == "demo" and k in
                                                                            recipes.OVERRIDE_TYPES)]
    if refused:
        verb = "does" if len(refused) == 1 else "do"
        raise runtime.UserError(f"{', '.join(map(recipes.flag, refused))} {verb} not apply to {what}")
    if args.seeds < 1:
        raise runtime.UserError(f"--seeds {args.seeds} is not usable: it must be a whole number >= 1")
    if args.workers is not None and args.workers < 1:
        raise runtime.UserError(f"--workers {args.workers} is not usable: it must be a whole number >= 1")
    if mode == "demo" and args.method not in gp.METHODS:
        raise runtime.UserError(f"--method must be one of {', '.join(gp.METHODS)}")


def settings_from(args):
    return runtime.Settings.for_device(
        runtime.check_device(args.device), fp32=args.fp32, no_compile=args.no_compile, results_dir=args.results_dir,
        data_dir=args.data_dir, cache_dir=args.cache_dir, checkpoint=args.checkpoint, resume=args.resume,
        trust_pickle=args.trust_pickle,
        download=args.download, mirror=args.mirror, workers=args.workers)


def cache_dir(settings):
    return Path(settings.cache_dir or Path(settings.results_dir) / "cache")


def check_writable(*folders):
    """Create each folder and a file in it now: an unwritable results or cache folder is found before training,
    not at the first save after an epoch."""
    for folder in folders:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=runtime.temporary_prefix()):
                pass
        except OSError as e:
            raise runtime.UserError(f"cannot write to {folder} ({e.strerror}): pass a writable --results-dir "
                                    "(and --cache-dir)") from None

# --- 2. configuration -----------------------------------------------------------------------------


def overrides_from(args):
    """The config overrides given on the command line."""
    return {k: getattr(args, k) for k in recipes.OVERRIDE_TYPES if getattr(args, k, None) is not None}


def resolve_config(args):
    return recipes.resolve(args.task or "demo", args.ssl, args.method, **overrides_from(args))


def table_configs(number, args):
    """Every cell of a table with the command line's overrides applied, in the table's order."""
    return [recipes.resolve(**dict(spec, **overrides_from(args))) for spec in results.table_cells(number)]


def demo_configs(args):
    methods = [args.method] if "method" in args.given else recipes.HPARAMS["demo"]["methods"]
    return [recipes.resolve("demo", method=m, **overrides_from(args)) for m in methods]


def planned_configs(args):
    """The configs a command would run, every one resolved and checked (UserError before any work)."""
    mode = mode_of(args)
    cfgs = {"demo": demo_configs, "cell": lambda a: [resolve_config(a)],
            "table-run": lambda a: table_configs(a.table, a), "table": lambda a: []}[mode](args)
    for cfg in cfgs:
        problem = recipes.schedule_problem(cfg)
        if problem:
            raise runtime.UserError(problem)
    if mode == "cell":
        cfg = cfgs[0]
        if cfg.get("recipe") == "vpt" and not args.sweep and (args.lr is None or args.weight_decay is None):
            raise runtime.UserError("--recipe vpt picks lr and weight decay on val: add --sweep (or give --lr and "
                                    "--weight-decay)")
        if args.sweep:
            recipes.sweep_grid(cfg)  # refuses ADE20K before anything runs
    if mode == "table-run" and args.checkpoint:
        backbones = sorted({(c["ssl"], c["arch"]) for c in cfgs})
        if len(backbones) > 1:
            raise runtime.UserError(f"--checkpoint {args.checkpoint} is one backbone file, but Table {args.table} "
                                    f"needs {len(backbones)} ({', '.join(f'{s} {a}' for s, a in backbones)}): leave "
                                    "--checkpoint out (checkpoints/ holds the official files) or run single cells")
    return cfgs

# --- 3. runs --------------------------------------------------------------------------------------


def run_one(cfg, protocol, settings, lr_source="recipe"):
    """One config end to end: its stored result if finished on this backbone, else claim the cell, train and
    evaluate, then write the result. None when another live process holds the cell's claim. A sweep point whose
    loss diverges is recorded as failed (its result has "failed" and no metrics)."""
    files = results.run_files(settings.results_dir, cfg, protocol)
    backbone = None
    if cfg["task"] != "demo":
        checkpoint = inputs.checkpoint_for(cfg, settings)
        settings = dataclasses.replace(settings, checkpoint=str(checkpoint))   # found and verified once per run
        backbone = results.backbone_identity(checkpoint, cache_dir(settings), settings.trust_pickle)
        results.check_backbone_fits(backbone, cfg["ssl"])
    stored = results.stored_result(files, cfg, backbone)
    if stored is not None:
        if runtime.is_main():
            print(f"{files.result} exists; reusing it (delete it to run again)")
        return stored
    claims = runtime.world()[1] == 1   # under torchrun the ranks train one cell together
    holder = results.claim_cell(files) if claims else None
    if holder is not None:
        print(f"{files.result.name}: {holder.get('holder')} (pid {holder.get('pid')}, since {holder.get('started')}) "
              f"is training this cell; skipping it (its claim: {files.claim})")
        return None
    try:
        try:
            if recipes.task_kind(cfg["task"]) == "segmentation":
                body, prompt_state = segmentation.train_segmentation(cfg, settings, files.state)
            else:
                body, prompt_state = classification.run_classification(cfg, protocol, settings)
        except runtime.NonFiniteLoss as e:
            if protocol != "sweep":
                e.state_path = files.state
                raise
            body, prompt_state = {"failed": str(e), "final": {}, "history": []}, None
            print(f"{files.result.name}: {e}; recorded as failed, the sweep goes on")
        except KeyboardInterrupt as e:
            e.state_path = files.state
            raise
        result = results.new_result(cfg, protocol, lr_source, settings, body, runtime.code_version(), backbone)
        if runtime.is_main():
            results.write_result(files, result, prompt_state)
            print(f"wrote {files.result}")
        return result
    finally:
        if claims:
            results.release_cell(files)


def lr_source(args):
    """Where a run's lr comes from (results.is_paper_run also accepts a command-line lr equal to the recipe's)."""
    return "command line" if args.lr is not None else "recipe"


def seeds_of(cfg, n):
    """The seeds of --seeds n: the run's seed, +1, +2, ...; --recipe vpt at its default seed: VPT's final-run
    seeds 42, 44, 82, 100, 800 (the first n; beyond five, 801, 802, ...)."""
    vpt_seeds = recipes.HPARAMS["vpt_recipe"]["seeds"]
    if cfg.get("recipe") == "vpt" and cfg["seed"] == vpt_seeds[0]:
        return list(vpt_seeds[:n]) + [vpt_seeds[-1] + i for i in range(1, n - len(vpt_seeds) + 1)]
    return [cfg["seed"] + i for i in range(n)]


def run_cells(cfgs, args, settings):
    """Cells (one, or a whole table): all sweep runs, then all final runs (--seeds each), through one queue.
    Returns (the cells' configs, their final runs); a cell whose sweep another process is still running is left
    out, and runs held by another process are missing from its list."""
    sources = [lr_source(args)] * len(cfgs)
    if args.sweep:
        grids = [recipes.sweep_grid(c) for c in cfgs]
        jobs = [(dict(c, **point), "sweep", "sweep grid") for c, grid in zip(cfgs, grids) for point in grid]
        done = iter(run_queue(jobs, settings))
        picked = []
        for c, grid in zip(cfgs, grids):
            by_point = [(next(done), point) for point in grid]
            best = pick_sweep_point(c, by_point)
            if best is not None:
                picked.append(dict(c, **best))
        cfgs, sources = picked, ["sweep"] * len(picked)
    jobs = [(dict(c, seed=seed), "final", source) for c, source in zip(cfgs, sources)
            for seed in seeds_of(c, args.seeds)]
    done = run_queue(jobs, settings)
    return cfgs, [[r for r in done[i * args.seeds:(i + 1) * args.seeds] if r is not None] for i in range(len(cfgs))]


def pick_sweep_point(cfg, by_point):
    """The grid point with the best val accuracy (the first, i.e. smallest lr, among ties, as VPT's tuner); failed
    points never win. Prints the sweep's line. None when another process still runs some point."""
    name = f"{cfg['task']}/{cfg['ssl']}/{cfg['method']}"
    if any(r is None for r, _ in by_point):
        print(f"{name}: {sum(r is None for r, _ in by_point)} sweep point(s) are being run by another process; "
              "run this command again when they finish to pick the lr")
        return None
    scored = [(val_score(r), p) for r, p in by_point]
    ok = [(s, p) for s, p in scored if s is not None]
    if not ok:
        raise runtime.UserError(f"{name}: every lr of the sweep diverged (NaN/inf loss); see the failed results "
                                f"under {results.run_name(cfg, 'sweep').rsplit('/', 1)[0]}")
    best = max(ok, key=lambda s: s[0])[1]
    if runtime.is_main():
        print(f"{name} sweep (val acc): " + ", ".join(
            f"{_point_text(p)}: " + (f"{s:.2f}" if s is not None else "failed (diverged)") for s, p in scored)
            + f" -> {_point_text(best)}")
    return best


def _point_text(point):
    return " ".join(f"{k} {v:g}" for k, v in point.items())


def val_score(result):
    """A sweep run's val accuracy; None for a failed point."""
    if result.get("failed"):
        return None
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


# The device of this worker process: set once by _worker_init when the pool starts the process (each worker
# takes one device from the queue), read by every _worker_run the process executes. Only worker processes of
# run_queue's pool set it; the main process never does.
_WORKER_DEVICE = None


def _worker_init(devices):
    global _WORKER_DEVICE
    _WORKER_DEVICE = torch.device(devices.get())
    if _WORKER_DEVICE.type == "cuda":
        torch.cuda.set_device(_WORKER_DEVICE)
    else:
        torch.set_num_threads(1)


def _worker_run(cfg, protocol, settings, source):
    return run_one(cfg, protocol, dataclasses.replace(settings, device=_WORKER_DEVICE), source)


def run_table(cfgs, args, settings):
    """Queue every cell of a table (sweeps first with --sweep), spread over the GPUs. Several processes (machines)
    sharing one results folder split the cells: each claims a cell before training it and skips claimed ones."""
    if runtime.is_main():
        print(f"Table {args.table}: {len(cfgs)} cells x {args.seeds} seed(s)" + (" after lr sweeps" if args.sweep else ""))
    classification_cells = [c for c in cfgs if recipes.task_kind(c["task"]) != "segmentation"]
    if classification_cells:
        run_cells(classification_cells, args, settings)
    segmentation_cells = [c for c in cfgs if c not in classification_cells]
    if segmentation_cells:
        run_cells(segmentation_cells, argparse.Namespace(**dict(vars(args), sweep=False)), settings)

# --- 4. output ------------------------------------------------------------------------------------


def print_summary(cfg, runs):
    """The cell's number(s), mean ± std over seeds, and the paper's number when the run is its exact recipe."""
    if not runs:
        print(f"{cfg['task']} / {cfg['ssl']} / {cfg['method']}: no finished run yet (another process holds it)")
        return
    for metric in [k for k in runs[0]["final"] if k in ("test_acc", "miou_ss", "miou_ms", "val_acc")]:
        mean, std, n = results.summary([r["final"][metric] for r in runs])
        paper = results.paper_value(runs[0], metric)
        differs = "" if results.is_paper_run(runs[0]) else f"   (not the paper's recipe: {results.how_it_differs(runs[0])})"
        print(f"{cfg['task']} / {cfg['ssl']} / {cfg['method']}: {metric} {mean:.2f}"
              + (f" ± {std:.2f} over {n} seeds" if n > 1 else "")
              + (f"   (paper: {paper:.2f})" if paper is not None else differs))


def print_configs(cfgs, args):
    """--print-config: every config a command would run, as JSON (one object, or a list for a table); on stderr,
    what --sweep and --seeds add to each."""
    print(json.dumps(cfgs[0] if len(cfgs) == 1 else cfgs, indent=2))
    if args.sweep:
        for c in cfgs:
            grid = recipes.sweep_grid(c)
            print(f"plan: {c['task']}/{c['ssl']}/{c['method']}: --sweep first runs {len(grid)} grid point(s) "
                  f"({'; '.join(map(_point_text, grid))}) and keeps the best by val accuracy", file=sys.stderr)
    if args.seeds > 1 or args.sweep:
        for c in cfgs:
            print(f"plan: {c['task']}/{c['ssl']}/{c['method']}: final run(s) at seed(s) "
                  f"{', '.join(map(str, seeds_of(c, args.seeds)))}", file=sys.stderr)
    if any(c["method"] in ("vpt-shallow", "vpt-deep") and c.get("recipe") == "paper" for c in cfgs):
        print("note: the VPT baselines run Table 5's batch size and lr of the paper's method (the paper lists "
              "none for them); --recipe vpt --sweep runs VPT's own recipe", file=sys.stderr)


def run_demo(cfgs, args, settings):
    print("PIPELINE DEMO - generated images, a small randomly initialised ViT, CPU-sized. These are NOT the\n"
          "paper's numbers; they show the harness end to end. For a paper cell: --task cub --ssl mocov3.\n")
    if cfgs[0]["warmup_epochs"]:
        print(f"The lr warms up from 0, stepped per epoch as in the official code: epoch 1 trains at lr 0 and epoch "
              f"{cfgs[0]['warmup_epochs'] + 1} is the first at the full lr {cfgs[0]['lr']:g}, where the loss jumps "
              "before it falls.\n")
    settings = dataclasses.replace(settings, results_dir=str(Path(settings.results_dir) / "demo"), compile=False)
    shutil.rmtree(settings.results_dir, ignore_errors=True)  # the demo always runs afresh (flags checked already)
    rows = []
    for cfg in cfgs:
        print(f"--- {cfg['method']}")
        rows.append((cfg["method"], run_one(cfg, "final", settings, lr_source(args))))
    print("\nDEMO RESULTS (generated data; not comparable to the paper)")
    print(f"{'method':<14}{'test acc %':>12}{'train img/s':>14}")
    for method, r in rows:
        print(f"{method:<14}{r['final']['test_acc']:>12.2f}{r['history'][-1]['images_per_second']:>14.0f}")
    ratio = rows[-1][1]["selection_ratio"]
    if ratio:
        print("\nlearned selection ratio r_l (Eq. 11), blocks 1..L-1:")
        print("  " + "  ".join(f"{l + 1}:{r:.2f}" for l, r in enumerate(ratio)))
    print(f"results: {settings.results_dir}")

# --- main -----------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"prepare": prepare_main, "figure": analysis.main, "download": download_main,
                   "predict": serving.main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    args = parse_args(argv)
    check_flags(args)
    cfgs = planned_configs(args)
    mode = mode_of(args)
    if mode == "table":
        return results.print_table(args.table, args.results_dir, show_all=args.all)
    if args.print_config:
        return print_configs(cfgs, args)
    settings = settings_from(args)
    check_writable(settings.results_dir, cache_dir(settings))
    runtime.remove_dead_temporaries(settings.results_dir)
    runtime.remove_dead_temporaries(cache_dir(settings), recursive=False)
    runtime.init_distributed()
    if mode == "table-run":
        run_table(cfgs, args, settings)
        return results.print_table(args.table, args.results_dir, show_all=args.all) if runtime.is_main() else None
    if mode == "demo":
        return run_demo(cfgs, args, settings)
    (cfg,), (runs,) = run_cells(cfgs, args, settings)
    if runtime.is_main():
        print_summary(cfg, runs)


def _is_demo(argv):
    try:
        return mode_of(parse_args(argv)) == "demo"
    except SystemExit:
        return False


def nan_advice(e, argv):
    """The CLI's words for a diverged run (runtime.NonFiniteLoss carries the facts)."""
    if _is_demo(argv):
        return "The demo always starts afresh: run it again with a lower --lr."
    state = getattr(e, "state_path", None)
    if getattr(e, "state_saved", False) and state is not None and Path(state).is_file():
        return (f"The state after the last good epoch is kept at {state}. --resume continues it only with the same "
                "settings (the same lr, so it will likely diverge again); a lower --lr is another run, stored "
                "under another name, and starts from scratch (delete the kept state if you do not need it).")
    return "No state was saved (it diverged in the first epoch): try a lower --lr, or check the data and backbone."


def interrupted_message(e, argv):
    if _is_demo(argv):
        return "interrupted; the demo always starts afresh (run it again)"
    state = getattr(e, "state_path", None)
    again = "python reproduce.py " + shlex.join([a for a in argv if a != "--resume"] + ["--resume"])
    if state is not None and Path(state).is_file():
        return f"interrupted; the state after the last finished epoch is kept at {state}; continue with: {again}"
    if state is not None:
        return "interrupted before the first epoch finished; nothing to resume (run the same command to start over)"
    return f"interrupted; unfinished runs keep their last epoch's state: continue with: {again}"


def prepare_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py prepare",
                                description="Build VPT-sized train/val/test json splits of an FGVC dataset from "
                                            "its official release files (fixed seed 42).")
    p.add_argument("--dataset", required=True, choices=list(datasets.FGVC_DATASETS))
    p.add_argument("--root", help="the dataset folder holding the release files and images (default: found under "
                                  "--data-dir by its release name, e.g. data/CUB_200_2011)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = p.parse_args(argv)
    root = args.root or datasets.dataset_root(args.dataset, args.data_dir)
    print(releases.prepare(args.dataset, root, overwrite=args.overwrite))


def download_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py download",
                                description="Fetch and verify an official backbone checkpoint (SHA-256 recorded in "
                                            "checkpoints/SHA256SUMS), or an FGVC dataset with a stable archive.")
    p.add_argument("--ssl", choices=["mae", "mocov3"], default="mae")
    p.add_argument("--arch", choices=list(gp.ARCHS), default="vit_base")
    p.add_argument("--dataset", choices=list(datasets.FGVC_DATASETS) + ["vtab-1k", "ade20k"],
                   help="fetch a dataset instead (CUB, Flowers, Dogs; the others print where to get them)")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--mirror", default=None, help="base URL replacing the official hosts (or GATED_PROMPT_MIRROR)")
    args = p.parse_args(argv)
    if args.dataset:
        print(releases.fetch_dataset(args.dataset, args.data_dir, mirror=args.mirror))
    else:
        print(downloads.checkpoint_path(args.arch, args.ssl, args.checkpoint_dir, download=True, mirror=args.mirror))


def cli_main(argv=None):
    """main with the command line's exits: 0 done, 2 bad input (one line naming it), 3 diverged, 130 Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (runtime.UserError, datasets.DataError, gp.CheckpointError) as e:
        opt_in = " On this command line: --trust-pickle." if isinstance(e, gp.PickledCodeError) else ""
        print(f"error: {e}.{opt_in}" if opt_in else f"error: {e}", file=sys.stderr)
        return runtime.EXIT_BAD_INPUT
    except runtime.NonFiniteLoss as e:
        print(f"error: {e}. {nan_advice(e, argv)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(interrupted_message(e, argv), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
