"""Many classification runs in one batch: the runs of one graph key and schedule (the lr x weight decay x seed
points of a sweep, final runs of cells sharing a backbone, method, prompt count and batch size) train together.

    outcomes = batched.fit_batched(cfgs, models, train_splits, eval_splits, settings, state_paths)

The backbone is frozen, so R runs share it: a batch holds each run's own B images (rows r*B .. (r+1)*B - 1 are
run r's), goes once through the backbone's own block loop (VisionTransformer.run_blocks) with a plan whose rows
carry each run's prompts, gates and temperatures (each run's prompt_plan, stacked), and each run's head reads its
rows. The loss is the sum of the runs' mean losses, so each run's gradients are those of its own loss; one SGD
step updates every run, with a parameter group (lr, weight decay, momentum) per run. With prompt dropout off, a
run's numbers are those of the same run trained alone (float64: to rounding); with dropout, the masks are drawn
per run and per image from one generator, so a run is equal in distribution to its solo run, not bitwise.

A run whose loss becomes NaN / inf (read at the end of each epoch) leaves the batch and is recorded as diverged;
the others go on. Each run keeps its own resumable state file, written every runtime.SAVE_EVERY epochs
(off the training thread: runtime.StateWriter).
"""
import time

import torch

import gated_prompt as gp
from harness import classification
from harness import config
from harness import inputs
from harness import results
from harness import runtime
from harness.data import batches


def share_backbone(models):
    """Point every model's frozen backbone at the first model's (one copy in memory). The runs' backbones must be
    equal (the same checkpoint; ValueError otherwise). Returns the models."""
    first = models[0]
    reference = first.backbone_state_dict()
    for m in models[1:]:
        theirs = m.backbone_state_dict()
        if theirs.keys() != reference.keys() or not all(torch.equal(theirs[k], reference[k]) for k in reference):
            raise ValueError("runs trained in one batch need the same backbone weights (one checkpoint)")
    for m in models[1:]:
        for name in gp.VisionTransformer.BACKBONE:
            setattr(m, name, getattr(first, name))
    return models


def stacked_plan(plans, rows):
    """One PromptStep per block for a batch of len(plans) runs of `rows` images each, from each run's own plan
    (VisionTransformer.prompt_plan): prompt writes stacked along the batch, each run's gate and temperature
    repeated over its rows. Runs of one graph key have the same kind of step at every block."""
    def per_row(values, shape):
        return torch.stack([v.reshape(()) for v in values]).repeat_interleave(rows).view(-1, *shape)
    merged = []
    for steps in zip(*plans):
        first = steps[0]
        merged.append(gp.PromptStep(
            write=None if first.write is None else torch.cat([s.write for s in steps]),
            tau=None if first.tau is None else per_row([s.tau for s in steps], (1, 1, 1)),
            gate=None if first.gate is None else per_row([s.gate for s in steps], (1, 1))))
    return merged


class BatchedRuns(torch.nn.Module):
    """R models of one graph key sharing their backbone (share_backbone) as one module: images of R * B rows ->
    R logits [B, classes of run r] (each run's head on its rows)."""

    def __init__(self, models):
        super().__init__()
        self.runs = torch.nn.ModuleList(models)

    def features(self, images):
        rows = len(images) // len(self.runs)
        plan = stacked_plan([m.prompt_plan(rows) for m in self.runs], rows)
        first = self.runs[0]
        return first.pool(first.run_blocks(images, plan)[0], plan[-1].live)

    def forward(self, images):
        return self.heads(self.features(images))

    def heads(self, features):
        return [m.head(f) for m, f in zip(self.runs, features.chunk(len(self.runs)))]


def batched_loss(logits, labels):
    """(the sum of the runs' mean cross-entropies, per-run losses [R], per-run correct counts [R]); labels
    [R * B] with each run's rows in turn."""
    losses, correct = [], []
    for out, y in zip(logits, labels.chunk(len(logits))):
        loss, right = classification.classification_loss(out, y)
        losses.append(loss)
        correct.append(right)
    per_run = torch.stack(losses)
    return per_run.sum(), per_run.detach(), torch.stack(correct)


