"""Reproduce Gated Prompt Tuning (Yoo et al., ICML 2023): one paper cell, a sweep, or a whole table.

    python reproduce.py                                   # pipeline demo on generated data (CPU, no downloads)
    python reproduce.py --task cub --ssl mocov3           # one cell of Table 1 with the paper's recipe
    python reproduce.py --task dtd --ssl mae --sweep      # the paper's lr search, then the final run
    python reproduce.py --table 1                         # stored results next to the paper's numbers
    python reproduce.py prepare --dataset cub --root data/cub   # VPT-sized splits from the release files
    python reproduce.py figure 4                          # analyses (see `python reproduce.py figure -h`)

Reads top to bottom: arguments -> config (paper_hparams.yaml) -> data -> model -> train -> evaluate ->
result file -> table.
"""
import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import analysis
import data
import gated_prompt as gp
import runtime

HERE = Path(__file__).resolve().parent
HPARAMS = yaml.safe_load((HERE / "paper_hparams.yaml").read_text())

CHECKPOINTS = {  # (arch, ssl): (file name, where to download it)
    ("vit_base", "mae"): ("mae_pretrain_vit_base.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"),
    ("vit_large", "mae"): ("mae_pretrain_vit_large.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"),
    ("vit_huge", "mae"): ("mae_pretrain_vit_huge.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"),
    ("vit_base", "mocov3"): ("linear-vit-b-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"),
    ("vit_small", "mocov3"): ("linear-vit-s-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar"),
}
TASKS = list(data.FGVC_DATASETS) + list(data.VTAB_TASKS) + ["ade20k"]
FGVC_COLUMNS = ["cub", "flowers", "cars", "dogs", "nabirds"]  # the paper's column order (Tables 1, 7)
# --- 1. arguments ---------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--task", choices=TASKS, metavar="TASK",
                      help="FGVC: cub nabirds flowers cars dogs; VTAB-1k: " + " ".join(data.VTAB_TASKS) + "; ade20k")
    what.add_argument("--ssl", choices=["mae", "mocov3"], default="mae", help="self-supervised backbone (default mae)")
    what.add_argument("--method", choices=list(gp.METHODS), default="gated+temp",
                      help="gated+temp is the paper's method (default); gated = without temperatures; "
                           "gated-hard = Gumbel-sigmoid gates (Table 4); vpt-shallow, vpt-deep, linear = baselines")
    what.add_argument("--demo", action="store_true", help="pipeline demo on generated data (the default with no --task)")
    what.add_argument("--table", choices=["1", "2", "3", "4", "6", "7", "8"], help="print a paper table from stored results")
    what.add_argument("--run", action="store_true", help="with --table: run every missing cell first (one command "
                                                          "for a whole table; add --sweep, --seeds, --workers)")
    what.add_argument("--print-config", action="store_true", help="print the resolved run configuration and exit")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--sweep", action="store_true", help="search the paper's lr grid on the validation split first")
    proto.add_argument("--seeds", type=int, default=1, help="repeat the final run with N seeds, report mean +- std")
    proto.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    proto.add_argument("--workers", type=int, default=None,
                       help="independent runs (sweep, seeds, --run-table) in parallel, one per GPU (default: all GPUs)")
    over = p.add_argument_group("overrides of paper_hparams.yaml")
    for flag, kind in (("--lr", float), ("--num-prompts", int), ("--gate-init", float), ("--batch-size", int),
                       ("--epochs", int), ("--warmup-epochs", int), ("--insert-at", int), ("--seed", int),
                       ("--prompt-dropout", float), ("--iters", int)):
        over.add_argument(flag, type=kind, default=None)
    over.add_argument("--arch", choices=list(gp.ARCHS), default=None, help="backbone size (default vit_base)")
    paths = p.add_argument_group("paths and hardware")
    paths.add_argument("--data-dir", default="data", help="holds cub/ nabirds/ flowers/ cars/ dogs/ vtab-1k/ "
                                                          "ADEChallengeData2016/ (default ./data)")
    paths.add_argument("--checkpoint", help="backbone file (default: checkpoints/<official file name>)")
    paths.add_argument("--results-dir", default="results", help="one JSON per run is written here")
    paths.add_argument("--cache-dir", default=None, help="keep decoded images here between runs (default: <results-dir>/cache)")
    paths.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    paths.add_argument("--fp32", action="store_true", help="disable bf16 autocast (the official code's numerics)")
    paths.add_argument("--no-compile", action="store_true", help="disable torch.compile on CUDA")
    return p.parse_args(argv)

