"""Reproduce Gated Prompt Tuning (Yoo et al., ICML 2023): one paper cell, a sweep, or a whole table.

    python reproduce.py                                   # pipeline demo on generated data (CPU, no downloads)
    python reproduce.py --task cub --ssl mocov3           # one cell of Table 1 with the paper's recipe
    python reproduce.py --task cub --ssl mocov3 --download   # ... fetching the checkpoint and CUB first
    python reproduce.py --task dtd --ssl mae --sweep      # the paper's lr search, then the final run
    python reproduce.py --task cub --ssl dinov2           # a backbone outside the paper (Table 5's MAE values)
    python reproduce.py --task folder --data-dir photos/  # your own images: photos/train/<class>/, photos/val/<class>/
    python reproduce.py --table 1                         # stored results next to the paper's numbers
    python reproduce.py --table 1 --run                   # run every missing cell of Table 1, then print it
    python reproduce.py --table 1 --run --slurm --slurm-partition gpu   # ... as SLURM jobs, one per run
    python reproduce.py download --ssl mae --arch vit_base   # fetch and verify a backbone checkpoint
    python reproduce.py prepare --dataset cub             # VPT-sized splits from the release files
    python reproduce.py figure 4                          # analyses (see `python reproduce.py figure -h`)
    python reproduce.py predict --pack RUN.pack.pt photos/   # top-5 classes per image (see `predict -h`)

The command line only: it parses flags, calls the harness (harness/runs.py: which configs, one run, sweeps,
seeds, tables, the worker queue) and words what comes back -- results, tables, and errors as one line with an
exit code. No module imports this one.
"""
import argparse
import difflib
import json
import shlex
import sys
from pathlib import Path

from harness.figures import analysis
from harness.data import datasets
from harness import downloads
from harness import inputs
import gated_prompt as gp
from harness import serving
from harness import cluster
from harness import config
from harness.data import releases
from harness import results
from harness import runs
from harness import runtime

# Defaults of the flags whose absence a mode must see (a flag a mode cannot apply is refused by name)
DEFAULTS = dict(ssl="mae", method="gated+temp", seeds=1, data_dir="data", results_dir="results")
# Flags each mode takes; any other flag given is refused (exit 2 naming it). Config overrides are checked by
# config.resolve against the task (e.g. --iters is ADE20K's).
RUNTIME_FLAGS = ("results_dir", "device", "fp32", "no_compile", "print_config")
RUN_FLAGS = ("sweep", "seeds", "resume", "data_dir", "checkpoint", "trust_pickle", "download", "mirror", "cache_dir",
             "workers", "no_batching")
SLURM_FLAGS = ("slurm", "slurm_partition", "slurm_gpus", "slurm_cpus", "slurm_time", "slurm_account", "slurm_qos",
               "slurm_array_limit")
NOT_WITH_SLURM = {"workers": "a job trains one run on one GPU", "device": "a job's GPU comes from --slurm-gpus",
                  "resume": "jobs always continue a run's saved state"}
PATH_FLAGS = ("results_dir", "data_dir", "cache_dir", "checkpoint")
MODE_FLAGS = {
    "demo": RUNTIME_FLAGS + ("demo", "method") + config.DemoConfig.flags(),
    "cell": RUNTIME_FLAGS + ("task", "ssl", "method") + RUN_FLAGS + SLURM_FLAGS + tuple(config.OVERRIDE_TYPES),
    "table-run": RUNTIME_FLAGS + ("table", "run", "all") + RUN_FLAGS + SLURM_FLAGS + tuple(config.OVERRIDE_TYPES),
    "table": ("table", "all", "results_dir"),
}

SUBCOMMANDS = ("prepare", "figure", "download", "predict")
FGVC_TASKS = [t.name for t in config.TASKS.values() if t.kind == "fgvc"]

# --- 1. arguments ---------------------------------------------------------------------------------


