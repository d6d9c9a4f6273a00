"""Classification training and evaluation (FGVC, VTAB-1k, the demo) as the official code trains.

    body, model = classification.run_classification(cfg, "final", settings, files.state, checkpoint)   # model, data, fit
    outcome = classification.fit(cfg, model, train_split, eval_splits, settings, state_path)   # given model and data

Recipe: SGD (momentum 0.9, weight decay 0), linear warm-up from 0 then cosine to 0, stepped per epoch; the
frozen backbone in eval mode; cross-entropy. Protocols: "final" trains on train (FGVC) / train800val200 (VTAB)
and reports the last epoch's test accuracy -- FGVC also the test accuracy of the best-val epoch; "sweep" trains
on train / train800 and reports the last epoch's val / val200 accuracy.

Speed without changing the math: every batch has the full batch size (the last one is padded with rows whose
label batches.PAD_LABEL the loss and the accuracy ignore), so torch.compile builds one training graph and one
evaluation graph of the backbone per run (the head runs eager: classifier_forward); the step never syncs with
the host, and an epoch waits for the device once -- when its metrics (and, every runtime.SAVE_EVERY epochs, the
resumable state) come back together -- unless a progress bar is shown. Every result records how many
step calls actually ran a compiled graph (runtime.compile_record).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.data import batches
from harness.data import datasets
from harness import inputs
from harness import config
from harness import runtime

EVAL_BATCH = 256


def lr_factor(epoch, warmup_epochs, epochs):
    """Linear warm-up from 0, then cosine to 0; stepped per epoch (the official schedule)."""
    if epoch < warmup_epochs:
        return epoch / max(1, warmup_epochs)
    progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def classification_loss(logits, labels):
    """Mean cross-entropy over the real samples of a (padded) batch, and their correct count."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=batches.PAD_LABEL)
    return loss, (logits.argmax(-1) == labels).sum()


def classifier_forward(model, device, bf16, compile, mode=None):
    """images -> logits as the harness runs the classifier: the backbone (patch embedding to pooled features,
    under bf16 autocast) compiled, the head eager. Heads differ per task, backbones per prompt count and method:
    the graphs of a whole table are few (about 13 for Table 2's 94 configurations), and inductor's cache serves a
    repeated one. forward.compiled is the Compiled backbone (runtime.compile_record counts it), or None."""
    if not compile:
        def forward(images):
            with runtime.autocast(device, bf16):
                return model(images)
        forward.compiled = None
        return forward

    def features(images):
        with runtime.autocast(device, bf16):
            return model.forward_features(images)
    features = runtime.compiled(features, compile, mode)

    def forward(images):
        with runtime.autocast(device, bf16):
            return model.head(features(images))
    forward.compiled = features
    return forward


def make_eval_step(model, device, bf16, compile, mode=None):
    """(images, labels) -> (correct, real count) as device tensors; the backbone compiled once for the eval batch
    shape (classifier_forward). eval_step.compiled: see classifier_forward."""
    forward = classifier_forward(model, device, bf16, compile, mode)

    def eval_step(images, labels):
        with torch.no_grad():
            logits = forward(images)
        return (logits.argmax(-1) == labels).sum(), (labels != batches.PAD_LABEL).sum()
    eval_step.compiled = forward.compiled
    return eval_step


def evaluate(eval_step, model, loader):
    """(correct, count) over a whole split as device tensors, summed across data-parallel ranks (no sync)."""
    model.eval()
    correct = count = 0
    for images, labels in runtime.step_points(loader):
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
    kind = cfg.task_info.kind
    if kind == "demo":
        return demo_splits(cfg)
    train_name, eval_name, root, lists = inputs.splits_of(cfg, settings, protocol)
    names = [train_name, eval_name] + (["val"] if kind == "fgvc" and protocol == "final" else [])
    # VTAB's test split is read once per run, at the end: streamed, not cached (Table 2 fits on disk). The
    # training splits (read every epoch) and val200 (reused by every run of an lr sweep) stay cached.
    stream = (eval_name,) if kind == "vtab" and protocol == "final" else ()
    with runtime.main_first():  # rank 0 decodes into the cache, the other ranks then read it
        splits = datasets.load_splits(cfg.task, root, names, cache_dir=settings.cache_folder, stream=stream,
                                      lists=lists)
    return splits.pop(train_name), splits


def demo_splits(cfg):
    """Generated images (coloured stripes, one colour per class) cached at 40 px and cropped to 32 like FGVC."""
    train_images, train_labels = datasets.make_synthetic_images(cfg.num_classes, 64, 40, seed=cfg.seed)
    test_images, test_labels = datasets.make_synthetic_images(cfg.num_classes, 32, 40, seed=cfg.seed + 1)
    return (datasets.ImageSplit.from_dense("demo", "train", train_images, train_labels),
            {"test": datasets.ImageSplit.from_dense("demo", "test", test_images, test_labels)})


def fits_on_gpu(splits, device, fraction=0.3):
    """Keep the uint8 images in GPU memory when they take under `fraction` of what is free (else host)."""
    if device.type != "cuda":
        return False
    kept = [s for s in splits if not isinstance(s, datasets.StreamedSplit)]   # a streamed split is never held whole
    return sum(s.pixels.numel() for s in kept) < fraction * torch.cuda.mem_get_info(device)[0]