# --- 2. configuration -----------------------------------------------------------------------------


def resolve_config(args, device=None):
    """recipe -> Table 5 row -> method defaults -> command line. bf16 autocast on CUDA unless --fp32."""
    recipe = HPARAMS["recipe"]
    batch_size, num_prompts, lr, gate_init = HPARAMS["table5"][args.task][args.ssl]
    cfg = dict(task=args.task, ssl=args.ssl, method=args.method, arch=recipe["arch"], batch_size=batch_size,
               num_prompts=num_prompts, lr=lr, gate_init=gate_init, epochs=recipe["epochs"],
               warmup_epochs=recipe["warmup_epochs"], weight_decay=recipe["weight_decay"],
               momentum=recipe["momentum"], prompt_dropout=recipe["prompt_dropout"], seed=recipe["seed"],
               insert_at=recipe["insert_at"], lr_grid=recipe["lr_grid"])
    cfg.update(HPARAMS["methods"][args.method])
    if args.task == "ade20k":
        cfg.update(HPARAMS["segmentation"])
    for key in ("lr", "num_prompts", "gate_init", "batch_size", "epochs", "warmup_epochs", "insert_at", "seed",
                "prompt_dropout", "iters", "arch"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    cfg["bf16"] = not args.fp32 and (device is None or device.type == "cuda")
    cfg["compile"] = not args.no_compile
    return cfg


def checkpoint_path(cfg, args):
    """The backbone file: --checkpoint, else checkpoints/<official name>; a clear error if absent."""
    name, url = CHECKPOINTS.get((cfg["arch"], cfg["ssl"]), (None, None))
    path = Path(args.checkpoint) if args.checkpoint else HERE / "checkpoints" / (name or "")
    if name is None and not args.checkpoint:
        raise runtime.UserError(f"no official {cfg['ssl']} checkpoint for {cfg['arch']}; pass --checkpoint FILE")
    if not path.is_file():
        raise runtime.UserError(f"backbone checkpoint not found: {path}\n  download: {url or '(your file)'}\n"
                                f"  e.g. mkdir -p checkpoints && wget -P checkpoints {url}")
    return path

# --- 3. data --------------------------------------------------------------------------------------


def data_root(task, data_dir):
    if data.task_kind(task) == "fgvc":
        return Path(data_dir) / task
    return Path(data_dir) / "vtab-1k"


def load_splits(cfg, data_dir, cache_dir, protocol):
    """(train split, {eval name: split}). FGVC final also tracks val for the best-val-epoch number."""
    if cfg["task"] == "demo":
        return demo_splits(cfg)
    train_name, eval_name = data.split_names(cfg["task"], protocol)
    root = data_root(cfg["task"], data_dir)
    names = [train_name, eval_name] + (["val"] if data.task_kind(cfg["task"]) == "fgvc" and protocol == "final" else [])
    with runtime.main_first():  # rank 0 decodes into the cache, the other ranks then read it
        splits = {name: data.load_split(cfg["task"], root, name, cache_dir=cache_dir) for name in names}
    return splits.pop(train_name), splits


def fits_on_gpu(splits, device, fraction=0.3):
    """Keep the uint8 images in GPU memory when they take under `fraction` of what is free (else host)."""
    if device.type != "cuda":
        return False
    return sum(s.images.numel() for s in splits) < fraction * torch.cuda.mem_get_info(device)[0]


def make_loaders(cfg, train, evals, device):
    """Batches come from the uint8 arrays: crop/flip and normalisation run on `device`, no JPEG decoding."""
    rank, world_size = runtime.world()
    augment = cfg["task"] == "demo" or data.task_kind(cfg["task"]) == "fgvc"  # random crop + flip
    crop = cfg.get("img_size", data.IMAGE_SIZE)
    on_gpu = fits_on_gpu([train, *evals.values()], device)
    if runtime.is_main() and device.type == "cuda":
        print(f"images kept in {'GPU' if on_gpu else 'host'} memory as uint8")
    train_loader = data.BatchLoader(train.images, train.labels, cfg["batch_size"] // world_size, train=True,
                                    augment=augment, crop_size=crop, seed=cfg["seed"], rank=rank,
                                    world_size=world_size, device=device, images_on_device=on_gpu)
    eval_loaders = {name: data.BatchLoader(s.images, s.labels, max(256, cfg["batch_size"]), train=False,
                                           crop_size=crop, rank=rank, world_size=world_size, device=device,
                                           images_on_device=on_gpu)
                    for name, s in evals.items()}
    return train_loader, eval_loaders

# --- 4. model -------------------------------------------------------------------------------------


def build_model(cfg, checkpoint, num_classes):
    vit_cfg = gp.vit_config(cfg["arch"], cfg["ssl"], img_size=cfg.get("img_size", 224), **cfg.get("arch_overrides", {}))
    prompt_cfg = gp.prompt_config(cfg["method"], num_classes=num_classes, num_prompts=cfg["num_prompts"],
                                  gate_init=cfg["gate_init"], insert_at=cfg["insert_at"],
                                  prompt_dropout=cfg["prompt_dropout"])
    model = gp.VisionTransformer(vit_cfg, prompt_cfg)
    if checkpoint is not None:
        if runtime.is_main():
            print(gp.load_backbone(model, checkpoint))
        else:
            gp.load_backbone(model, checkpoint)
    return model

# --- 5. train -------------------------------------------------------------------------------------


def prompt_snapshot(model):
    """A CPU copy of everything training changes (to restore the best-val epoch's prompts)."""
    return {k: v.detach().cpu().clone() for k, v in model.prompt_state_dict().items()}


def as_stored(cfg):
    """cfg as it reads back from a result or state file (tuples become lists), for comparisons."""
    return json.loads(json.dumps(cfg))


def lr_factor(epoch, warmup_epochs, epochs):
    """Linear warm-up from 0, then cosine to 0; stepped per epoch (the official schedule)."""
    if epoch < warmup_epochs:
        return epoch / max(1, warmup_epochs)
    progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, loader, device, bf16):
    """Top-1 accuracy (%) over the whole split, exact across data-parallel ranks."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in loader:
        with runtime.autocast(device, bf16):
            logits = model(images)
        correct += (logits.argmax(-1) == labels).sum()
        count += labels.numel()
    runtime.all_reduce_sum(correct), runtime.all_reduce_sum(count)
    return 100.0 * correct.item() / max(1, count.item())


def train(cfg, model, train_loader, eval_loaders, device, state_path, resume=False, log_every=25, quiet=False):
    """The paper's recipe. Saves a resumable state after every epoch. Returns (history, final metrics)."""
    model.to(device)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, cfg["warmup_epochs"], cfg["epochs"]))
    step, forward = runtime.make_train_step(model, optimizer, device, cfg["bf16"],
                                            compile=cfg["compile"] and device.type == "cuda")
    history, start_epoch, best = [], 0, {"val_acc": -1.0, "epoch": None, "state": None}
    if resume and Path(state_path).is_file():
        state = runtime.load_training_state(state_path, model, optimizer, scheduler)
        if state["extra"].get("config") != as_stored(cfg):
            raise runtime.UserError(f"{state_path} was written by a run with other settings; delete it to start over")
        history, start_epoch, best = state["history"], state["step"] + 1, state["extra"]["best"]
        if runtime.is_main():
            print(f"resumed from {state_path} after epoch {start_epoch}")
    elif resume and runtime.is_main():
        print(f"--resume: no saved state at {state_path}; starting from scratch")
    elif Path(state_path).is_file() and runtime.is_main():
        print(f"{state_path} holds an interrupted run; starting over (pass --resume to continue it)")
    track_val = "val" in eval_loaders and len(eval_loaders) > 1  # FGVC final: best-val-epoch alongside
    for epoch in range(start_epoch, cfg["epochs"]):
        record = train_epoch(step, model, train_loader, epoch, cfg, device, quiet, log_every)
        record["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if track_val:
            record["val_acc"] = evaluate(forward, eval_loaders["val"], device, cfg["bf16"])
            if record["val_acc"] > best["val_acc"]:
                best = {"val_acc": record["val_acc"], "epoch": epoch + 1,
                        "state": prompt_snapshot(model)}
        history.append(record)
        if runtime.is_main():
            runtime.save_training_state(state_path, model, optimizer, scheduler, epoch, history,
                                        {"best": best, "config": as_stored(cfg)})
            if not quiet:
                tqdm.write(f"epoch {epoch + 1:3d}  loss {record['loss']:.4f}  train {record['train_acc']:.2f}  " +
                           (f"val {record['val_acc']:.2f}  " if track_val else "") +
                           f"{record['images_per_second']:.0f} img/s")
    return history, final_metrics(model, forward, eval_loaders, best, device, cfg["bf16"])


def train_epoch(step, model, loader, epoch, cfg, device, quiet, log_every):
    """One pass over the training split; the only host syncs are every `log_every` steps and at the end."""
    model.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), dtype=torch.long, device=device)
    seen, tic = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
               disable=True if quiet or not runtime.is_main() else None)
    for i, (images, labels) in enumerate(bar):
        loss, correct = step(images, labels)
        loss_sum += loss * labels.numel()
        correct_sum += correct
        seen += labels.numel()
        if (i + 1) % log_every == 0:
            runtime.check_finite(loss, f"epoch {epoch + 1}, step {i + 1}")
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct_sum.item() / seen:.1f}",
                            img_s=f"{seen / (time.perf_counter() - tic):.0f}")
    world_size = runtime.world()[1]
    loss = runtime.all_reduce_sum(loss_sum / max(1, seen)).item() / world_size
    runtime.check_finite(torch.tensor(loss), f"epoch {epoch + 1}")
    seconds = time.perf_counter() - tic
    return {"epoch": epoch + 1, "loss": loss,
            "train_acc": 100.0 * runtime.all_reduce_sum(correct_sum).item() / max(1, seen * world_size),
            "seconds": seconds, "images_per_second": seen * world_size / seconds}