def parse_args(argv):
    """The parsed flags with their defaults filled in; args.given holds the flags the user typed."""
    p = runtime.ArgumentParser(prog="reproduce.py", description=__doc__,
                                usage="reproduce.py [--task TASK --ssl SSL | --table N [--run] | --demo] [options]\n"
                                      "       reproduce.py {prepare,download,figure,predict} ... (each has -h)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--task", choices=list(config.TASKS) + [config.FOLDER.name], metavar="TASK",
                      help="; ".join(f"{label}: " + " ".join(t.name for t in config.TASKS.values() if t.kind == kind)
                                     for kind, label in (("fgvc", "FGVC"), ("vtab", "VTAB-1k"),
                                                         ("segmentation", "segmentation")))
                      + "; your own images: folder (with --data-dir PATH)")
    what.add_argument("--ssl", choices=list(gp.SSL), help="pretrained backbone (default mae); the paper's: mae, "
                                                          "mocov3; the others run Table 5's "
                                                          f"{config.HPARAMS['beyond_paper']['ssl_column']} values")
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
    proto.add_argument("--recipe", choices=config.RECIPES, default=None,
                       help="paper (default): Table 5's settings for every method; vpt: VPT's own recipe for the "
                            "VPT baselines (lr x weight-decay search with lr per 256 images; needs --sweep)")
    over = p.add_argument_group("overrides of paper_hparams.yaml (a run that departs from the paper's recipe is "
                                "stored under its own name and never fills a paper cell)")
    for key, kind in config.OVERRIDE_TYPES.items():
        if key not in ("arch", "recipe"):
            over.add_argument(config.flag(key), type=kind, default=None)
    over.add_argument("--arch", choices=list(gp.ARCHS), default=None, help="backbone size (default vit_base)")
    paths = p.add_argument_group("paths and hardware (never change which result a run is)")
    paths.add_argument("--data-dir", help="holds cub/ (or CUB_200_2011/) nabirds/ flowers/ cars/ "
                                          "dogs/ vtab-1k/ ADEChallengeData2016/ (default ./data); with --task folder: "
                                          "your image folder, holding train/<class>/ and val/<class>/ (optional "
                                          "test/), or train.csv and val.csv")
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
    paths.add_argument("--no-batching", action="store_true",
                       help="train every run alone, as the official code does (default: the runs of a sweep or "
                            "queue that share a compiled graph and schedule train together in one batch)")
    slurm = p.add_argument_group("cluster: every run as a SLURM job through submitit (pip install submitit)")
    slurm.add_argument("--slurm", nargs="?", const="slurm", choices=["slurm", "local"],
                       help="submit each run (of a cell, --sweep, --seeds or --table N --run) as a SLURM job and "
                            "return; jobs requeue themselves at the time limit and on preemption. --slurm local: "
                            "the same jobs as processes on this machine, waited for. --table N shows their states")
    slurm.add_argument("--slurm-partition", help="the partition (default: the cluster's)")
    slurm.add_argument("--slurm-gpus", type=int, help="GPUs per job: 1 (default) or 0 for CPU-only jobs")
    slurm.add_argument("--slurm-cpus", type=int, help="CPUs per job (default 8)")
    slurm.add_argument("--slurm-time", type=int, help="time limit per job in minutes (default 1440); a run that "
                                                       "needs longer is requeued and continues")
    slurm.add_argument("--slurm-account", help="the account to charge")
    slurm.add_argument("--slurm-qos", help="the quality of service")
    slurm.add_argument("--slurm-array-limit", type=int, help="at most this many jobs at once (SLURM: the job "
                       "array's %%N; local: processes, default one per GPU)")
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
    refused = [k for k in args.given if k not in MODE_FLAGS[mode] and not (mode == "demo" and k in
                                                                            config.OVERRIDE_TYPES)]
    if refused:
        run_hint = " (add --run to run its missing cells)" if set(refused) <= set(MODE_FLAGS["table-run"]) else ""
        what = {"demo": "the demo (generated data, a fixed small model)", "table": "printing a table" + run_hint,
                "table-run": f"--table {args.table} --run (the table sets the tasks, backbones and methods)",
                "cell": "a single cell"}[mode]
        verb = "does" if len(refused) == 1 else "do"
        raise runtime.UserError(f"{', '.join(map(config.flag, refused))} {verb} not apply to {what}")
    if args.seeds < 1:
        raise runtime.UserError(f"--seeds {args.seeds} is not usable: it must be a whole number >= 1")
    if args.workers is not None and args.workers < 1:
        raise runtime.UserError(f"--workers {args.workers} is not usable: it must be a whole number >= 1")
    for key in PATH_FLAGS:
        if getattr(args, key) is not None and not str(getattr(args, key)).strip():
            raise runtime.UserError(f"{config.flag(key)} {getattr(args, key)!r} is empty: give a path")
    check_slurm_flags(args)