def make_batched_step(batch, optimizer, device, bf16, compile=False, mode=None):
    """One SGD step of every run: step(images [R*B], labels [R*B]) -> (per-run losses [R], per-run correct [R]) as
    device tensors; never syncs. The backbone with the stacked plan is compiled (its graph key is the runs'
    plus R); heads and loss eager. step.compiled: the Compiled function or None."""
    def features(images):
        with runtime.autocast(device, bf16):
            return batch.features(images)
    features = runtime.compiled(features, compile, mode)
    params = [p for p in batch.parameters() if p.requires_grad]

    def step(images, labels):
        with runtime.autocast(device, bf16):
            logits = batch.heads(features(images))
        total, losses, correct = batched_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        runtime.all_reduce_gradients(params)
        optimizer.step()
        gp.project_temperatures(batch)
        return losses, correct
    step.compiled = features if isinstance(features, runtime.Compiled) else None
    return step


def run_groups(cfgs, models):
    """SGD parameter groups: each run's own (classification.decay_groups: VPT's rule for the head bias), with its
    lr, weight decay and momentum. Returns (groups, the group indices of each run)."""
    groups, owner = [], []
    for cfg, model in zip(cfgs, models):
        mine = classification.decay_groups(model, cfg.weight_decay)
        mine = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in mine] \
            if isinstance(mine[0], dict) else [{"params": list(mine)}]
        first = len(groups)
        for g in mine:
            g.setdefault("weight_decay", cfg.weight_decay)
            groups.append(dict(g, lr=cfg.lr, momentum=cfg.momentum))
        owner.append(list(range(first, len(groups))))
    return groups, owner


def check_batchable(cfgs, loaders, evals=()):
    """ValueError unless the runs share a graph key and a schedule (epochs, warm-up, steps per epoch) and none
    tracks the best-val epoch (FGVC's final protocol runs alone)."""
    if any("val" in e and len(e) > 1 for e in evals):
        raise ValueError("FGVC final runs track their best-val epoch and train alone, not in a batch")
    keys = {classification.graph_key(c) for c in cfgs}
    schedules = {(c.epochs, c.warmup_epochs, len(loader)) for c, loader in zip(cfgs, loaders)}
    if len(keys) > 1 or len(schedules) > 1:
        raise ValueError(f"runs trained in one batch must share a graph key and a schedule; got {len(keys)} keys "
                         f"and schedules {sorted(schedules)}")


class Job:
    """The live runs of a batched job: models, their optimizer and scheduler, the compiled step; rebuilt (with
    each remaining run's optimizer state) when a run leaves the batch."""

    def __init__(self, cfgs, models, loaders, settings, live, optimizer_state=None, epoch=0):
        self.live = live
        self.cfgs = [cfgs[r] for r in live]
        self.models = [models[r] for r in live]
        self.loaders = [loaders[r] for r in live]
        self.batch = BatchedRuns(self.models)
        groups, self.owner = run_groups(self.cfgs, self.models)
        cfg = self.cfgs[0]
        self.optimizer = runtime.make_optimizer(groups, cfg.lr, cfg.momentum, cfg.weight_decay, settings.device)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: classification.lr_factor(e, cfg.warmup_epochs, cfg.epochs),
            last_epoch=epoch - 1)
        if optimizer_state:
            for p, state in optimizer_state.items():
                if state:
                    self.optimizer.state[p] = state
        self.step = make_batched_step(self.batch, self.optimizer, settings.device, settings.bf16,
                                      settings.compile, settings.compile_mode)

    def run_state(self, i, epoch):
        """Run i's resumable state: its prompt side, its parameters' momentum, the epoch, the RNG (the job's)."""
        params = [p for g in self.owner[i] for p in self.optimizer.param_groups[g]["params"]]
        return {"model": self.models[i].prompt_state_dict(), "step": epoch, "rng": runtime.rng_state(),
                "momentum": [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in params]}


