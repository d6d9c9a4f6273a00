"""Classification training and evaluation (FGVC, VTAB-1k, the demo) as the official code trains.

    body = trainer.run_classification(cfg, "final", settings)      # -> history, final metrics, gates, timings

Recipe: SGD (momentum 0.9, weight decay 0), linear warm-up from 0 then cosine to 0, stepped per epoch; the
frozen backbone in eval mode; cross-entropy. Protocols: "final" trains on train (FGVC) / train800val200 (VTAB)
and reports the last epoch's test accuracy -- FGVC also the test accuracy of the best-val epoch; "sweep" trains
on train / train800 and reports the last epoch's val / val200 accuracy.

Speed without changing the math: every batch has the full batch size (the last one is padded with rows whose
label data.PAD_LABEL the loss and the accuracy ignore), so torch.compile builds one training graph and one
evaluation graph per run; the step never syncs with the host, and an epoch syncs once (its metrics and the
resumable state come back together) unless a progress bar is shown.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import inputs
import predict
import recipes
import results
import runtime

EVAL_BATCH = 256


def lr_factor(epoch, warmup_epochs, epochs):
    """Linear warm-up from 0, then cosine to 0; stepped per epoch (the official schedule)."""
    if epoch < warmup_epochs:
        return epoch / max(1, warmup_epochs)
    progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def classification_loss(logits, labels):
    """Mean cross-entropy over the real samples of a (padded) batch, and their correct count."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=data.PAD_LABEL)
    return loss, (logits.argmax(-1) == labels).sum()


def make_eval_step(model, device, bf16, compile):
    """(images, labels) -> (correct, real count) as device tensors; compiled once for the eval batch shape."""
    def eval_step(images, labels):
        with torch.no_grad(), runtime.autocast(device, bf16):
            logits = model(images)
        return (logits.argmax(-1) == labels).sum(), (labels != data.PAD_LABEL).sum()
    return runtime.compiled(eval_step, compile)


def evaluate(eval_step, model, loader):
    """(correct, count) over a whole split as device tensors, summed across data-parallel ranks (no sync)."""
    model.eval()
    correct = count = 0
    for images, labels in loader:
        c, n = eval_step(images, labels)
        correct, count = correct + c, count + n
    return runtime.all_reduce_sum(correct), runtime.all_reduce_sum(count)


def accuracy(correct, count):
    return 100.0 * float(correct) / max(1, int(count))

# -----------------------------------------------------------------------------
# Data


def load_data(cfg, settings, protocol):
    """(train split, {eval name: split}). Every split list is read and checked before any image is decoded.
    FGVC's final protocol also tracks val for the best-val-epoch number."""
    if cfg["task"] == "demo":
        return demo_splits(cfg)
    train_name, eval_name = data.split_names(cfg["task"], protocol)
    names = [train_name, eval_name] + (["val"] if data.task_kind(cfg["task"]) == "fgvc" and protocol == "final" else [])
    root = inputs.dataset_folder(cfg["task"], settings)
    cache_dir = settings.cache_dir or Path(settings.results_dir) / "cache"
    with runtime.main_first():  # rank 0 decodes into the cache, the other ranks then read it
        splits = data.load_splits(cfg["task"], root, names, cache_dir=cache_dir)
    return splits.pop(train_name), splits


def demo_splits(cfg):
    """Generated images (coloured stripes, one colour per class) cached at 40 px and cropped to 32 like FGVC."""
    train_images, train_labels = data.make_synthetic_images(cfg["num_classes"], 64, 40, seed=cfg["seed"])
    test_images, test_labels = data.make_synthetic_images(cfg["num_classes"], 32, 40, seed=cfg["seed"] + 1)
    return (data.ImageSplit.from_dense("demo", "train", train_images, train_labels),
            {"test": data.ImageSplit.from_dense("demo", "test", test_images, test_labels)})


def fits_on_gpu(splits, device, fraction=0.3):
    """Keep the uint8 images in GPU memory when they take under `fraction` of what is free (else host)."""
    if device.type != "cuda":
        return False
    return sum(s.pixels.numel() for s in splits) < fraction * torch.cuda.mem_get_info(device)[0]