def final_metrics(model, forward, eval_loaders, best, device, bf16):
    """The protocol's split at the final epoch; FGVC also the test accuracy of the best-val epoch's prompts.
    `forward` is the model as trained (compiled on CUDA)."""
    track_val = "val" in eval_loaders and len(eval_loaders) > 1
    final = {f"{name}_acc": evaluate(forward, loader, device, bf16)
             for name, loader in eval_loaders.items() if name != "val" or not track_val}
    if track_val and best["state"] is not None:
        final_state = prompt_snapshot(model)
        model.load_state_dict(best["state"], strict=False)
        final["best_val_epoch"], final["best_val_acc"] = best["epoch"], best["val_acc"]
        final["test_acc_at_best_val"] = evaluate(forward, eval_loaders["test"], device, bf16)
        model.load_state_dict(final_state, strict=False)
    return final


# --- 6. one run, end to end -----------------------------------------------------------------------


def run_name(cfg, protocol):
    lr = f"{cfg['lr']:g}"
    return (f"{cfg['task']}/{cfg['ssl']}/{cfg['arch']}-{cfg['method']}-p{cfg['num_prompts']}-k{cfg['insert_at']}"
            f"-lr{lr}-s{cfg['seed']}-{protocol}")


def learned_gate_summary(model):
    out = {"gates": None, "selection_ratio": None, "temperatures": None}
    if model.gate_logits is not None:
        model.eval()
        out["gates"] = model.gates().tolist()
        out["selection_ratio"] = model.selection_ratio().tolist()
    if model.temperatures is not None:
        out["temperatures"] = model.temperatures.detach().cpu().tolist()
    return out