def fit_batched(cfgs, models, train_splits, eval_splits, settings, state_paths):
    """Train R runs of one graph key and schedule in one batch and evaluate each; the batched counterpart of
    classification.fit (same arguments, one per run). Returns one classification.Outcome per run, with
    outcome.final == {} and outcome.diverged = the message for a run whose loss became NaN / inf."""
    device = settings.device
    if settings.compile:
        runtime.enter_graph_key(("batched", len(cfgs)) + classification.graph_key(cfgs[0], settings))
    tic = time.perf_counter()
    share_backbone(models)
    runtime.place_model(models[0], device, settings.bf16, settings.kernels)
    for m in models[1:]:
        m.to(device)   # its prompt side; the backbone is the first model's
    loaders = [classification.make_loaders(c, t, e, device, compile=bool(settings.compile))
               for c, t, e in zip(cfgs, train_splits, eval_splits)]
    train_loaders = [train for train, _ in loaders]
    check_batchable(cfgs, train_loaders, [e for _, e in loaders])
    setup_seconds = time.perf_counter() - tic
    R, epochs = len(cfgs), cfgs[0].epochs
    history, diverged, start, elapsed_before = [[] for _ in range(R)], [None] * R, 0, 0.0
    momentum = {}
    states = [resume_state(path, cfg, model, settings.resume) for path, cfg, model in zip(state_paths, cfgs, models)]
    if any(s is not None for s in states):
        steps = {None if s is None else s["step"] for s in states if s is None or not s["extra"].get("diverged")}
        if len(steps) > 1 or None in steps:
            raise runtime.UserError(f"the runs of this batch saved states of different epochs ({state_paths[0]} "
                                    "...): delete their state files to start them over")
        latest = max((s for s in states if s is not None), key=lambda s: s["step"])
        start, elapsed_before = latest["step"] + 1, latest["extra"]["elapsed"]
        runtime.set_rng_state(latest["rng"])
        for r, s in enumerate(states):
            history[r], diverged[r] = s["history"], s["extra"].get("diverged")
            params = [p for g in classification.decay_groups(models[r], cfgs[r].weight_decay)
                      for p in (g["params"] if isinstance(g, dict) else [g])]
            momentum.update({p: {"momentum_buffer": b.to(device)} for p, b in zip(params, s["momentum"])
                             if b is not None})
    job = Job(cfgs, models, train_loaders, settings, [r for r in range(R) if diverged[r] is None], momentum, start)
    tic = time.perf_counter()
    with runtime.StateWriter() as writer:   # states go to disk off this thread
        for epoch in range(start, epochs):
            if not job.live:
                break
            epoch_tic = time.perf_counter()
            stats = train_epoch_batched(job, epoch)
            lrs = [job.optimizer.param_groups[g[0]]["lr"] for g in job.owner]
            job.scheduler.step()
            save = runtime.save_due(epoch, epochs)
            pending = {"stats": stats}
            if save:
                pending["states"] = [job.run_state(i, epoch) for i in range(len(job.live))]
            host = runtime.to_host(pending)   # the epoch's one read-back
            seconds = time.perf_counter() - epoch_tic
            s, left = host["stats"], []
            for i, r in enumerate(job.live):
                seen = int(s["seen"][i])
                loss = float(s["loss_sum"][i]) / max(1, seen)
                if not torch.isfinite(torch.tensor(loss)):
                    diverged[r] = f"loss became {loss} at epoch {epoch + 1}"
                    left.append(r)
                    continue
                history[r].append({"epoch": epoch + 1, "loss": loss,
                                   "train_acc": classification.accuracy(s["correct"][i], seen), "lr": lrs[i],
                                   "seconds": seconds, "images_per_second": int(s["seen"].sum()) / seconds})
            if save and runtime.is_main():
                for i, r in enumerate(job.live):
                    runtime.save_training_state(state_paths[r], host["states"][i], history[r], cfgs[r].identity(),
                                                elapsed_before + time.perf_counter() - tic, diverged=diverged[r],
                                                writer=writer)
            if left:
                keep = [r for r in job.live if r not in left]
                live = {p for r in keep for p in models[r].parameters()}
                momentum = {p: st for p, st in job.optimizer.state.items() if p in live}
                job = Job(cfgs, models, train_loaders, settings, keep, momentum, epoch + 1)
    train_seconds = time.perf_counter() - tic
    outcomes = []
    for r in range(R):
        tic = time.perf_counter()
        final = {}
        if diverged[r] is None:
            eval_step = classification.make_eval_step(models[r], device, settings.bf16, settings.compile,
                                                      settings.compile_mode)
            final = classification.final_metrics(models[r], eval_step, loaders[r][1],
                                                 {"val_acc": -1.0, "epoch": None, "state": None})
        outcome = classification.Outcome(history[r], final, train_seconds / R, time.perf_counter() - tic,
                                         elapsed_before, setup_seconds=setup_seconds / R,
                                         compile=runtime.compile_record(settings.compile, train=job.step.compiled))
        outcome.diverged = diverged[r]
        outcomes.append(outcome)
    return outcomes


def resume_state(path, cfg, model, resume):
    """A run's saved state (its prompt side loaded into `model`), or None (see runtime.resume_or_start)."""
    import os
    if not resume or not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["extra"].get("config") != cfg.identity():
        raise runtime.UserError(f"{path} was written by a run with another configuration; delete it to start over")
    model.load_prompt_state_dict(state["model"])
    return state