def make_loaders(cfg, train, evals, device, compile=True):
    """Batches come from the uint8 arrays: crop/flip and normalisation run on `device`, no JPEG decoding.
    Evaluation batches are padded to EVAL_BATCH rows only for a compiled step (one static shape); eager
    evaluation of a small split runs it at its own size."""
    rank, world_size = runtime.world()
    augment = cfg["task"] == "demo" or data.task_kind(cfg["task"]) == "fgvc"  # random crop + flip
    on_gpu = fits_on_gpu([train, *evals.values()], device)
    if runtime.is_main() and device.type == "cuda":
        print(f"images kept in {'GPU' if on_gpu else 'host'} memory as uint8")
    common = dict(crop_size=cfg["img_size"], rank=rank, world_size=world_size, device=device, images_on_device=on_gpu)
    train_loader = data.BatchLoader(train, cfg["batch_size"] // world_size, train=True, augment=augment,
                                    seed=cfg["seed"], **common)
    eval_batch = max(EVAL_BATCH, cfg["batch_size"])
    eval_loaders = {name: data.BatchLoader(s, eval_batch if compile else min(eval_batch, max(1, math.ceil(
                        len(s) / world_size))), train=False, **common) for name, s in evals.items()}
    return train_loader, eval_loaders

# -----------------------------------------------------------------------------
# Training


@dataclass
class Outcome:
    history: list            # one record per epoch: loss, train_acc, lr, seconds, images_per_second (val_acc)
    final: dict              # the protocol's metrics
    train_seconds: float     # this session's training loop
    eval_seconds: float      # this session's final evaluation
    elapsed_before: float    # seconds spent by the sessions this run resumed from


def train_epoch(step, model, loader, epoch, epochs, device, quiet, log_every=25):
    """One pass over the training split. Returns device tensors {loss_sum, correct, seen} and the seconds.
    With a progress bar the bar's numbers sync every `log_every` steps; without one nothing syncs."""
    model.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    tic = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=True if quiet or not runtime.is_main() else None)
    for i, (images, labels) in enumerate(bar):
        loss, batch_correct = step(images, labels)
        real = (labels != data.PAD_LABEL).sum()
        loss_sum += loss * real
        correct += batch_correct
        seen += real
        if not bar.disable and (i + 1) % log_every == 0:
            runtime.check_finite(loss.item(), f"epoch {epoch + 1}, step {i + 1}", epoch > 0)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / seen.item():.1f}")
    return {"loss_sum": runtime.all_reduce_sum(loss_sum), "correct": runtime.all_reduce_sum(correct),
            "seen": runtime.all_reduce_sum(seen)}, time.perf_counter() - tic


def train(cfg, model, train_loader, eval_loaders, settings, state_path):
    """The paper's recipe, resumable after every epoch. Returns an Outcome."""
    device = settings.device
    model.to(device)
    optimizer = runtime.make_optimizer(decay_groups(model, cfg["weight_decay"]), cfg["lr"], cfg["momentum"],
                                       cfg["weight_decay"], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg["warmup_epochs"], cfg["epochs"]))
    step = runtime.make_train_step(model, optimizer, classification_loss, device, settings.bf16, settings.compile)
    eval_step = make_eval_step(model, device, settings.bf16, settings.compile)
    history, start, best, elapsed_before = resume_or_start(cfg, model, optimizer, scheduler, settings, state_path)
    track_val = "val" in eval_loaders and len(eval_loaders) > 1  # FGVC final: best-val epoch alongside
    tic = time.perf_counter()
    for epoch in range(start, cfg["epochs"]):
        stats, seconds = train_epoch(step, model, train_loader, epoch, cfg["epochs"], device, settings.quiet)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        pending = {"stats": stats}
        if track_val:
            pending["val"] = evaluate(eval_step, model, eval_loaders["val"])
            pending["candidate"] = {k: v.detach().clone() for k, v in model.prompt_state_dict().items()}
        pending["state"] = runtime.training_state(model, optimizer, scheduler, epoch, history)
        host = runtime.to_host(pending)   # the epoch's one sync
        s = host["stats"]
        loss = float(s["loss_sum"]) / max(1, int(s["seen"]))
        runtime.check_finite(loss, f"epoch {epoch + 1}", state_saved=epoch > 0)
        record = {"epoch": epoch + 1, "loss": loss, "train_acc": accuracy(s["correct"], s["seen"]), "lr": lr,
                  "seconds": seconds, "images_per_second": int(s["seen"]) / seconds}
        if track_val:
            record["val_acc"] = accuracy(*host["val"])
            if record["val_acc"] > best["val_acc"]:
                best = {"val_acc": record["val_acc"], "epoch": epoch + 1, "state": host["candidate"]}
        history.append(record)
        if runtime.is_main():
            state = host["state"]
            state["history"] = history
            state["extra"] = {"best": best, "config": results.identity(cfg),
                              "elapsed": elapsed_before + time.perf_counter() - tic}
            runtime.save_training_state(state_path, state)
            if not settings.quiet:
                tqdm.write(f"epoch {epoch + 1:3d}  loss {loss:.4f}  train {record['train_acc']:.2f}  "
                           + (f"val {record['val_acc']:.2f}  " if track_val else "")
                           + f"{record['images_per_second']:.0f} img/s")
    train_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    final = final_metrics(model, eval_step, eval_loaders, best)
    return Outcome(history, final, train_seconds, time.perf_counter() - tic, elapsed_before)