def check_slurm_flags(args):
    """--slurm-* only with --slurm; their values; the run flags a job cannot honour."""
    given = [k for k in args.given if k.startswith("slurm_")]
    if given and not args.slurm:
        raise runtime.UserError(f"{', '.join(map(config.flag, given))} {'goes' if len(given) == 1 else 'go'} "
                                "with --slurm")
    if not args.slurm:
        return
    for key, why in NOT_WITH_SLURM.items():
        if key in args.given:
            raise runtime.UserError(f"{config.flag(key)} does not apply to --slurm ({why})")
    limits = {"slurm_gpus": (0, 1, "0 or 1 (a run on several GPUs goes through torchrun)"),
              "slurm_cpus": (1, None, "a whole number >= 1"), "slurm_time": (1, None, "minutes, >= 1"),
              "slurm_array_limit": (1, None, "a whole number >= 1")}
    for key, (low, high, what) in limits.items():
        value = getattr(args, key)
        if value is not None and (value < low or (high is not None and value > high)):
            raise runtime.UserError(f"{config.flag(key)} {value} is not usable: it must be {what}")
    for key in ("slurm_partition", "slurm_account", "slurm_qos"):
        if getattr(args, key) is not None and not getattr(args, key).strip():
            raise runtime.UserError(f"{config.flag(key)} is empty")


def slurm_options(args):
    defaults = cluster.Options()
    return cluster.Options(
        args.slurm, partition=args.slurm_partition, account=args.slurm_account, qos=args.slurm_qos,
        gpus=defaults.gpus if args.slurm_gpus is None else args.slurm_gpus, cpus=args.slurm_cpus or defaults.cpus,
        time_min=args.slurm_time or defaults.time_min, array_limit=args.slurm_array_limit)


def settings_from(args):
    if args.slurm:   # the submitting machine's: paths only (a job picks its node's device, bf16 and compile)
        return runtime.Settings(results_dir=args.results_dir, data_dir=args.data_dir, cache_dir=args.cache_dir,
                                checkpoint=args.checkpoint, trust_pickle=args.trust_pickle, mirror=args.mirror)
    return runtime.Settings.for_device(
        runtime.check_device(args.device), fp32=args.fp32, no_compile=args.no_compile, results_dir=args.results_dir,
        data_dir=args.data_dir, cache_dir=args.cache_dir, checkpoint=args.checkpoint, resume=args.resume,
        trust_pickle=args.trust_pickle, download=args.download, mirror=args.mirror, workers=args.workers,
        runs_per_batch=1 if args.no_batching else None)


def overrides_from(args):
    """The config overrides given on the command line."""
    return {k: getattr(args, k) for k in config.OVERRIDE_TYPES if getattr(args, k, None) is not None}


def lr_source(args):
    """Where a run's lr comes from (results.is_paper_run also accepts a command-line lr equal to the recipe's)."""
    return "command line" if args.lr is not None else "recipe"


def planned_configs(args):
    """The configs a command would run, every one resolved and checked (UserError before any work)."""
    mode = mode_of(args)
    if mode == "demo":
        methods = [args.method] if "method" in args.given else config.HPARAMS["demo"]["methods"]
        cfgs = runs.demo_configs(methods, overrides_from(args))
    elif mode == "cell":
        folder = {}
        if args.task == config.FOLDER.name:
            if "data_dir" not in args.given:
                raise runtime.UserError("--task folder trains on your own images: add --data-dir PATH, the folder "
                                        "holding train/<class>/ and val/<class>/ (or train.csv and val.csv)")
            dataset = inputs.folder_dataset(args.data_dir)
            folder = config.folder_fields(dataset)
            print("\n".join(dataset.describe()), file=sys.stderr if args.print_config else sys.stdout)
        cfgs = [config.resolve(args.task, args.ssl, args.method, **overrides_from(args), **folder)]
        runs.check_cell(cfgs[0], args.sweep, args.lr is not None and args.weight_decay is not None)
    elif mode == "table-run":
        cfgs = runs.table_configs(args.table, overrides_from(args))
        runs.check_table_checkpoint(cfgs, args.table, args.checkpoint)
    else:
        cfgs = []
    runs.check_schedules(cfgs)
    runs.check_seeds(cfgs, args.seeds)
    return cfgs