def make_loaders(cfg, train, evals, device, on_gpu=False, compile=True):
    """Batches come from the uint8 arrays: crop/flip and normalisation run on `device`, no JPEG decoding; the
    arrays themselves are copied to the GPU once when `on_gpu` (fits_on_gpu decides). Evaluation batches are
    padded to EVAL_BATCH rows only for a compiled step (one static shape); eager evaluation of a small split
    runs it at its own size."""
    rank, world_size = runtime.world()
    augment = cfg.task_info.kind in ("demo", "fgvc")  # random crop + flip
    if runtime.is_main() and device.type == "cuda":
        print(f"images kept in {'GPU' if on_gpu else 'host'} memory as uint8")
    common = dict(crop_size=cfg.img_size, rank=rank, world_size=world_size, device=device, images_on_device=on_gpu)
    train_loader = batches.BatchLoader(train, cfg.batch_size // world_size, train=True, augment=augment,
                                       seed=cfg.seed, **common)
    eval_batch = max(EVAL_BATCH, cfg.batch_size)
    eval_loaders = {name: (batches.StreamedBatchLoader if isinstance(s, datasets.StreamedSplit) else batches.BatchLoader)(
                        s, eval_batch if compile else min(eval_batch, max(1, math.ceil(len(s) / world_size))),
                        train=False, **common) for name, s in evals.items()}
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
    setup_seconds: float = 0.0       # placing the model and building the loaders (fit)
    images_on_device: bool = False   # the uint8 images were kept in GPU memory
    compile: dict = None             # runtime.compile_record: the setting and the calls that ran compiled


def fit(cfg, model, train_split, eval_splits, settings, state_path):
    """The one entry point of a classification run once its model and data exist (run_classification, bench and
    the tests call it): place the model, build the loaders, train with the paper's recipe (resumable after
    every epoch at `state_path`), evaluate. eval_splits: {"test" | "val" | "val200": split}. Returns an Outcome."""
    if settings.compile:
        runtime.enter_graph_key(graph_key(cfg, settings))
    tic = time.perf_counter()
    runtime.place_model(model, settings.device, settings.bf16, settings.kernels)
    on_device = fits_on_gpu([train_split, *eval_splits.values()], settings.device)
    train_loader, eval_loaders = make_loaders(cfg, train_split, eval_splits, settings.device, on_device,
                                              compile=bool(settings.compile))
    runtime.synchronize(settings.device)
    setup_seconds = time.perf_counter() - tic
    outcome = train(cfg, model, train_loader, eval_loaders, settings, state_path)
    outcome.setup_seconds, outcome.images_on_device = setup_seconds, on_device
    return outcome


# What a config's compiled graphs do not depend on: the head runs eager, and lr, weight decay and the schedule act
# in the optimizer; every other field (and any new one) is part of the graph key.
NOT_IN_GRAPH = ("task", "num_classes", "lr", "weight_decay", "momentum", "seed", "epochs", "warmup_epochs", "iters",
                "gate_init", "recipe")


def graph_key(cfg, settings=None):
    """What shapes a run's compiled graphs (ssl, arch, method, prompts, batch, image size, dropout, precision):
    runs of one process with equal keys reuse one set of graphs (runtime.enter_graph_key); the queue runs them
    one after another."""
    fields = tuple(sorted((k, repr(v)) for k, v in cfg.identity().items() if k not in NOT_IN_GRAPH))
    where = () if settings is None else (str(settings.device), settings.bf16, repr(settings.compile),
                                         settings.compile_mode, tuple(settings.kernels))
    return (type(cfg).__name__,) + fields + where


def by_graph_key(cfgs):
    """Indices of `cfgs` with runs of one graph key next to each other (keys in order of first appearance)."""
    first = {}
    keys = [first.setdefault(graph_key(c), len(first)) for c in cfgs]
    return sorted(range(len(cfgs)), key=keys.__getitem__)


def train_epoch(step, model, loader, epoch, epochs, device, quiet, log_every=25):
    """One pass over the training split. Returns device tensors {loss_sum, correct, seen}.
    With a progress bar the bar's numbers sync every `log_every` steps; without one nothing syncs."""
    model.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=True if quiet or not runtime.is_main() else None)
    for i, (images, labels) in enumerate(runtime.step_points(bar)):
        loss, batch_correct = step(images, labels)
        real = (labels != batches.PAD_LABEL).sum()
        loss_sum += loss * real
        correct += batch_correct
        seen += real
        if not bar.disable and (i + 1) % log_every == 0:
            runtime.check_finite(loss.item(), f"epoch {epoch + 1}, step {i + 1}", epoch > 0)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / seen.item():.1f}")
    return {"loss_sum": runtime.all_reduce_sum(loss_sum), "correct": runtime.all_reduce_sum(correct),
            "seen": runtime.all_reduce_sum(seen)}