def run_one(cfg, protocol, args, device):
    """Train and evaluate one configuration; returns the result dict (also written to the results dir)."""
    name = run_name(cfg, protocol)
    result_path = Path(args.results_dir) / f"{name}.json"
    if result_path.is_file():
        stored = json.loads(result_path.read_text())
        current = as_stored(cfg)
        changed = {k for k in set(stored["config"]) | set(current) if stored["config"].get(k) != current.get(k)}
        if changed:
            raise runtime.UserError(f"{result_path} holds a run with other settings ({', '.join(sorted(changed))}); "
                                    "delete it or pass another --results-dir")
        if runtime.is_main():
            print(f"{result_path} exists; reusing it (delete it to run again)")
        return stored
    if cfg["task"] == "ade20k":
        return run_segmentation(cfg, name, result_path, args)
    tic = time.time()
    checkpoint = checkpoint_path(cfg, args) if cfg["task"] != "demo" else None  # fail before decoding data
    cache_dir = args.cache_dir or Path(args.results_dir) / "cache"
    train_split, eval_splits = load_splits(cfg, args.data_dir, cache_dir, protocol)
    num_classes = cfg.get("num_classes") or data.num_classes(cfg["task"])
    runtime.seed_everything(cfg["seed"])
    model = build_model(cfg, checkpoint, num_classes)
    train_loader, eval_loaders = make_loaders(cfg, train_split, eval_splits, device)
    state_path = Path(args.results_dir) / f"{name}.state.pt"
    history, final = train(cfg, model, train_loader, eval_loaders, device, state_path, resume=args.resume,
                           quiet=getattr(args, "quiet", False))
    result = {"config": cfg, "protocol": protocol, "code_version": runtime.code_version(),
              "device": runtime.device_name(device), "world_size": runtime.world()[1],
              "history": history, "final": final, **learned_gate_summary(model),
              "wall_seconds": time.time() - tic}
    if runtime.is_main():
        result_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.prompt_state_dict(), Path(args.results_dir) / f"{name}.prompts.pt")
        runtime.write_json(result_path, result)
        state_path.unlink(missing_ok=True)
        print(f"wrote {result_path}")
    return result


