"""Runs: what a command runs, one run end to end, a cell's lr sweep and seeds, a whole table, the demo, the queue
of independent runs (one worker process per GPU) and cell claims.

    cfgs = runs.table_configs("4", {"epochs": 1})                  # the cells a command runs, checked before work
    result = runs.run_one(cfg, "final", settings)                  # its stored result, or train, evaluate, write
    cfgs, finals = runs.run_cells(cfgs, settings, sweep=True, seeds=3)   # every sweep run, then every final run
    runs.run_table(cfgs, settings, "4")                            # every cell of a table
    rows = runs.input_rows(cfgs, settings)                         # every checkpoint and dataset they need

A run's files (results.run_files) and backbone file (inputs.checkpoint_for) are worked out once, in run_one, and
passed down; results.write_run writes everything a run leaves. Several processes (SLURM jobs, machines sharing
one results folder) split the cells: each claims a cell (results.claim_cell) before training it and skips claimed
ones; a skipped run's name goes to the `skipped` list the caller passes. A stop signal (runtime.Stopped: SLURM's
SIGTERM, SIGUSR1 or submitit's SIGUSR2) ends a run after its current step with its resumable state on disk and its
claim released. reproduce.py parses the command line and calls these (cluster.py submits them as jobs); nothing
here reads the command line.
"""
import dataclasses
import shutil
from concurrent.futures import as_completed, wait
from pathlib import Path

import torch
from tqdm import tqdm

from harness import batched
from harness import classification
from harness import config
from harness import inputs
from harness import results
from harness import runtime
from harness import segmentation
from harness.data import datasets
from harness.runtime import UserError

# --- what a command runs ------------------------------------------------------------------------------


def demo_configs(methods, overrides):
    """The demo's runs: one per method, with the command line's overrides."""
    return [config.resolve("demo", method=m, **overrides) for m in methods]


def table_configs(number, overrides):
    """Every cell of a paper table with the command line's overrides applied, in the table's order."""
    return [config.resolve(**dict(spec, **overrides)) for spec in results.table_cells(number)]


def check_schedules(cfgs):
    """UserError when a config's lr schedule never leaves the warm-up (before any work)."""
    for cfg in cfgs:
        problem = cfg.schedule_problem()
        if problem:
            raise UserError(problem)


def check_cell(cfg, sweep, lr_and_weight_decay_given):
    """UserError before any work: VPT's recipe without its search, or a sweep of ADE20K's fixed recipe."""
    if cfg.recipe == "vpt" and not sweep and not lr_and_weight_decay_given:
        raise UserError("--recipe vpt picks lr and weight decay on val: add --sweep (or give --lr and "
                        "--weight-decay)")
    if sweep:
        config.sweep_grid(cfg)   # refuses ADE20K


def check_seeds(cfgs, seeds):
    """UserError when a run's seed (the config's, or one --seeds adds to it) is beyond what numpy can seed:
    before the checkpoint is read."""
    for cfg in cfgs:
        last = max(config.seeds_of(cfg, seeds))
        if last >= 2 ** 32:
            given = f"--seed {cfg.seed}" + (f" with --seeds {seeds} (up to {last})" if last != cfg.seed else "")
            raise UserError(f"{given} is not usable: seeds must lie in 0..{2 ** 32 - 1}")


def check_table_checkpoint(cfgs, number, checkpoint):
    """UserError when one backbone file is given for a table that needs several backbones."""
    backbones = sorted({(c.ssl, c.arch) for c in cfgs})
    if checkpoint and len(backbones) > 1:
        raise UserError(f"--checkpoint {checkpoint} is one backbone file, but Table {number} needs "
                        f"{len(backbones)} ({', '.join(f'{s} {a}' for s, a in backbones)}): leave --checkpoint out "
                        "(checkpoints/ holds the official files) or run single cells")