def check_inputs(cfgs, settings, args):
    """Print the table of every checkpoint and dataset the runs need, fetch what --download can fetch, and stop
    (UserError) when one is missing or unusable: before any run starts or any job is submitted."""
    rows = runs.input_rows(cfgs, settings, args.sweep)
    fetchable = [r for r in rows if r["problem"] == "not found" and r["how"].startswith("--download")]
    if args.download and fetchable:
        for row in fetchable:
            kind, *what = row["what"].split()
            if kind == "checkpoint":
                downloads.checkpoint_path(what[1], what[0], settings.checkpoint_dir, download=True, mirror=args.mirror)
            else:
                releases.fetch_dataset(what[0], settings.data_dir, mirror=args.mirror)
        rows = runs.input_rows(cfgs, settings, args.sweep)
    if not rows:
        return
    width = max(len(r["what"]) for r in rows) + 2
    print(f"inputs of these runs ({len(rows)}):")
    for r in rows:
        print(f"  {'ok' if not r['problem'] else 'MISSING' if r['problem'] == 'not found' else 'BAD':<8}"
              f"{r['what']:<{width}}{r['path']}" + (f"   ({r['problem']}; get it: {r['how']})" if r["problem"]
                                                      else ""))
    missing = [r for r in rows if r["problem"]]
    for r in missing:
        if r["instructions"]:
            print(f"  {r['what']}: {r['instructions']}")
    if missing:
        verb = "submitted" if args.slurm else "run"
        raise runtime.UserError(f"{len(missing)} of the {len(rows)} inputs above "
                                f"{'is' if len(missing) == 1 else 'are'} missing or unusable; nothing was {verb}"
                                + (" (add --download to fetch those marked --download)" if not args.download and
                                   any(r["how"].startswith("--download") for r in missing) else ""))

# --- output ---------------------------------------------------------------------------------------


def print_summary(cfg, finished):
    """The cell's number(s), mean ± std over seeds, and the paper's number when the run is its exact recipe."""
    name = f"{cfg.task} / {cfg.ssl} / {cfg.method}"
    if not finished:
        print(f"{name}: no finished run yet (another process holds it)")
        return
    for metric in [k for k in finished[0]["final"] if k in ("test_acc", "miou_ss", "miou_ms", "val_acc")]:
        mean, std, n = results.summary([r["final"][metric] for r in finished])
        paper = results.paper_value(finished[0], metric)
        differs = results.summary_note(finished[0])
        print(f"{name}: {metric} {mean:.2f}" + (f" ± {std:.2f} over {n} seeds" if n > 1 else "")
              + (f"   (paper: {paper:.2f})" if paper is not None else differs))


def print_pack(finished, results_dir):
    """Where a cell's prompt pack is (its first seed's) and the command that serves it."""
    pack = results.run_files(results_dir, results.config_of(finished[0]), "final").pack if finished else None
    if pack is not None and pack.is_file():
        print(f"prompt pack: {pack}\n  serve it: python reproduce.py predict --pack {shlex.quote(str(pack))} "
              "IMAGES_OR_FOLDERS")


def print_configs(cfgs, args):
    """--print-config: every config a command would run, as JSON (one object, or a list for a table); on stderr,
    what --sweep and --seeds add to each."""
    identities = [c.identity() for c in cfgs]
    print(json.dumps(identities[0] if len(identities) == 1 else identities, indent=2))
    if args.sweep:
        for c in cfgs:
            grid = config.sweep_grid(c)
            print(f"plan: {c.task}/{c.ssl}/{c.method}: --sweep first runs {len(grid)} grid point(s) "
                  f"({'; '.join(map(runs.point_text, grid))}) and keeps the best by val accuracy", file=sys.stderr)
    if args.seeds > 1 or args.sweep:
        for c in cfgs:
            print(f"plan: {c.task}/{c.ssl}/{c.method}: final run(s) at seed(s) "
                  f"{', '.join(map(str, config.seeds_of(c, args.seeds)))}", file=sys.stderr)
    if any(c.method in ("vpt-shallow", "vpt-deep") and c.recipe == "paper" for c in cfgs):
        print("note: the VPT baselines run Table 5's batch size and lr of the paper's method (the paper lists "
              "none for them); --recipe vpt --sweep runs VPT's own recipe", file=sys.stderr)


