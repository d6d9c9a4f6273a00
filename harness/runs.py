"""Runs: what a command runs, one run end to end, a cell's lr sweep and seeds, a whole table, the demo, the queue
of independent runs (one worker process per GPU) and cell claims.

    cfgs = runs.table_configs("4", {"epochs": 1})                  # the cells a command runs, checked before work
    result = runs.run_one(cfg, "final", settings)                  # its stored result, or train, evaluate, write
    cfgs, finals = runs.run_cells(cfgs, settings, sweep=True, seeds=3)   # every sweep run, then every final run
    runs.run_table(cfgs, settings, "4")                            # every cell of a table

A run's files (results.run_files) and backbone file (inputs.checkpoint_for) are worked out once, in run_one, and
passed down; results.write_run writes everything a run leaves. Several processes (machines of a SLURM array)
sharing one results folder split the cells: each claims a cell (results.claim_cell) before training it and skips
claimed ones. reproduce.py parses the command line and calls these; nothing here reads the command line.
"""
import dataclasses
import shutil
from concurrent.futures import as_completed
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


def check_table_checkpoint(cfgs, number, checkpoint):
    """UserError when one backbone file is given for a table that needs several backbones."""
    backbones = sorted({(c.ssl, c.arch) for c in cfgs})
    if checkpoint and len(backbones) > 1:
        raise UserError(f"--checkpoint {checkpoint} is one backbone file, but Table {number} needs "
                        f"{len(backbones)} ({', '.join(f'{s} {a}' for s, a in backbones)}): leave --checkpoint out "
                        "(checkpoints/ holds the official files) or run single cells")


def start(settings):
    """Before the first run: the results and cache folders are writable (found now, not at the first save),
    temporaries of killed processes are removed, and a torchrun process group is joined."""
    runtime.check_writable(settings.results_dir, settings.cache_folder)
    runtime.remove_dead_temporaries(settings.results_dir)
    runtime.remove_dead_temporaries(settings.cache_folder, recursive=False)
    runtime.init_distributed()

# --- one run ------------------------------------------------------------------------------------------


def run_one(cfg, protocol, settings, lr_source="recipe"):
    """One config end to end: its stored result if finished on this backbone, else claim the cell, train and
    evaluate, then write its outputs. None when another live process holds the cell's claim. A sweep point whose
    loss diverges is recorded as failed (its result has "failed" and no metrics)."""
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
        except KeyboardInterrupt as e:
            e.state_path = files.state
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
                       checkpoint=None if checkpoint is None else str(checkpoint))

# --- cells: sweeps, seeds, tables, the demo -----------------------------------------------------------


def run_cells(cfgs, settings, sweep=False, seeds=1, lr_source="recipe"):
    """Cells (one, or a whole table): all sweep runs, then all final runs (`seeds` each), through one queue.
    Returns (the cells' configs, their final runs); a cell whose sweep another process is still running is left
    out, and runs held by another process are missing from its list."""
    sources = [lr_source] * len(cfgs)
    if sweep:
        grids = [config.sweep_grid(c) for c in cfgs]
        jobs = [(c.replace(**point), "sweep", "sweep grid") for c, grid in zip(cfgs, grids) for point in grid]
        done = iter(run_queue(jobs, settings))
        picked = []
        for c, grid in zip(cfgs, grids):
            by_point = [(next(done), point) for point in grid]
            best = pick_sweep_point(c, by_point)
            if best is not None:
                picked.append(c.replace(**best))
        cfgs, sources = picked, ["sweep"] * len(picked)
    jobs = [(c.replace(seed=seed), "final", source) for c, source in zip(cfgs, sources)
            for seed in config.seeds_of(c, seeds)]
    done = run_queue(jobs, settings)
    return cfgs, [[r for r in done[i * seeds:(i + 1) * seeds] if r is not None] for i in range(len(cfgs))]


def pick_sweep_point(cfg, by_point):
    """The grid point with the best val accuracy (the first, i.e. smallest lr, among ties, as VPT's tuner); failed
    points never win. Prints the sweep's line. None when another process still runs some point."""
    name = f"{cfg.task}/{cfg.ssl}/{cfg.method}"
    if any(r is None for r, _ in by_point):
        print(f"{name}: {sum(r is None for r, _ in by_point)} sweep point(s) are being run by another process; "
              "run this command again when they finish to pick the lr")
        return None
    scored = [(val_score(r), p) for r, p in by_point]
    ok = [(s, p) for s, p in scored if s is not None]
    if not ok:
        raise UserError(f"{name}: every lr of the sweep diverged (NaN/inf loss); see the failed results "
                        f"under {results.run_name(cfg, 'sweep').rsplit('/', 1)[0]}")
    best = max(ok, key=lambda s: s[0])[1]
    if runtime.is_main():
        print(f"{name} sweep (val acc): " + ", ".join(
            f"{point_text(p)}: " + (f"{s:.2f}" if s is not None else "failed (diverged)") for s, p in scored)
            + f" -> {point_text(best)}")
    return best


def point_text(point):
    """A sweep grid point as text: "lr 0.5 weight_decay 0.001"."""
    return " ".join(f"{k} {v:g}" for k, v in point.items())


def val_score(result):
    """A sweep run's val accuracy; None for a failed point."""
    if result.get("failed"):
        return None
    return next(v for k, v in result["final"].items() if k.endswith("_acc"))


def run_table(cfgs, settings, number, sweep=False, seeds=1, lr_source="recipe"):
    """Queue every cell of table `number` (sweeps first with `sweep`; ADE20K's fixed recipe has none), spread over
    the GPUs."""
    if runtime.is_main():
        print(f"Table {number}: {len(cfgs)} cells x {seeds} seed(s)" + (" after lr sweeps" if sweep else ""))
    classification_cells = [c for c in cfgs if not isinstance(c, config.SegmentationConfig)]
    if classification_cells:
        run_cells(classification_cells, settings, sweep, seeds, lr_source)
    segmentation_cells = [c for c in cfgs if isinstance(c, config.SegmentationConfig)]
    if segmentation_cells:
        run_cells(segmentation_cells, settings, False, seeds, lr_source)


def run_demo(cfgs, settings, lr_source="recipe"):
    """The demo's runs, always afresh, eager, under <results_dir>/demo. Returns (their results, that folder)."""
    settings = dataclasses.replace(settings, results_dir=str(Path(settings.results_dir) / "demo"), compile=False)
    shutil.rmtree(settings.results_dir, ignore_errors=True)   # the flags were checked before: nothing is lost to a typo
    finished = []
    for cfg in cfgs:
        print(f"--- {cfg.method}")
        finished.append(run_one(cfg, "final", settings, lr_source))
    return finished, settings.results_dir

# --- the queue of independent runs --------------------------------------------------------------------


def run_queue(jobs, settings):
    """Independent runs (config, protocol, lr source), runs of one graph key one after another (their compiled
    graphs are reused). With several workers (default: one per visible
    GPU), that many processes each take one GPU and run one job at a time; results come back in job order either
    way."""
    order = classification.by_graph_key([cfg for cfg, _, _ in jobs])   # runs sharing compiled graphs in a row
    if order != list(range(len(jobs))):
        done = run_queue([jobs[i] for i in order], settings)
        return [done[order.index(i)] for i in range(len(jobs))]
    workers = settings.workers or (torch.cuda.device_count() if settings.device.type == "cuda" else 1)
    if workers <= 1 or len(jobs) <= 1 or runtime.world()[1] > 1:
        return batched.run_jobs(jobs, settings, run_one, pack_of)   # runs of one graph key share batches
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