def start(settings):
    """Before the first run: the results and cache folders are writable (found now, not at the first save),
    temporaries of killed processes are removed, stop signals are handled (runtime.handle_stop_signals) and a
    torchrun process group is joined."""
    runtime.check_writable(settings.results_dir, settings.cache_folder)
    runtime.remove_dead_temporaries(settings.results_dir)
    runtime.remove_dead_temporaries(settings.cache_folder, recursive=False)
    runtime.handle_stop_signals()
    runtime.init_distributed()


def input_rows(cfgs, settings, sweep=False):
    """Every input the runs of `cfgs` read (with `sweep`, also the sweep's splits), checked now: one row per
    backbone file and per dataset, a dict with what, path, problem (None when usable), how to get it ("--download"
    where the harness fetches it) and, where a step by hand is needed, its instructions. Checkpoints are verified
    as a run verifies them (downloads.checkpoint_path)."""
    from harness import downloads
    rows = []
    for ssl, arch in sorted({(c.ssl, c.arch) for c in cfgs if not isinstance(c, config.DemoConfig)}):
        row = dict(what=f"checkpoint {ssl} {arch}", problem=None, instructions=None)
        known = downloads.CHECKPOINTS.get((arch, ssl))
        if settings.checkpoint or not known:
            row.update(path=settings.checkpoint or "-", how="--checkpoint FILE")
            if not settings.checkpoint or not Path(settings.checkpoint).is_file():
                row["problem"] = "not found" if settings.checkpoint else f"no official {ssl} {arch} file"
        else:
            path = Path(settings.checkpoint_dir) / known.filename
            row.update(path=str(path), how=f"--download, or {downloads.download_command(arch, ssl, settings.mirror)}")
            try:
                downloads.checkpoint_path(arch, ssl, settings.checkpoint_dir)
            except downloads.DownloadError as e:
                row["problem"] = "not found" if not path.is_file() else "does not verify"
                row["instructions"] = None if not path.is_file() else str(e)
        rows.append(row)
    for task in sorted({c.task for c in cfgs if not isinstance(c, config.DemoConfig)}):
        rows.append(_dataset_row(task, settings, ("final", "sweep") if sweep else ("final",)))
    return rows


def _dataset_row(task, settings, protocols):
    """The input row of one task's dataset: its folder found and the split lists of `protocols` readable."""
    from harness.data import releases
    automatic = task in releases.DATASETS
    row = dict(what=f"dataset {task}", how="--download" if automatic else "by hand (below)", problem=None,
               instructions=None if automatic else releases.dataset_instructions(task, settings.data_dir))
    if task == "ade20k":
        try:
            return dict(row, path=segmentation.ade20k_root(settings.data_dir))
        except UserError:
            return dict(row, path=str(Path(settings.data_dir) / config.TASKS["ade20k"].folders[0]),
                        problem="not found")
    try:
        root = datasets.dataset_root(task, settings.data_dir)
    except datasets.DataError:
        folders = datasets.DATASET_FOLDERS.get(task) or datasets.DATASET_FOLDERS["vtab"]
        return dict(row, path=str(Path(settings.data_dir) / folders[0]), problem="not found")
    splits = {name for protocol in protocols for name in datasets.split_names(task, protocol)}
    if datasets.task_kind(task) == "fgvc":
        splits.add("val")   # the final protocol also tracks the best-val epoch
    try:
        for split in sorted(splits):
            datasets.read_split(task, root, split)
    except (datasets.DataError, OSError) as e:
        return dict(row, path=str(root), problem=str(e).splitlines()[0][:200],
                    instructions=row["instructions"] or str(e))
    return dict(row, path=str(root))

# --- one run ------------------------------------------------------------------------------------------