def print_demo(cfgs, finished, folder):
    print("\nDEMO RESULTS (generated data; not comparable to the paper)")
    print(f"{'method':<14}{'test acc %':>12}{'train img/s':>14}   (img/s: every epoch's images / their seconds)")
    for cfg, r in zip(cfgs, finished):
        seconds = sum(h["seconds"] for h in r["history"])
        rate = sum(h["images_per_second"] * h["seconds"] for h in r["history"]) / seconds
        print(f"{cfg.method:<14}{r['final']['test_acc']:>12.2f}{rate:>14.0f}")
    ratio = finished[-1]["selection_ratio"]
    if ratio:
        print("\nlearned selection ratio r_l (Eq. 11), blocks 1..L-1:")
        print("  " + "  ".join(f"{l + 1}:{r:.2f}" for l, r in enumerate(ratio)))
    print(f"results: {folder}")

# --- main -----------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"prepare": prepare_main, "figure": analysis.main, "download": download_main,
                   "predict": serving.main}
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return subcommands[argv[0]](argv[1:])
    if argv[:1] and not argv[0].startswith("-"):   # the command line takes flags only, then a subcommand
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        raise runtime.UserError(f"unknown command {argv[0]!r}" + (f": did you mean {close[0]!r}?" if close else "")
                                + f" (commands: {', '.join(SUBCOMMANDS)}; a run takes flags: --task, --table, --demo)")
    args = parse_args(argv)
    check_flags(args)
    cfgs = planned_configs(args)
    mode = mode_of(args)
    if mode == "table":
        results.print_table(args.table, args.results_dir, show_all=args.all)
        return cluster.print_states(cfgs or runs.table_configs(args.table, {}), args.results_dir)
    if args.print_config:
        return print_configs(cfgs, args)
    settings = settings_from(args)
    runs.start(settings)
    if mode == "demo":
        print("PIPELINE DEMO - generated images, a small randomly initialised ViT, CPU-sized. These are NOT the\n"
              "paper's numbers; they show the harness end to end. For a paper cell: --task cub --ssl mocov3.\n")
        if cfgs[0].warmup_epochs:
            print(f"The lr warms up from 0, stepped per epoch as in the official code: epoch 1 trains at lr 0 and "
                  f"epoch {cfgs[0].warmup_epochs + 1} is the first at the full lr {cfgs[0].lr:g}, where the loss "
                  "jumps before it falls.\n")
        return print_demo(cfgs, *runs.run_demo(cfgs, settings, lr_source(args)))
    if args.slurm or mode == "table-run":
        check_inputs(cfgs, settings, args)
    if args.slurm:
        code = cluster.submit(cluster.plan(cfgs, args.sweep, args.seeds, lr_source(args)), slurm_options(args),
                              cluster.job_settings(settings, args.fp32, args.no_compile), args.results_dir)
        if mode == "table-run" and args.slurm == "local":
            results.print_table(args.table, args.results_dir, show_all=args.all)
        elif mode == "table-run":
            print(f"states: python reproduce.py --table {args.table} --results-dir {shlex.quote(args.results_dir)}")
        return code
    skipped = []
    if mode == "table-run":
        runs.run_table(cfgs, settings, args.table, args.sweep, args.seeds, lr_source(args), skipped)
        if runtime.is_main():
            results.print_table(args.table, args.results_dir, show_all=args.all)
    else:
        if config.outside_paper(cfgs[0]) and runtime.is_main():
            print(f"note: outside the paper: {config.outside_paper(cfgs[0])}; no paper number to compare with")
        picked, finals = runs.run_cells(cfgs, settings, args.sweep, args.seeds, lr_source(args), skipped)
        if runtime.is_main() and picked:
            print_summary(picked[0], finals[0])
            print_pack(finals[0], args.results_dir)
    if skipped:
        print(f"NOT RUN - {len(skipped)} run(s) held by another process (their claims name it): "
              f"{'; '.join(skipped)}. Run this command again once they finish.")
        return cluster.EXIT_NOT_RUN