def run_segmentation(cfg, name, result_path, args):
    """ADE20K with SETR-PUP (segmentation.py); the summary goes where the tables look for it."""
    import segmentation
    checkpoint = checkpoint_path(cfg, args)
    seg = segmentation.train_segmentation(cfg, args.data_dir, checkpoint, Path(args.results_dir) / name,
                                          resume=args.resume, progress=not getattr(args, "quiet", False))
    result = {"config": cfg, "protocol": "final", "code_version": seg["code_version"], "device": seg["device"],
              "world_size": seg["world_size"], "history": seg["history"],
              "final": {k: seg[k] for k in ("miou_ss", "miou_ms", "aacc_ss", "aacc_ms")},
              "gates": seg["gates"], "selection_ratio": seg["selection_ratio"], "temperatures": seg["temperatures"],
              "details": str(Path(args.results_dir) / name / "result.json")}
    if runtime.is_main():
        runtime.write_json(result_path, result)
    return result


def run_task(cfg, args, device):
    """--sweep: lr grid on train -> val (last epoch), pick the best; then --seeds final runs."""
    (cfg,), (results,) = run_cells([cfg], args, device)
    return cfg, results


def run_cells(cfgs, args, device):
    """Several cells at once (a whole table): all sweep runs, then all final runs, through one queue."""
    if args.sweep:
        jobs = [(dict(c, lr=lr), "sweep") for c in cfgs for lr in c["lr_grid"]]
        results = iter(run_queue(jobs, args, device))
        picked = []
        for c in cfgs:
            scores = {lr: val_score(next(results)) for lr in c["lr_grid"]}
            picked.append(dict(c, lr=max(scores, key=scores.get)))
            if runtime.is_main():
                print(f"{c['task']}/{c['ssl']}/{c['method']} lr sweep (val acc): " +
                      ", ".join(f"{lr:g}: {acc:.2f}" for lr, acc in scores.items()) + f" -> lr {picked[-1]['lr']:g}")
        cfgs = picked
    jobs = [(dict(c, seed=c["seed"] + i), "final") for c in cfgs for i in range(args.seeds)]
    results = run_queue(jobs, args, device)
    return cfgs, [results[i * args.seeds:(i + 1) * args.seeds] for i in range(len(cfgs))]


def val_score(result):
    return next(v for k, v in result["final"].items() if k.endswith("_acc"))


def run_queue(jobs, args, device):
    """Independent runs, in order. With --workers N > 1 (default: one per visible GPU), N processes each
    take one GPU and run one job at a time; results come back in job order either way."""
    workers = getattr(args, "workers", None) or (torch.cuda.device_count() if device.type == "cuda" else 1)
    if workers <= 1 or len(jobs) <= 1 or runtime.world()[1] > 1:
        results = []
        for i, (cfg, protocol) in enumerate(jobs):
            if len(jobs) > 1 and runtime.is_main():
                print(f"=== run {i + 1}/{len(jobs)}: {run_name(cfg, protocol)}")
            results.append(run_one(cfg, protocol, args, device))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for i in range(workers):
        devices.put(f"cuda:{i}" if device.type == "cuda" else "cpu")
    quiet = argparse.Namespace(**dict(vars(args), quiet=True))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(devices,)) as pool:
        futures = [pool.submit(_worker_run, cfg, protocol, quiet) for cfg, protocol in jobs]
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


def _worker_run(cfg, protocol, args):
    return run_one(cfg, protocol, args, _WORKER_DEVICE)

# --- 7. tables ------------------------------------------------------------------------------------


def load_results(results_dir):
    """The final-protocol run files (analysis.load_runs reads them for the figures too)."""
    return analysis.load_runs(results_dir) if Path(results_dir).is_dir() else []


def cell(results, metric="test_acc", **match):
    """mean, std, n over the seeds of the newest lr that matches; None if no run matches."""
    runs = [r for r in results if analysis.final_metric(r, metric) is not None
            and all(r["config"].get(k) == v for k, v in match.items())]
    if not runs:
        return None
    values = torch.tensor([analysis.final_metric(r, metric) for r in analysis.newest_lr_runs(runs)],
                          dtype=torch.float64)
    std = values.std().item() if len(values) > 1 else 0.0
    return values.mean().item(), std, len(values)