def train_epoch_batched(job, epoch):
    """One pass: each run's loader gives its own batch; returns device tensors {loss_sum, correct, seen}, each [R].
    Nothing syncs."""
    job.batch.train()
    for loader in job.loaders:
        loader.set_epoch(epoch)
    device = job.loaders[0].device
    R = len(job.live)
    loss_sum = torch.zeros(R, device=device)
    correct = torch.zeros(R, dtype=torch.long, device=device)
    seen = torch.zeros(R, dtype=torch.long, device=device)
    for parts in runtime.step_points(zip(*job.loaders)):   # a stop signal: after this step, before the next
        images = torch.cat([im for im, _ in parts])
        labels = torch.cat([y for _, y in parts])
        losses, right = job.step(images, labels)
        real = torch.stack([(y != batches.PAD_LABEL).sum() for _, y in parts])
        loss_sum += losses * real
        correct += right
        seen += real
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}


# --- how many runs share a batch ---------------------------------------------------------------------------

CPU_RUNS_PER_BATCH = 8   # a CPU has no memory wall worth probing; batching there only saves fixed costs


def runs_that_fit(peak_one, peak_two, free, reserve=0.1):
    """Runs per batch from two measured peaks (bytes of one probe step at 1 and at 2 runs): a linear fit
    peak(R) = fixed + R * per_run, solved for `free` bytes less a `reserve` fraction; at least 1."""
    per_run = max(1, peak_two - peak_one)
    fixed = peak_one - per_run
    return max(1, int((free * (1 - reserve) - fixed) // per_run))


def measured_runs_per_batch(cfgs, models, loaders, settings):
    """settings.runs_per_batch when given; on a CPU CPU_RUNS_PER_BATCH; on CUDA a probe training step of copies of
    the first runs at 1 and at 2 runs (the real shapes, eager) and runs_that_fit on the free memory."""
    if settings.runs_per_batch:
        return settings.runs_per_batch
    device = settings.device
    if device.type != "cuda" or len(cfgs) < 2:
        return CPU_RUNS_PER_BATCH if device.type != "cuda" else len(cfgs)
    import copy
    probe_settings = runtime.Settings(device=device, bf16=settings.bf16, compile=False, quiet=True)
    peaks = []
    for R in (1, 2):
        copies = copy.deepcopy(models[:R])
        job = Job(cfgs[:R], copies, loaders[:R], probe_settings, list(range(R)))
        images, labels = next(iter(loaders[0]))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        job.batch.train()
        job.step(images.repeat(R, 1, 1, 1), labels.repeat(R))
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
        del job, copies
        torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    return runs_that_fit(peaks[0], peaks[1], free)


# --- the queue's runs, batched where they can be -----------------------------------------------------------


def batch_key(cfg, protocol, settings):
    """Jobs with equal keys can share a batch: classification runs of one graph key and schedule, on the same
    training-split size (VTAB-1k: every task; FGVC: one task). None: the job runs alone (segmentation, the demo,
    FGVC's final protocol with its best-val epoch, data-parallel ranks, runs_per_batch 1)."""
    if (type(cfg).__name__ != "ClassificationConfig" or settings.runs_per_batch == 1 or runtime.world()[1] > 1
            or (protocol == "final" and cfg.task_info.kind == "fgvc")):
        return None
    size = cfg.task if cfg.task_info.kind == "fgvc" else cfg.task_info.kind
    return (classification.graph_key(cfg, settings), cfg.epochs, cfg.warmup_epochs, protocol, size)


def run_jobs(jobs, settings, run_one, pack_of):
    """The queue's jobs (config, protocol, lr source): those sharing a batch_key train in batches (run_batch),
    the others one at a time through run_one. Results in job order (None: a run another process holds)."""
    groups = {}
    for i, (cfg, protocol, _) in enumerate(jobs):
        key = batch_key(cfg, protocol, settings)
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    done = [None] * len(jobs)
    for group in groups.values():
        if len(group) == 1:
            cfg, protocol, source = jobs[group[0]]
            if len(jobs) > 1 and runtime.is_main():
                print(f"=== run {group[0] + 1}/{len(jobs)}: {results.run_name(cfg, protocol)}")
            done[group[0]] = run_one(cfg, protocol, settings, source)
            continue
        if runtime.is_main():
            print(f"=== runs {', '.join(str(i + 1) for i in group)}/{len(jobs)} in batches: "
                  f"{results.run_name(jobs[group[0]][0], jobs[group[0]][1])} ...")
        for i, result in zip(group, run_batch([jobs[i] for i in group], settings, pack_of)):
            done[i] = result
    return done


def run_batch(jobs, settings, pack_of):
    """Jobs of one batch_key end to end, each with its own result file, claim, state file and pack: stored
    results are reused, runs held by another process skipped (None), the rest trained in batches of
    measured_runs_per_batch runs. A diverged run's result says "failed" and has no metrics."""
    out, todo = [None] * len(jobs), []
    for i, (cfg, protocol, source) in enumerate(jobs):
        files = results.run_files(settings.results_dir, cfg, protocol)
        checkpoint = inputs.checkpoint_for(cfg, settings)
        backbone = None if checkpoint is None else results.backbone_identity(checkpoint, settings.cache_folder,
                                                                             settings.trust_pickle)
        if backbone is not None:
            results.check_backbone_fits(backbone, cfg.ssl)
        stored = results.stored_result(files, cfg, backbone)
        if stored is not None:
            out[i] = stored
        elif results.claim_cell(files) is None:
            todo.append((i, files, checkpoint, backbone))
    held = [files for _, files, *_ in todo]

    def load(entry, first):
        i, files, checkpoint, _ = entry
        cfg, protocol, _ = jobs[i]
        runtime.seed_everything(cfg.seed)
        model = config.model_from_config(cfg, cfg.head_size(), checkpoint, verbose=False,
                                         trust_pickle=settings.trust_pickle)
        share_backbone([first or model, model])
        return model, classification.load_data(cfg, settings, protocol)

    try:
        limit = settings.runs_per_batch or (CPU_RUNS_PER_BATCH if settings.device.type != "cuda" else None)
        while todo:
            with runtime.flush_denormals(settings.device):
                chunk, models, data = [], [], []
                while todo and len(chunk) < (limit or 2):
                    chunk.append(todo.pop(0))
                    model, split = load(chunk[-1], models[0] if models else None)
                    models.append(model)
                    data.append(split)
                    if limit is None and len(chunk) == 2:   # the device's memory decides, measured once
                        cfgs = [jobs[i][0] for i, *_ in chunk]
                        loaders = [classification.make_loaders(c, t, e, settings.device)[0]
                                   for c, (t, e) in zip(cfgs, data)]
                        limit = measured_runs_per_batch(cfgs, models, loaders, settings)
                        if runtime.is_main():
                            print(f"{limit} runs per batch (measured)", flush=True)
                cfgs = [jobs[i][0] for i, *_ in chunk]
                tic = time.perf_counter()
                try:
                    outcomes = fit_batched(cfgs, models, [t for t, _ in data], [e for _, e in data], settings,
                                           [files.state for _, files, *_ in chunk])
                except (KeyboardInterrupt, runtime.Stopped) as e:   # the claims are released below
                    saved = [files.state for _, files, *_ in chunk if files.state.is_file()]
                    e.summary = (f"{len(chunk)} runs trained in one batch keep their states ({saved[0]}, ...)"
                                 if saved else f"{len(chunk)} runs trained in one batch had saved no state yet "
                                               "(their first epoch had not finished)")
                    raise
                session = time.perf_counter() - tic
            for (i, files, checkpoint, backbone), model, outcome in zip(chunk, models, outcomes):
                cfg, protocol, source = jobs[i]
                if outcome.diverged:
                    body, model = {"failed": outcome.diverged, "final": {}, "history": outcome.history}, None
                    print(f"{files.result.name}: {outcome.diverged}; recorded as failed, the batch goes on")
                else:
                    body = {"history": outcome.history, "final": outcome.final, **runtime.learned_gates(model),
                            "wall_seconds": outcome.elapsed_before + session / len(chunk),
                            "wall_seconds_this_session": session / len(chunk),
                            "train_seconds": outcome.train_seconds, "eval_seconds": outcome.eval_seconds,
                            "compiled": outcome.compile, "batched_runs": len(chunk)}
                result = results.new_result(cfg, protocol, source, settings, body, runtime.code_version(), backbone)
                if runtime.is_main():
                    results.write_run(files, result, None if model is None else model.prompt_state_dict(),
                                      pack_of(model, cfg, protocol, settings, body["final"], checkpoint))
                    print(f"wrote {files.result}")
                out[i] = result
                results.release_cell(files)
                held.remove(files)
    finally:
        for files in held:
            results.release_cell(files)
    return out