def command_of(argv):
    """The subcommand, or the mode (demo, cell, table, table-run) of an argv that main has parsed already."""
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return argv[0]
    try:
        return mode_of(parse_args(argv))
    except SystemExit:
        return None


def _is_demo(argv):
    return command_of(argv) == "demo"


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


def again_command(argv):
    """The command that continues this one: with --resume, except under --slurm (jobs always resume)."""
    slurm = any(a == "--slurm" or a.startswith("--slurm=") for a in argv)
    return "python reproduce.py " + shlex.join([a for a in argv if a != "--resume"] + ([] if slurm else ["--resume"]))


def interrupted_message(e, argv):
    if _is_demo(argv):
        return "interrupted; the demo always starts afresh (run it again)"
    state = getattr(e, "state_path", None)
    again = again_command(argv)
    if getattr(e, "summary", None):
        return f"interrupted: {e.summary}; continue with: {again}"
    if state is not None and Path(state).is_file():
        return f"interrupted; the state after the last finished epoch is kept at {state}; continue with: {again}"
    if state is not None:
        return "interrupted before the first epoch finished; nothing to resume (run the same command to start over)"
    return f"interrupted; unfinished runs keep their last epoch's state: continue with: {again}"


def prepare_main(argv):
    p = runtime.ArgumentParser(prog="reproduce.py prepare",
                                description="Build VPT-sized train/val/test json splits of an FGVC dataset from "
                                            "its official release files (fixed seed 42).")
    p.add_argument("--dataset", required=True, choices=FGVC_TASKS)
    p.add_argument("--root", help="the dataset folder holding the release files and images (default: found under "
                                  "--data-dir by its release name, e.g. data/CUB_200_2011)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = p.parse_args(argv)
    root = args.root or datasets.dataset_root(args.dataset, args.data_dir)
    print(releases.prepare(args.dataset, root, overwrite=args.overwrite))


def download_main(argv):
    p = runtime.ArgumentParser(prog="reproduce.py download",
                                description="Fetch and verify an official backbone checkpoint (SHA-256 recorded in "
                                            "checkpoints/SHA256SUMS), or an FGVC dataset with a stable archive.")
    p.add_argument("--ssl", choices=list(gp.SSL), default="mae")
    p.add_argument("--arch", choices=list(gp.ARCHS), default="vit_base")
    p.add_argument("--dataset", choices=FGVC_TASKS + ["vtab-1k", "ade20k"],
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
    """main with the command line's exits:
      0 done (with --slurm: submitted)       1 a --slurm local job failed (its log named)
      2 bad input (one line naming it)       3 diverged (NaN / inf loss)
      4 a run not run: another live process holds it (or runs its cell's sweep); run the command again later
      75 stopped by SIGTERM / SIGUSR1 / SIGUSR2 after a finished step, its state saved (run it again to continue)
      130 Ctrl-C"""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except runtime.MainRankFailed:   # torchrun: rank 0 has printed the reason
        return runtime.EXIT_BAD_INPUT
    except (runtime.UserError, datasets.DataError, gp.CheckpointError) as e:
        advice = ""
        if isinstance(e, gp.PickledCodeError):   # name the opt-in only where this command line takes it
            advice = (". On this command line: --trust-pickle." if command_of(argv) in ("cell", "table-run", "predict") else
                      f". `reproduce.py {' '.join(argv[:1])}` has no --trust-pickle: give it a file of tensors only")
        print(f"error: {e}{advice}", file=sys.stderr)
        return runtime.EXIT_BAD_INPUT
    except runtime.NonFiniteLoss as e:
        print(f"error: {e}. {nan_advice(e, argv)}", file=sys.stderr)
        return 3
    except runtime.Stopped as e:
        then = "the demo always starts afresh (run it again)" if _is_demo(argv) else \
            f"continue with: {again_command(argv)}"
        print(cluster.stopped_line(e, then), file=sys.stderr)
        return cluster.EXIT_STOPPED
    except KeyboardInterrupt as e:
        print(interrupted_message(e, argv), file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0   # predict returns its rows


if __name__ == "__main__":
    sys.exit(cli_main())