def train(cfg, model, train_loader, eval_loaders, settings, state_path):
    """The paper's recipe, resumable: the state is saved every runtime.SAVE_EVERY epochs and after the last, off
    the training thread (runtime.StateWriter; a kill loses at most those epochs and the write in flight). Returns an Outcome. An epoch waits for the device once, when its metrics
    (and a due state) come back; its seconds run from the previous epoch's read-back to its own (the steps queue
    up without syncing)."""
    device = settings.device
    optimizer = runtime.make_optimizer(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay,
                                       device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg.warmup_epochs, cfg.epochs))
    mode = settings.compile_mode
    step = runtime.make_train_step(model, optimizer, classification_loss, device,
                                   forward=classifier_forward(model, device, settings.bf16, settings.compile, mode))
    eval_step = make_eval_step(model, device, settings.bf16, settings.compile, mode)
    state = runtime.resume_or_start(state_path, cfg.identity(), model, optimizer, scheduler, settings.resume)
    history, start, best, elapsed_before = ([], 0, {"val_acc": -1.0, "epoch": None, "state": None}, 0.0) \
        if state is None else (state["history"], state["step"] + 1, state["extra"]["best"], state["extra"]["elapsed"])
    track_val = "val" in eval_loaders and len(eval_loaders) > 1  # FGVC final: best-val epoch alongside
    saved = state is not None
    runtime.synchronize(device)
    tic = epoch_tic = time.perf_counter()
    with runtime.StateWriter() as writer:   # states go to disk off this thread
        for epoch in range(start, cfg.epochs):
            stats = train_epoch(step, model, train_loader, epoch, cfg.epochs, device, settings.quiet)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            save = runtime.save_due(epoch, cfg.epochs)
            pending = {"stats": stats}
            if save:
                pending["state"] = runtime.training_state(model, optimizer, scheduler, epoch)
            if track_val:
                pending["val"] = evaluate(eval_step, model, eval_loaders["val"])
                pending["candidate"] = {k: v.detach().clone() for k, v in model.prompt_state_dict().items()}
            host = runtime.to_host(pending)   # the epoch's one read-back (and its one device sync)
            seconds, epoch_tic = time.perf_counter() - epoch_tic, time.perf_counter()
            record, best = epoch_record(host, epoch, lr, seconds, best, track_val, saved)
            history.append(record)
            if save and runtime.is_main():
                saved = True
                runtime.save_training_state(state_path, host["state"], history, cfg.identity(),
                                            elapsed_before + time.perf_counter() - tic, best=best, writer=writer)
            if runtime.is_main() and not settings.quiet:
                tqdm.write(f"epoch {epoch + 1:3d}  loss {record['loss']:.4f}  train {record['train_acc']:.2f}  "
                               + (f"val {record['val_acc']:.2f}  " if track_val else "")
                               + f"{record['images_per_second']:.1f} img/s")
    train_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    final = final_metrics(model, eval_step, eval_loaders, best)
    return Outcome(history, final, train_seconds, time.perf_counter() - tic, elapsed_before,
                   compile=runtime.compile_record(settings.compile, train=step.compiled, eval=eval_step.compiled))


def epoch_record(host, epoch, lr, seconds, best, track_val, state_saved):
    """(the epoch's history record, the best-val record so far) from the epoch's host copy; stops on NaN."""
    s = host["stats"]
    loss = float(s["loss_sum"]) / max(1, int(s["seen"]))
    runtime.check_finite(loss, f"epoch {epoch + 1}", state_saved)
    record = {"epoch": epoch + 1, "loss": loss, "train_acc": accuracy(s["correct"], s["seen"]), "lr": lr,
              "seconds": seconds, "images_per_second": int(s["seen"]) / seconds}
    if track_val:
        record["val_acc"] = accuracy(*host["val"])
        if record["val_acc"] > best["val_acc"]:
            best = {"val_acc": record["val_acc"], "epoch": epoch + 1, "state": host["candidate"]}
    return record, best


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

# -----------------------------------------------------------------------------
# One run, end to end


def run_classification(cfg, protocol, settings, state_path, checkpoint=None):
    """Train and evaluate one config from the backbone file `checkpoint` (None: the demo's random backbone),
    resumable at `state_path`; returns the result body (history, final metrics, learned gates, timings, what ran
    compiled) and the trained model (runs.run_one writes its outputs). The order fails fast: the checkpoint must
    load before data is decoded."""
    tic = time.perf_counter()
    with runtime.flush_denormals(settings.device):
        runtime.seed_everything(cfg.seed)
        model = config.model_from_config(cfg, cfg.head_size(), checkpoint, verbose=runtime.is_main(),
                                         trust_pickle=settings.trust_pickle)
        train_split, eval_splits = load_data(cfg, settings, protocol)
        outcome = fit(cfg, model, train_split, eval_splits, settings, state_path)
    session = time.perf_counter() - tic
    body = {"history": outcome.history, "final": outcome.final, **runtime.learned_gates(model),
            "wall_seconds": outcome.elapsed_before + session, "wall_seconds_this_session": session,
            "train_seconds": outcome.train_seconds, "eval_seconds": outcome.eval_seconds,
            "compiled": outcome.compile}
    return body, model