def run_one(cfg, protocol, settings, lr_source="recipe"):
    """One config end to end: its stored result if finished on this backbone, else claim the cell, train and
    evaluate, then write its outputs. None when another live process holds the cell's claim. A sweep point whose
    loss diverges is recorded as failed (its result has "failed" and no metrics). A stop signal received before
    (or while) it trains raises runtime.Stopped carrying the run's state_path and run name."""
    runtime.check_stop()   # a signal that came after the last step of the run before
    files = results.run_files(settings.results_dir, cfg, protocol)
    checkpoint = inputs.checkpoint_for(cfg, settings)   # found and verified once per run; None for the demo
    backbone = None
    if checkpoint is not None:
        backbone = results.backbone_identity(checkpoint, settings.cache_folder, settings.trust_pickle)
        results.check_backbone_fits(backbone, cfg.ssl)
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
            body, model = train(cfg, protocol, settings, files.state, checkpoint)
        except runtime.NonFiniteLoss as e:
            if protocol != "sweep":
                e.state_path = files.state
                raise
            body, model = {"failed": str(e), "final": {}, "history": []}, None
            print(f"{files.result.name}: {e}; recorded as failed, the sweep goes on")
        except (KeyboardInterrupt, runtime.Stopped) as e:
            e.state_path, e.run = files.state, results.run_name(cfg, protocol)
            raise
        result = results.new_result(cfg, protocol, lr_source, settings, body, runtime.code_version(), backbone)
        if runtime.is_main():
            results.write_run(files, result, None if model is None else model.prompt_state_dict(),
                              pack_of(model, cfg, protocol, settings, body["final"], checkpoint))
            print(f"wrote {files.result}")
        return result
    finally:
        if claims:
            results.release_cell(files)


def train(cfg, protocol, settings, state_path, checkpoint):
    """(result body, trained model) of one config: ADE20K through segmentation.py, the others classification.py."""
    if isinstance(cfg, config.SegmentationConfig):
        return segmentation.train_segmentation(cfg, settings, state_path, checkpoint)
    return classification.run_classification(cfg, protocol, settings, state_path, checkpoint)


def pack_of(model, cfg, protocol, settings, final, checkpoint):
    """(model, info) of the prompt pack a finished classification run leaves beside its result: what a colleague
    needs to use the prompts (class names, the evaluation transform, the backbone file, the config and metrics).
    None for ADE20K (a segmenter, not a classifier) and for a failed run."""
    if model is None or isinstance(cfg, config.SegmentationConfig):
        return None
    demo = isinstance(cfg, config.DemoConfig)
    names = None if demo else inputs.class_names(cfg, settings.data_dir, datasets.split_names(cfg.task, protocol)[0])
    if names is not None and len(names) != model.pcfg.num_classes:
        names = None
    t = cfg.task_info.transform(cfg.img_size)   # gated_prompt's form too: the crop and the shorter side (VTAB: both)
    preprocess = t and {"size": t["crop"], "resize": t["resize"] if t["kind"] == "fgvc" else [t["resize"]] * 2}
    return model, dict(class_names=names, ssl=cfg.ssl, task=cfg.task, recipe=None if demo else cfg.recipe,
                       protocol=protocol, config=cfg.identity(), metrics=final, transform=t, preprocess=preprocess,
                       checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()))

# --- cells: sweeps, seeds, tables, the demo -----------------------------------------------------------


def run_cells(cfgs, settings, sweep=False, seeds=1, lr_source="recipe", skipped=None):
    """Cells (one, or a whole table): all sweep runs, then all final runs (`seeds` each), through one queue.
    Returns (the cells' configs, their final runs); a cell whose sweep another process is still running is left
    out, and runs held by another process are missing from its list (both named in `skipped`)."""
    sources = [lr_source] * len(cfgs)
    if sweep:
        cfgs = picked_configs(cfgs, settings, skipped)
        sources = ["sweep"] * len(cfgs)
    jobs = [(c.replace(seed=seed), "final", source) for c, source in zip(cfgs, sources)
            for seed in config.seeds_of(c, seeds)]
    done = run_queue(jobs, settings, skipped)
    return cfgs, [[r for r in done[i * seeds:(i + 1) * seeds] if r is not None] for i in range(len(cfgs))]