def decay_groups(model, weight_decay):
    """The trainable tensors for SGD. With weight decay (VPT's recipe), VPT's optimizer (KMnP/vpt
    src/solver/optimizer.py) decays every trainable tensor except the head's bias: that one gets its own group
    without decay. Without weight decay (the paper's recipe) one plain list."""
    if not weight_decay:
        return model.trainable_parameters()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n != "head.bias"]},
              {"params": [p for n, p in named if n == "head.bias"], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def resume_or_start(cfg, model, optimizer, scheduler, settings, state_path):
    """(history, first epoch, best-val record, seconds already spent): from the saved state with --resume."""
    fresh = [], 0, {"val_acc": -1.0, "epoch": None, "state": None}, 0.0
    if not Path(state_path).is_file():
        if settings.resume and runtime.is_main():
            print(f"--resume: no saved state at {state_path}; starting from scratch")
        return fresh
    if not settings.resume:
        if runtime.is_main():
            print(f"{state_path} holds an interrupted run; starting over (pass --resume to continue it)")
        return fresh
    state = runtime.load_training_state(state_path, model, optimizer, scheduler)
    if state["extra"].get("config") != results.identity(cfg):
        raise runtime.UserError(f"{state_path} was written by a run with other settings; delete it to start over")
    if runtime.is_main():
        print(f"resumed from {state_path} after epoch {state['step'] + 1}")
    extra = state["extra"]
    return state["history"], state["step"] + 1, extra["best"], extra.get("elapsed", 0.0)


def final_metrics(model, eval_step, eval_loaders, best):
    """The protocol's split at the final epoch; FGVC also the test accuracy of the best-val epoch's prompts."""
    track_val = "val" in eval_loaders and len(eval_loaders) > 1
    final = {f"{name}_acc": accuracy(*evaluate(eval_step, model, loader))
             for name, loader in eval_loaders.items() if name != "val" or not track_val}
    if track_val and best["state"] is not None:
        final_state = {k: v.detach().clone() for k, v in model.prompt_state_dict().items()}
        model.load_prompt_state_dict(best["state"])
        final["best_val_epoch"], final["best_val_acc"] = best["epoch"], best["val_acc"]
        final["test_acc_at_best_val"] = accuracy(*evaluate(eval_step, model, eval_loaders["test"]))
        model.load_prompt_state_dict(final_state)
    return final


def learned_gates(model):
    """Gates (Eq. 6), selection ratio (Eq. 11) and temperatures (Eq. 9) of a trained model; None where absent."""
    out = {"gates": None, "selection_ratio": None, "temperatures": None}
    if model.gate_logits is not None:
        model.eval()
        out["gates"] = model.gates().tolist()
        out["selection_ratio"] = model.selection_ratio().tolist()
    if model.temperatures is not None:
        out["temperatures"] = model.temperatures.detach().cpu().tolist()
    return out

# -----------------------------------------------------------------------------
# One run, end to end


def run_classification(cfg, protocol, settings):
    """Train and evaluate one config; returns the result body (history, final metrics, learned gates, timings)
    and the trained prompt-side state. The order fails fast: the checkpoint must load before data is decoded."""
    files = results.run_files(settings.results_dir, cfg, protocol)
    tic = time.perf_counter()
    with runtime.flush_denormals(settings.device):
        runtime.seed_everything(cfg["seed"])
        checkpoint = inputs.checkpoint_for(cfg, settings)
        model = recipes.model_from_config(cfg, recipes.num_classes(cfg), checkpoint, verbose=runtime.is_main())
        runtime.place_model(model, settings.device, settings.bf16)
        train_split, eval_splits = load_data(cfg, settings, protocol)
        train_loader, eval_loaders = make_loaders(cfg, train_split, eval_splits, settings.device,
                                                  compile=bool(settings.compile))
        outcome = train(cfg, model, train_loader, eval_loaders, settings, files.state)
    session = time.perf_counter() - tic
    if runtime.is_main():  # the prompt pack, beside the .prompts.pt the result writer saves
        predict.write_run_pack(model, cfg, protocol, settings, outcome.final, checkpoint, files.pack)
    body = {"history": outcome.history, "final": outcome.final, **learned_gates(model),
            "wall_seconds": outcome.elapsed_before + session, "wall_seconds_this_session": session,
            "train_seconds": outcome.train_seconds, "eval_seconds": outcome.eval_seconds}
    return body, model.prompt_state_dict()