def fmt(value, paper=None):
    ours = "-" if value is None else (f"{value[0]:.2f}" + (f"±{value[1]:.2f}" if value[2] > 1 else ""))
    return ours if paper is None else f"{ours} ({paper:.2f})"


def default_prompts(task, ssl, method, arch="vit_base", total=None):
    """Prompt count per run as the paper states it (VPT-deep: per block)."""
    depth = gp.ARCHS[arch][2]
    if total is not None:
        return total // depth if method == "vpt-deep" else total
    return HPARAMS["methods"][method].get("num_prompts", HPARAMS["table5"][task][ssl][1])


def mean_cell(values):
    values = [v for v in values if v is not None]
    return (sum(v[0] for v in values) / len(values), 0.0, 1) if values else None


def print_table(number, results_dir):
    results = load_results(results_dir)
    paper = HPARAMS["paper"]
    methods = ["vpt-shallow", "vpt-deep", "gated+temp"]
    fgvc = FGVC_COLUMNS
    if number in ("1", "7"):
        blocks = ([("mae", None), ("mocov3", None)] if number == "1" else [("mae", t) for t in (24, 48, 96)])
        for ssl, total in blocks:
            rows = []
            for method in (methods if number == "1" else ["vpt-deep", "gated+temp"]):
                matches = [dict(task=t, ssl=ssl, method=method, arch="vit_base", insert_at=1,
                                num_prompts=default_prompts(t, ssl, method, total=total)) for t in fgvc]
                ref = paper["table1"][ssl][method] if number == "1" else paper["table7"][total][method]
                values = [cell(results, **m) for m in matches]
                label = method + (f" ({total} prompts)" if total else "")
                rows.append((label, values + [mean_cell(values) if all(values) else None],
                             [ref[t] for t in fgvc] + [ref["mean"]]))
            _print_value_rows(f"Table {number} - FGVC, {ssl}, ViT-B/16, top-1 test accuracy (%)", fgvc + ["mean"], rows)
    elif number == "2":
        groups = {g: [t for t, info in data.VTAB_TASKS.items() if info.group == g] for g in ("natural", "specialized", "structured")}
        for ssl in ("mae", "mocov3"):
            rows, done_tasks = [], []
            for method in methods:
                per_task = {t: cell(results, task=t, ssl=ssl, method=method, arch="vit_base", insert_at=1,
                                    num_prompts=default_prompts(t, ssl, method)) for t in data.VTAB_TASKS}
                means = {g: mean_cell([per_task[t] for t in ts]) if all(per_task[t] for t in ts) else None
                         for g, ts in groups.items()}
                done = all(per_task.values())
                means["mean"] = mean_cell(list(means.values())) if done else None            # mean of group means
                means["19-task mean"] = mean_cell(list(per_task.values())) if done else None  # plain mean
                ref = paper["table2"][ssl][method]
                runs = sum(v is not None for v in per_task.values())
                rows.append((f"{method} [{runs}/19 tasks]", [means[c] for c in means], [ref.get(c) for c in means]))
                done_tasks.append((method, per_task))
            _print_value_rows(f"Table 2 - VTAB-1k, {ssl}, group means of top-1 test accuracy (%)",
                              ["natural", "specialized", "structured", "mean", "19-task mean"], rows)
            for method, per_task in done_tasks:  # the paper gives group means only; per task, ours
                if any(per_task.values()):
                    print(f"  {method} per task: " + ", ".join(f"{t} {fmt(v)}" for t, v in per_task.items() if v))
    elif number in ("3", "6"):
        total = 100 if number == "3" else 24
        for ssl in ("mae", "mocov3"):
            rows = []
            for method in methods:
                m = dict(task="ade20k", ssl=ssl, method=method, num_prompts=paper[f"table{number}"][ssl][method]["prompts"])
                ref = paper[f"table{number}"][ssl][method]
                rows.append((method, [cell(results, "miou_ss", **m), cell(results, "miou_ms", **m)],
                             [ref["miou_ss"], ref["miou_ms"]]))
            _print_value_rows(f"Table {number} - ADE20K SETR-PUP, {ssl}, {total} prompts, mIoU", ["mIoU (SS)", "mIoU (MS)"], rows)
    elif number == "4":
        rows = []
        for method in ("vpt-shallow", "gated-hard", "gated+temp"):
            values = [cell(results, task=t, ssl="mae", method=method, arch="vit_base", num_prompts=100, insert_at=1)
                      for t in ("cub", "flowers")]
            rows.append((method, values, [paper["table4"][method][t] for t in ("cub", "flowers")]))
        _print_value_rows("Table 4 - hard vs soft gates, MAE, 100 prompts, top-1 (%)", ["cub", "flowers"], rows)
    elif number == "8":
        for arch, ref in paper["table8"].items():
            rows = []
            for method in methods:
                values = [cell(results, task=t, ssl=ref["ssl"], method=method, arch=arch, insert_at=1,
                               num_prompts=default_prompts(t, ref["ssl"], method, arch, total=48)) for t in ("cub", "flowers")]
                rows.append((method, values, [ref[method][t] for t in ("cub", "flowers")]))
            _print_value_rows(f"Table 8 - {arch} ({ref['ssl']}), 48 prompts, top-1 (%)", ["cub", "flowers"], rows)