def picked_configs(cfgs, settings, skipped=None):
    """Each cell's config at the grid point its lr sweep picks: every sweep point is run (a stored one reused)
    through one queue, then pick_sweep_point. A cell whose points another process still runs is left out (named
    in `skipped`)."""
    grids = [config.sweep_grid(c) for c in cfgs]
    jobs = [(c.replace(**point), "sweep", "sweep grid") for c, grid in zip(cfgs, grids) for point in grid]
    done = iter(run_queue(jobs, settings, skipped))
    picked = []
    for c, grid in zip(cfgs, grids):
        best = pick_sweep_point(c, [(next(done), point) for point in grid])
        if best is not None:
            picked.append(c.replace(**best))
        elif skipped is not None:
            skipped.append(f"{c.task}/{c.ssl}/{c.method}: its final run(s), after its sweep")
    return picked


def run_swept_final(cfg, seed, settings, skipped=None):
    """The final run at `seed` of a cell swept by picked_configs (what a cluster job of a swept cell runs once its
    sweep points are stored). None when another process still runs a sweep point or holds the run."""
    picked = picked_configs([cfg], settings, skipped)
    return run_queue([(picked[0].replace(seed=seed), "final", "sweep")], settings, skipped)[0] if picked else None


def pick_sweep_point(cfg, by_point):
    """The grid point with the best val accuracy (the first, i.e. smallest lr, among ties, as VPT's tuner); failed
    points never win. Prints the sweep's line. None when another process still runs some point."""
    name = f"{cfg.task}/{cfg.ssl}/{cfg.method}"
    if any(r is None for r, _ in by_point):
        print(f"{name}: {sum(r is None for r, _ in by_point)} sweep point(s) are being run by another process; "
              "run this command again when they finish to pick the lr")
        return None
    scored = [(val_score(r), p) for r, p in by_point]
    best = best_point(scored)
    if best is None:
        raise UserError(f"{name}: every lr of the sweep diverged (NaN/inf loss); see the failed results "
                        f"under {results.run_name(cfg, 'sweep').rsplit('/', 1)[0]}")
    if runtime.is_main():
        print(f"{name} sweep (val acc): " + ", ".join(
            f"{point_text(p)}: " + (f"{s:.2f}" if s is not None else "failed (diverged)") for s, p in scored)
            + f" -> {point_text(best)}")
    return best


def best_point(scored):
    """The point of the best score among (score, point) pairs (the first among ties; None scores never win)."""
    ok = [(score, point) for score, point in scored if score is not None]
    return max(ok, key=lambda s: s[0])[1] if ok else None


def stored_pick(cfg, settings):
    """The grid point the stored sweep of `cfg` picks; None while a point has no stored result or when every point
    failed (nothing is run or printed: what a submission asks before it queues a swept cell's final runs)."""
    scored = []
    for point in config.sweep_grid(cfg):
        files = results.run_files(settings.results_dir, cfg.replace(**point), "sweep")
        if not files.result.is_file():
            return None
        scored.append((val_score(results.read_result(files.result)), point))
    return best_point(scored)


def point_text(point):
    """A sweep grid point as text: "lr 0.5 weight_decay 0.001"."""
    return " ".join(f"{k} {v:g}" for k, v in point.items())


def val_score(result):
    """A sweep run's val accuracy; None for a failed point."""
    if result.get("failed"):
        return None
    return next(v for k, v in result["final"].items() if k.endswith("_acc"))


def run_table(cfgs, settings, number, sweep=False, seeds=1, lr_source="recipe", skipped=None):
    """Queue every cell of table `number` (sweeps first with `sweep`; ADE20K's fixed recipe has none), spread over
    the GPUs; runs not run are named in `skipped`."""
    if runtime.is_main():
        print(f"Table {number}: {len(cfgs)} cells x {seeds} seed(s)" + (" after lr sweeps" if sweep else ""))
    classification_cells = [c for c in cfgs if not isinstance(c, config.SegmentationConfig)]
    if classification_cells:
        run_cells(classification_cells, settings, sweep, seeds, lr_source, skipped)
    segmentation_cells = [c for c in cfgs if isinstance(c, config.SegmentationConfig)]
    if segmentation_cells:
        run_cells(segmentation_cells, settings, False, seeds, lr_source, skipped)