def _print_value_rows(title, columns, rows):
    print(title)
    width = max(len(r[0]) for r in rows) + 2
    print(" " * width + "".join(f"{c:>18}" for c in columns))
    for label, values, papers in rows:
        print(f"{label:<{width}}" + "".join(f"{fmt(v, p):>18}" for v, p in zip(values, papers)))
    print("cells: ours (paper); '-' = not run yet; ± = std over seeds\n")

# --- 8. the demo ----------------------------------------------------------------------------------


DEMO = dict(task="demo", ssl="mae", arch="vit_base", img_size=32, num_classes=40,
            arch_overrides=dict(embed_dim=96, depth=6, num_heads=3, patch_size=8),
            batch_size=32, num_prompts=8, lr=0.5, gate_init=2.0, epochs=8, warmup_epochs=1, weight_decay=0.0,
            momentum=0.9, prompt_dropout=0.1, seed=42, insert_at=1, lr_grid=[0.5])


def demo_splits(cfg):
    """Generated images (40 classes of coloured stripes), cached at 40 px and cropped to 32 like FGVC."""
    train_images, train_labels = data.make_synthetic_images(cfg["num_classes"], 64, 40, seed=cfg["seed"])
    test_images, test_labels = data.make_synthetic_images(cfg["num_classes"], 32, 40, seed=cfg["seed"] + 1)
    return (data.ImageSplit("demo", "train", train_images, train_labels),
            {"test": data.ImageSplit("demo", "test", test_images, test_labels)})


def run_demo(args, device):
    print("PIPELINE DEMO - generated images, a small randomly initialised ViT, CPU-sized. These are NOT the\n"
          "paper's numbers; they show the harness end to end. For a paper cell: --task cub --ssl mocov3.\n")
    args.results_dir = str(Path(args.results_dir) / "demo")
    shutil.rmtree(args.results_dir, ignore_errors=True)  # the demo always runs afresh
    rows = []
    for method in ("vpt-shallow", "gated+temp"):
        cfg = dict(DEMO, method=method, bf16=not args.fp32 and device.type == "cuda", compile=False)
        print(f"--- {method}")
        result = run_one(cfg, "final", args, device)
        rows.append((method, result))
    print("\nDEMO RESULTS (generated data; not comparable to the paper)")
    print(f"{'method':<14}{'test acc %':>12}{'train img/s':>14}")
    for method, r in rows:
        print(f"{method:<14}{r['final']['test_acc']:>12.2f}{r['history'][-1]['images_per_second']:>14.0f}")
    ratio = rows[-1][1]["selection_ratio"]
    print("\nlearned selection ratio r_l (Eq. 11), blocks 1..L-1:")
    print("  " + "  ".join(f"{l + 1}:{r:.2f}" for l, r in enumerate(ratio)))
    print(f"results: {args.results_dir}")

# --- main -----------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    if argv[:1] == ["figure"]:
        return figure_main(argv[1:])
    args = parse_args(argv)
    if args.table and not args.run:
        return print_table(args.table, args.results_dir)
    runtime.init_distributed()
    device = runtime.pick_device(args.device)
    if args.table:
        return run_table(args.table, args, device)
    if args.demo or not args.task:
        return run_demo(args, device)
    cfg = resolve_config(args, device)
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return
    if cfg["task"] == "ade20k" and args.sweep:
        raise runtime.UserError("ADE20K uses SETR-PUP's fixed recipe (Section A.2); --sweep is for classification")
    cfg, results = run_task(cfg, args, device)
    if runtime.is_main():
        print_summary(cfg, results)