def run_demo(cfgs, settings, lr_source="recipe"):
    """The demo's runs, always afresh, eager, under <results_dir>/demo (the demo task's folder, as run_name
    names it). Returns (their results, that folder)."""
    demo_dir = Path(settings.results_dir) / "demo"
    settings = dataclasses.replace(settings, compile=False)
    shutil.rmtree(demo_dir, ignore_errors=True)   # the flags were checked before: nothing is lost to a typo
    finished = []
    for cfg in cfgs:
        print(f"--- {cfg.method}")
        finished.append(run_one(cfg, "final", settings, lr_source))
    return finished, str(demo_dir)

# --- the queue of independent runs --------------------------------------------------------------------


def run_queue(jobs, settings, skipped=None):
    """Independent runs (config, protocol, lr source), runs of one graph key one after another (their compiled
    graphs are reused) and, on one worker, trained in batches (harness/batched.py). With several workers
    (default: one per visible GPU), that many processes each take one GPU and run one job at a time. Results come
    back in job order either way, None for a run another process holds (its name appended to `skipped`). A stop
    signal stops every worker after its current step and cancels the runs not started."""
    order = classification.by_graph_key([cfg for cfg, _, _ in jobs])   # runs sharing compiled graphs in a row
    if order != list(range(len(jobs))):
        done = run_queue([jobs[i] for i in order], settings, skipped)
        return [done[order.index(i)] for i in range(len(jobs))]
    workers = settings.workers or (torch.cuda.device_count() if settings.device.type == "cuda" else 1)
    if workers <= 1 or len(jobs) <= 1 or runtime.world()[1] > 1:
        done = batched.run_jobs(jobs, settings, run_one, pack_of)   # runs of one graph key share batches
    else:
        done = _run_pool(jobs, settings, workers)
    if skipped is not None:
        skipped += [results.run_name(cfg, protocol) for (cfg, protocol, _), r in zip(jobs, done) if r is None]
    return done


def _run_pool(jobs, settings, workers):
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for i in range(workers):
        devices.put(f"cuda:{i}" if settings.device.type == "cuda" else "cpu")
    quiet = dataclasses.replace(settings, quiet=True)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(devices,)) as pool:
        futures = [pool.submit(_worker_run, cfg, protocol, quiet, source) for cfg, protocol, source in jobs]
        try:
            for _ in tqdm(as_completed(futures), total=len(futures), desc=f"runs on {workers} workers"):
                pass
        except runtime.Stopped as e:   # the workers stop after their current step, the others never start
            pids = list(pool._processes or ())
            pool.shutdown(wait=False, cancel_futures=True)
            for pid in pids:
                os.kill(pid, e.signum)
            wait(futures)
            stopped = [f.exception() for f in futures if not f.cancelled() and isinstance(f.exception(),
                                                                                         runtime.Stopped)]
            raise (stopped[0] if stopped else e) from None   # one that names its run's state
        return [f.result() for f in futures]


# The device of this worker process: set once by _worker_init when the pool starts the process (each worker
# takes one device from the queue), read by every _worker_run the process executes. Only worker processes of
# run_queue's pool set it; the main process never does.
_WORKER_DEVICE = None


def _worker_init(devices):
    global _WORKER_DEVICE
    runtime.handle_stop_signals()
    _WORKER_DEVICE = torch.device(devices.get())
    if _WORKER_DEVICE.type == "cuda":
        torch.cuda.set_device(_WORKER_DEVICE)
    else:
        torch.set_num_threads(1)


def _worker_run(cfg, protocol, settings, source):
    return run_one(cfg, protocol, dataclasses.replace(settings, device=_WORKER_DEVICE), source)