def print_summary(cfg, results):
    """The cell's number(s), mean ± std over seeds, next to the paper's when the setting is the paper's."""
    for metric in [k for k in results[0]["final"] if k in ("test_acc", "miou_ss", "miou_ms")]:
        values = torch.tensor([r["final"][metric] for r in results], dtype=torch.float64)
        paper = paper_value(cfg, metric)
        print(f"{cfg['task']} / {cfg['ssl']} / {cfg['method']}: {metric} {values.mean():.2f}"
              + (f" ± {values.std():.2f} over {len(values)} seeds" if len(values) > 1 else "")
              + (f"   (paper: {paper:.2f})" if paper is not None else ""))


def paper_value(cfg, metric="test_acc"):
    if cfg["arch"] != "vit_base" or cfg["insert_at"] != 1:
        return None
    if cfg["task"] == "ade20k":
        for table in ("table3", "table6"):
            ref = HPARAMS["paper"][table][cfg["ssl"]].get(cfg["method"], {})
            if ref.get("prompts") == cfg["num_prompts"]:
                return ref.get(metric)
        return None
    table = "table2" if data.task_kind(cfg["task"]) == "vtab" else "table1"
    ref = HPARAMS["paper"][table].get(cfg["ssl"], {}).get(cfg["method"], {})
    if cfg["num_prompts"] == default_prompts(cfg["task"], cfg["ssl"], cfg["method"]):
        return ref.get(cfg["task"])  # Table 2 has group means only: None for a single VTAB task
    return None


def table_cells(number):
    """Every run a paper table needs, as (task, ssl, method, arch, num_prompts) overrides."""
    fgvc, vtab = FGVC_COLUMNS, list(data.VTAB_TASKS)
    methods = ["vpt-shallow", "vpt-deep", "gated+temp"]
    cells = []
    if number in ("1", "2"):
        for ssl in ("mae", "mocov3"):
            for method in methods:
                for task in (fgvc if number == "1" else vtab):
                    cells.append(dict(task=task, ssl=ssl, method=method, num_prompts=default_prompts(task, ssl, method)))
    elif number in ("3", "6"):
        for ssl in ("mae", "mocov3"):
            for method in methods:
                cells.append(dict(task="ade20k", ssl=ssl, method=method,
                                  num_prompts=HPARAMS["paper"][f"table{number}"][ssl][method]["prompts"]))
    elif number == "4":
        cells = [dict(task=t, ssl="mae", method=m, num_prompts=100) for m in ("vpt-shallow", "gated-hard", "gated+temp")
                 for t in ("cub", "flowers")]
    elif number == "7":
        cells = [dict(task=t, ssl="mae", method=m, num_prompts=default_prompts(t, "mae", m, total=total))
                 for total in (24, 48, 96) for m in ("vpt-deep", "gated+temp") for t in fgvc]
    elif number == "8":
        for arch, ref in HPARAMS["paper"]["table8"].items():
            cells += [dict(task=t, ssl=ref["ssl"], method=m, arch=arch,
                           num_prompts=default_prompts(t, ref["ssl"], m, arch, total=48))
                      for m in methods for t in ("cub", "flowers")]
    return cells


def run_table(number, args, device):
    """Queue every cell of a table (sweeps first when --sweep), spread over the GPUs, then print it."""
    cfgs = []
    for cell_overrides in table_cells(number):
        cell_args = argparse.Namespace(**dict(vars(args), **cell_overrides))
        cfgs.append(resolve_config(cell_args, device))
    if runtime.is_main():
        print(f"Table {number}: {len(cfgs)} cells x {args.seeds} seed(s)" + (" after lr sweeps" if args.sweep else ""))
    classification = [c for c in cfgs if c["task"] != "ade20k"]
    if classification:
        run_cells(classification, args, device)
    for c in cfgs:
        if c["task"] == "ade20k":
            run_cells([c], argparse.Namespace(**dict(vars(args), sweep=False)), device)
    if runtime.is_main():
        print_table(number, args.results_dir)


def prepare_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py prepare",
                                description="Build VPT-sized train/val/test json splits of an FGVC dataset from "
                                            "its official release files (fixed seed 42).")
    p.add_argument("--dataset", required=True, choices=list(data.FGVC_DATASETS))
    p.add_argument("--root", required=True, help="the dataset folder holding the release files and images")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    print(data.prepare(args.dataset, args.root, overwrite=args.overwrite))


def figure_main(argv):
    return analysis.main(argv)


if __name__ == "__main__":
    try:
        main()
    except (runtime.UserError, data.DataError, gp.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(runtime.EXIT_BAD_INPUT)
    except runtime.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
