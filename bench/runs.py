"""The benchmark's (bench/bench.py) whole-run timings and the timing plumbing they share with the step benchmark.

  --end-to-end vtab|cub   one whole run of classification.fit (the paper's recipe, 100 epochs, CUB's per-epoch val
                          pass, final test evaluation) on GENERATED images of the real sizes. Random backbone.
  --segmentation          segmentation.Training's iteration and the sliding-window inference of one 512x683
                          image, sizes from the resolved ADE20K recipe; projected schedule hours.

Timing: `time_loop` times calls between two device syncs; `_compiled_or_eager` makes the compiling call outside
the timed loop; `run_mode_of` says whether the timed calls ran compiled, counted by runtime.Compiled.
"""
import dataclasses
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from bench import report
from harness.data import datasets
import gated_prompt as gp
from harness import config
from harness import runtime
from harness import segmentation
from harness import classification

SSL = "mae"         # pooling only (mean of tokens vs CLS); irrelevant to speed

# "--arch tiny": ViT-B's layout (16px patches, 12 blocks, so SETR-PUP's aux heads on blocks 5 and 9 exist)
# at width 32, with 32-channel segmentation heads: the CPU smoke tests' size, not a real backbone
TINY_ARCH = dict(embed_dim=32, depth=12, num_heads=2)
TINY_HEAD_CHANNELS = 32
ARCH_CHOICES = sorted(gp.ARCHS) + ["tiny"]

# --end-to-end: task = whose recipe (paper_hparams.yaml) is trained; train / val / test = generated images of
# the final protocol's split sizes (CUB: VPT's 5,394 / 600 / 5,794, val evaluated every epoch; a VTAB-1k task:
# 1,000 train, no val, and dtd's largest-class-count test size rounded up to 10,000); targets in bench/report.py
END_TO_END = {
    "vtab": dict(task="dtd", train=1000, val=0, test=10000),
    "cub": dict(task="cub", train=5394, val=600, test=5794),
}
SYNTHETIC_PER_CLASS = 2   # generated images per class, tiled to the requested count

# --segmentation: the test image
SEG_TEST_IMAGE = (512, 683)   # H x W: a typical ADE20K image at the test scale (short side 512)
ADE_VAL_IMAGES = 2000
# harness.kernels' SETR-PUP levers, each timed against today's iteration: alone and together
SEGMENTATION_LEVERS = (("upsample",), ("channels-last",), ("upsample", "channels-last"))


def arch_spec(name):
    """(gated_prompt arch name, vit_config overrides or None) for an --arch choice."""
    return ("vit_base", dict(TINY_ARCH)) if name == "tiny" else (name, None)


def patch_size_of(name):
    return gp.ARCHS[arch_spec(name)[0]][0]


# -----------------------------------------------------------------------------
# Devices and timing


def compile_enabled(args, device):
    """--compile / --no-compile, else torch.compile on CUDA only (as runtime.Settings.for_device)."""
    return args.compile if args.compile is not None else device.type == "cuda"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _release(device):
    """Give the last measurement's GPU memory back before the next one (on a CPU reference counting suffices)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def time_loop(fn, batch, steps, warmup, repeats, device):
    """Images/s of each repetition: `warmup` untimed calls, then `repeats` x (`steps` calls between two
    device syncs; no host sync inside a repetition)."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


def _compiled_or_eager(make, compile, device, what):
    """(fn, counted, seconds of the compiling call or None). make(compile) returns (function to time, its
    runtime.Compiled or None). When compiling, its first call (made here, outside the timed loop) compiles; if
    that fails for any reason but memory, make(False) is timed instead and `counted` is the reason (a str)."""
    if not compile:
        return make(False)[0], None, None
    fn, counted = make(compile)
    try:
        start = time.perf_counter()
        fn()
        _sync(device)
        return fn, counted, time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any compiler failure: time eager instead, and say so
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        mode = f"eager (torch.compile failed on the {what}: {type(err).__name__}: {reason})"
        print(f"  {mode}", flush=True)
        return make(False)[0], mode, None


def run_mode_of(counted):
    """"torch.compile" when every timed call ran a compiled graph (counted, not the setting), else why not."""
    if counted is None:
        return "eager"
    if isinstance(counted, str):
        return counted
    if counted.compiled_calls == counted.calls:
        return "torch.compile"
    return f"eager (dynamo ran {counted.calls - counted.compiled_calls} of {counted.calls} calls uncompiled)"


def sdpa_kernel(model, images, device, bf16):
    """Which kernel scaled_dot_product_attention picks for this model's attention in training (flash, cuDNN,
    efficient or math; torch._fused_sdp_choice on the real query/key/value of one forward on two images);
    "explicit softmax" for the reference path, which does not call it."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        if not seen:
            seen.append(SDPBackend(torch._fused_sdp_choice(q, k, v, *args, **kwargs)).name)
        return real(q, k, v, *args, **kwargs)
    F.scaled_dot_product_attention = spy
    try:
        with runtime.autocast(device, bf16):
            model.train()(images[:2])
    finally:
        F.scaled_dot_product_attention = real
    names = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cuDNN",
             "MATH": "math"}
    return names.get(seen[0], seen[0]) + (" (CPU)" if device.type == "cpu" else "") if seen else "explicit softmax"

# -----------------------------------------------------------------------------
# --end-to-end: one whole run of the classification harness on generated data


def synthetic_split(task, split, n, size, seed=0):
    """n generated uint8 images of size x size with the task's classes, as a datasets.ImageSplit.

    SYNTHETIC_PER_CLASS images per class come from datasets.make_synthetic_images (class-conditional stripes,
    so the run learns something) and are tiled to n; labels cycle through the classes. Generating every
    image separately would take minutes and ~10x the uint8 array in float temporaries at CUB's size, and
    the content does not change the speed."""
    classes = datasets.num_classes(task)
    per_class = max(1, min(SYNTHETIC_PER_CLASS, math.ceil(n / classes)))
    bank, _ = datasets.make_synthetic_images(classes, per_class, size, seed=seed)   # class-major
    i = torch.arange(n)
    labels = i % classes
    return datasets.ImageSplit.from_dense(task, split, bank[labels * per_class + (i // classes) % per_class], labels)


def end_to_end_config(args, run):
    """The paper's recipe for the run's task (config.resolve(task, "mae", method)) with the bench flags that
    override it."""
    arch, overrides = arch_spec(args.arch)
    return config.resolve(END_TO_END[run]["task"], SSL, args.method, arch=arch, arch_overrides=overrides,
                           img_size=args.img_size, epochs=args.epochs,
                           batch_size=args.batch[0] if args.batch else None,
                           num_prompts=args.prompts[0] if args.prompts else None)


def end_to_end_settings(args, device):
    """How the harness runs there: bf16 autocast on CUDA (on a CPU it is slower than fp32), torch.compile
    as compile_enabled (mode --compile-mode), quiet."""
    return runtime.Settings(device=device, bf16=device.type == "cuda", compile=compile_enabled(args, device),
                            compile_mode=args.compile_mode, quiet=True, kernels=tuple(args.kernels))


def projected_wall_s(setup_s, epoch1_s, train_s, epochs, eval_s, full_epochs):
    """The wall of a `full_epochs` run from a shorter one: setup, then the measured training, then each missing
    epoch at the mean of epochs 2.. (their share of train_s: train_s also holds the per-epoch sync and state
    save that the epochs' own seconds leave out), then the final evaluation. None without a later epoch."""
    if epochs < 2:
        return None
    later = (train_s - epoch1_s) / (epochs - 1)
    return setup_s + train_s + (full_epochs - epochs) * later + eval_s


def run_end_to_end(args, device, run):
    """Generate the data, then time what classification.run_classification does after loading data: build the model,
    then classification.fit (setup, epochs with CUB's per-epoch val pass, final test evaluation). Returns a dict."""
    spec, cfg, settings = END_TO_END[run], end_to_end_config(args, run), end_to_end_settings(args, device)
    task, size = cfg.task, cfg.img_size
    fgvc = datasets.task_kind(task) == "fgvc"
    n_train, n_test = args.train_images or spec["train"], args.test_images or spec["test"]
    n_val = (args.val_images or spec["val"]) if fgvc else 0
    cached = size * datasets.FGVC_RESIZE // datasets.IMAGE_SIZE if fgvc else size   # 256 / 224
    print(f"end-to-end {run}: {task}/{SSL} recipe, {cfg.method}, {cfg.num_prompts} prompt(s), batch "
          f"{cfg.batch_size}, {cfg.epochs} epochs, {args.arch} (random weights) | {n_train} train / {n_val} "
          f"val / {n_test} test generated images cached at {cached}px{f', random {size}px crop + flip' if fgvc else ''}"
          f" | {runtime.device_name(device)} | {'bf16' if settings.bf16 else 'fp32'}"
          f"{' + compile' if settings.compile else ', eager'}", flush=True)
    tic = time.perf_counter()
    evals = {"test": synthetic_split(task, "test", n_test, cached, seed=1)}
    if n_val:
        evals["val"] = synthetic_split(task, "val", n_val, cached, seed=2)
    train_split = synthetic_split(task, "train", n_train, cached, seed=0)
    generation_s = time.perf_counter() - tic
    outcome, timing = time_training_run(cfg, settings, train_split, evals)
    full_epochs = config.HPARAMS["recipe"]["epochs"]
    result = end_to_end_result(run, cfg, settings, outcome, timing, (n_train, n_val, n_test), cached, full_epochs)
    result.update(arch=args.arch, data_generation_s=generation_s)
    print(format_end_to_end(result, device, full_epochs), flush=True)
    return result


def time_training_run(cfg, settings, train_split, eval_splits):
    """classification.run_classification after its data loading, timed: the model built (seeded), then classification.fit.
    Returns (classification.Outcome, timings)."""
    device = settings.device
    _release(device)
    _reset_memory(device)
    start = time.perf_counter()
    runtime.seed_everything(cfg.seed)
    model = config.model_from_config(cfg, cfg.head_size(), verbose=False)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        outcome = classification.fit(cfg, model, train_split, eval_splits, settings, Path(tmp) / "state.pt")
    wall_s = time.perf_counter() - start
    timing = {"setup_s": build_s + outcome.setup_seconds, "wall_s": wall_s, "images_on_gpu": outcome.images_on_device,
              "peak_memory_gib": _peak_memory_gib(device)}
    del model
    _release(device)
    return outcome, timing


def end_to_end_result(run, cfg, settings, outcome, timing, sizes, cached, full_epochs):
    """The end-to-end numbers as a dict; projected_wall_s when fewer epochs than the recipe's ran. sizes: the
    generated (train, val, test) image counts."""
    spec, device = END_TO_END[run], settings.device
    n_train, n_val, n_test = sizes
    epoch_s = [record["seconds"] for record in outcome.history]
    epochs = len(epoch_s)
    later = (outcome.train_seconds - epoch_s[0]) / (epochs - 1) if epochs > 1 else None
    full_size = (sizes, cfg.img_size) == ((spec["train"], spec["val"], spec["test"]), datasets.IMAGE_SIZE)
    projected = (projected_wall_s(timing["setup_s"], epoch_s[0], outcome.train_seconds, epochs,
                                  outcome.eval_seconds, full_epochs) if epochs != full_epochs else None)
    target_s = report.END_TO_END_TARGETS[run][0]
    estimate = timing["wall_s"] if epochs == full_epochs else projected
    return {
        "run": run, "task": cfg.task, "method": cfg.method, "num_prompts": cfg.num_prompts,
        "batch_size": cfg.batch_size, "epochs": epochs, "train_images": n_train, "val_images": n_val,
        "test_images": n_test, "img_size": cfg.img_size, "cached_size": cached, "bf16": settings.bf16,
        "compiled": bool(outcome.compile["all_compiled"]), "compiled_calls": outcome.compile["compiled_calls"],
        "graphs": outcome.compile["graphs"],
        "images_on_gpu": timing["images_on_gpu"], "setup_s": timing["setup_s"], "epoch1_s": epoch_s[0],
        "epoch_s": epoch_s, "later_epoch_s": later, "train_s": outcome.train_seconds,
        "test_eval_s": outcome.eval_seconds, "wall_s": timing["wall_s"],
        "train_images_per_s": n_train / later if later else None,
        "test_acc": outcome.final["test_acc"], "peak_memory_gib": timing["peak_memory_gib"],
        "target_s": target_s, "full_size": full_size, "full_epochs": full_epochs, "projected_wall_s": projected,
        "target_met": (estimate < target_s) if device.type == "cuda" and full_size and estimate is not None else None,
    }


def format_end_to_end(r, device, full_epochs):
    lines = [("data generation (not counted)", f"{r['data_generation_s']:.1f} s"),
             ("setup (model build, loaders)", f"{r['setup_s']:.2f} s"),
             ("epoch 1" + (" (includes compiling)" if r["compiled"] else ""), f"{r['epoch1_s']:.2f} s")]
    if r["later_epoch_s"] is not None:
        lines.append(("epoch 2" if r["epochs"] == 2 else f"mean epoch, epochs 2-{r['epochs']}",
                      f"{r['later_epoch_s']:.3f} s   ({r['train_images_per_s']:.0f} train images/s)"))
    lines += [(f"train, {r['epochs']} epochs" + (f" (+ {r['val_images']} val images each)" if r["val_images"] else ""),
               f"{r['train_s']:.2f} s"),
              (f"final test evaluation ({r['test_images']} images)", f"{r['test_eval_s']:.2f} s"),
              ("total wall (setup + train + evaluation)", f"{r['wall_s']:.2f} s"
               + (_target(r, device) if r["projected_wall_s"] is None else ""))]
    if r["projected_wall_s"] is not None:
        lines.append((f"projected wall for {full_epochs} epochs", f"{r['projected_wall_s']:.1f} s" + _target(r, device)))
    lines += [("images kept on the GPU", "yes" if r["images_on_gpu"] else "no"),
              ("test accuracy (generated data)", f"{r['test_acc']:.2f} %")]
    if r["peak_memory_gib"] is not None:
        lines.append(("peak GPU memory", f"{r['peak_memory_gib']:.2f} GiB"))
    width = max(len(name) for name, _ in lines) + 2
    return "\n".join(f"  {name:<{width}}{value}" for name, value in lines)


def _target(r, device):
    """The target beside the whole-run figure, on CUDA (the targets are for one H100)."""
    if device.type != "cuda":
        return ""
    text = f"   target < {r['target_s']} s on one H100 ({report.END_TO_END_TARGETS[r['run']][1]})"
    if r["target_met"] is None:
        return text + ": not comparable (reduced sizes)"
    return text + (": met" if r["target_met"] else ": MISSED")

# -----------------------------------------------------------------------------
# --segmentation: the SETR-PUP ADE20K training iteration and sliding-window inference


def segmentation_config(args):
    """The resolved ADE20K recipe (SETR-PUP), with the bench flags that override it."""
    arch, overrides = arch_spec(args.arch)
    tiny = {"head_channels": TINY_HEAD_CHANNELS} if args.arch == "tiny" else {}
    return config.resolve("ade20k", SSL, args.method, arch=arch, arch_overrides=overrides, img_size=args.img_size,
                           batch_size=args.batch[0] if args.batch else None,
                           num_prompts=args.prompts[0] if args.prompts else None, **tiny)


def window_count(model, image, crop, stride):
    """Windows segmentation.predict slides over `image` (uint8 [3, H, W]) at single scale, counted by running
    it with `model` wrapped in a recorder of the batch sizes it sees."""
    seen = []

    def recording(x):
        seen.append(len(x))
        return model(x)
    segmentation.predict(recording, image, crop, stride)
    return sum(seen)


def time_segmentation(args, device):
    """Time segmentation.py's training iteration (runtime.make_train_step with setr_loss, then the poly lr step)
    on random data, then segmentation.predict (single scale, sliding window) on one 512x683 image.
    Returns every number as a dict."""
    run = segmentation_setup(args, device)
    train = time_segmentation_training(args, device, run)
    infer = time_segmentation_inference(args, device, run)
    result = segmentation_result(args, run, train, infer)
    print(format_segmentation(result), flush=True)
    return result


def segmentation_setup(args, device):
    """Config, settings and random data; the model, optimizer, schedule and step are segmentation.Training's
    (built by time_segmentation_training, without ADE20K on disk)."""
    cfg = segmentation_config(args)
    settings = runtime.Settings(device=device, bf16=device.type == "cuda", compile=compile_enabled(args, device),
                                compile_mode=args.compile_mode, quiet=True, kernels=tuple(args.kernels))
    batch, crop = cfg.batch_size, cfg.img_size
    print(f"segmentation: SETR-PUP (aux heads on blocks {', '.join(map(str, cfg.aux_blocks))}) on {args.arch} "
          f"(random weights), {cfg.method}, {cfg.num_prompts} prompts, {segmentation.NUM_CLASSES} classes, "
          f"batch {batch} of {crop}x{crop} random crops | {runtime.device_name(device)} | "
          f"{'bf16 autocast' if settings.bf16 else 'fp32'}{', compile requested' if settings.compile else ', eager'}",
          flush=True)
    _release(device)
    gen = torch.Generator().manual_seed(0)
    return {"cfg": cfg, "settings": settings, "bf16": settings.bf16, "compile": settings.compile,
            "images": torch.randn(batch, 3, crop, crop, generator=gen).to(device),
            "labels": torch.randint(0, segmentation.NUM_CLASSES, (batch, crop, crop), generator=gen).to(device),
            "test_image": torch.randint(0, 256, (3,) + SEG_TEST_IMAGE, dtype=torch.uint8, generator=gen).to(device)}


def time_segmentation_training(args, device, run):
    """Images/s of segmentation.Training.iteration (the step, then the poly lr step) on the random batch.
    Leaves the Training in run["training"] for the inference timing."""
    cfg = run["cfg"]

    def make(c):
        run["training"] = segmentation.Training(cfg, dataclasses.replace(run["settings"], compile=c), verbose=False)
        run["training"].model.train()
        return (lambda: run["training"].iteration(run["images"], run["labels"])), run["training"].step.compiled
    _reset_memory(device)
    fn, counted, compile_s = _compiled_or_eager(make, run["compile"], device, "training step")
    rates = time_loop(fn, cfg.batch_size, args.steps, args.warmup, args.repeats, device)
    return {"rates": rates, "mode": run_mode_of(counted), "compile_s": compile_s,
            "peak_memory_gib": _peak_memory_gib(device)}


def time_segmentation_inference(args, device, run):
    """Seconds per image of segmentation.predict at single scale, and the windows it slides."""
    cfg, model, image = run["cfg"], run["training"].model, run["test_image"]
    crop, stride = cfg.img_size, cfg.slide_stride
    model.eval()

    def make(c):
        forward = runtime.compiled(model, c, args.compile_mode)
        return (lambda: segmentation.predict(forward, image, crop, stride, bf16=run["bf16"])), (forward if c else None)
    _reset_memory(device)
    fn, counted, compile_s = _compiled_or_eager(make, run["compile"], device, "inference")
    # the geometry alone decides the windows: a zero model stands in for the segmenter
    windows = window_count(lambda x: torch.zeros(len(x), 1, *x.shape[-2:], device=x.device), image, crop, stride)
    rates = time_loop(fn, 1, args.steps, max(1, args.warmup), args.repeats, device)
    return {"s_per_image": 1 / statistics.median(rates), "mode": run_mode_of(counted), "compile_s": compile_s,
            "windows": windows, "peak_memory_gib": _peak_memory_gib(device)}


def segmentation_result(args, run, train, infer):
    cfg = run["cfg"]
    batch, crop, iters = cfg.batch_size, cfg.img_size, cfg.iters
    rates = train["rates"]
    iters_per_s = statistics.median(rates) / batch
    test_size = segmentation.test_scales(*SEG_TEST_IMAGE, crop, [1.0])[0]
    return {
        "arch": args.arch, "method": cfg.method, "num_prompts": cfg.num_prompts, "batch_size": batch,
        "crop_size": crop, "slide_stride": cfg.slide_stride, "aux_blocks": list(cfg.aux_blocks),
        "num_classes": segmentation.NUM_CLASSES, "bf16": run["bf16"],
        "train_mode": train["mode"], "infer_mode": infer["mode"], "compiled": train["mode"] == "torch.compile",
        "train_compile_s": train["compile_s"], "infer_compile_s": infer["compile_s"],
        "iters_per_s": iters_per_s, "iters_per_s_min": min(rates) / batch, "iters_per_s_max": max(rates) / batch,
        "images_per_s": statistics.median(rates), "train_peak_memory_gib": train["peak_memory_gib"],
        "projected_iters": iters, "projected_s": iters / iters_per_s, "projected_hours": iters / iters_per_s / 3600,
        "infer_image": list(SEG_TEST_IMAGE), "infer_scaled_to": list(test_size), "infer_windows": infer["windows"],
        "infer_s_per_image": infer["s_per_image"], "infer_peak_memory_gib": infer["peak_memory_gib"],
        "projected_val_eval_s": ADE_VAL_IMAGES * infer["s_per_image"],   # single scale, if all were this size
    }


def format_segmentation(r):
    def mem(gib):
        return f"   peak {gib:.2f} GiB" if gib is not None else ""
    lines = [
        (f"train iteration ({r['train_mode']})",
         f"{r['iters_per_s']:.3f} it/s ({r['iters_per_s_min']:.3f}-{r['iters_per_s_max']:.3f})   "
         f"{r['images_per_s']:.1f} images/s" + mem(r["train_peak_memory_gib"])),
        (f"{r['projected_iters']:,} iterations (the schedule)", f"{r['projected_hours']:.2f} h projected"),
        (f"slide inference, one {r['infer_image'][0]}x{r['infer_image'][1]} image ({r['infer_mode']})",
         f"{r['infer_s_per_image']:.4f} s ({r['infer_windows']} windows of {r['crop_size']}px, stride "
         f"{r['slide_stride']}, at {r['infer_scaled_to'][0]}x{r['infer_scaled_to'][1]})"
         + mem(r["infer_peak_memory_gib"])),
        (f"{ADE_VAL_IMAGES:,} val images, single scale", f"{r['projected_val_eval_s']:.0f} s projected"),
    ]
    width = max(len(name) for name, _ in lines) + 2
    return "\n".join(f"  {name:<{width}}{value}" for name, value in lines)


def time_segmentation_lever(args, device, levers):
    """segmentation.Training's iteration (time_segmentation_training) today and with `levers` (harness.kernels, via
    runtime.Settings.kernels) on: same seed, weights and batch, in this unit; both rows and their ratio."""
    run = segmentation_setup(args, device)
    batch, rows = run["cfg"].batch_size, {}
    for name, names in (("today", ()), ("lever", tuple(levers))):
        run["settings"] = dataclasses.replace(run["settings"], kernels=names)
        train = time_segmentation_training(args, device, run)
        rows[name] = {"kernels": list(names), "iters_per_s": statistics.median(train["rates"]) / batch,
                      "iters_per_s_min": min(train["rates"]) / batch, "iters_per_s_max": max(train["rates"]) / batch,
                      "mode": train["mode"], "compile_s": train["compile_s"],
                      "peak_memory_gib": train["peak_memory_gib"]}
        del run["training"]
        _release(device)
    ratio = rows["lever"]["iters_per_s"] / rows["today"]["iters_per_s"]
    print(f"  SETR-PUP iteration with {'+'.join(levers)}: {rows['lever']['iters_per_s']:.3f} it/s vs today's "
          f"{rows['today']['iters_per_s']:.3f} -> {ratio:.3f}x", flush=True)
    return {"kernels": list(levers), "batch_size": batch, "crop_size": run["cfg"].img_size, "today": rows["today"],
            "lever": rows["lever"], "ratio": ratio}

# -----------------------------------------------------------------------------
# --report's stage "table": an lr sweep batched vs one at a time, and Table 2 projected from measured whole runs

TABLE2_CELLS = 114   # Table 2: 19 VTAB-1k tasks x 2 backbones x 3 methods, one final run each
SWEEP_SPLIT = dict(train=800, val=200)   # a VTAB-1k sweep run trains on train800 and is scored on val200


def time_lr_sweep(args, device, full_epochs=None):
    """The VTAB end-to-end run's lr sweep (paper_hparams.yaml's 7-point grid, the sweep protocol's 800 / 200
    generated images) trained one run after another (graphs compiled by the first, reused by the others) and as
    one batched job (harness.batched), in this process. Seconds of each, their ratio, and each projected to the
    recipe's epochs (the measured wall plus each missing epoch at the mean of epochs 2..)."""
    from harness import batched
    cfg, settings = end_to_end_config(args, "vtab"), end_to_end_settings(args, device)
    cfgs = [cfg.replace(**point) for point in config.sweep_grid(cfg)]
    n_train = args.train_images or SWEEP_SPLIT["train"]
    n_val = args.val_images or SWEEP_SPLIT["val"]
    train = synthetic_split(cfg.task, "train", n_train, cfg.img_size, seed=0)
    evals = {"val": synthetic_split(cfg.task, "val", n_val, cfg.img_size, seed=2)}
    full_epochs = full_epochs or config.HPARAMS["recipe"]["epochs"]

    def projected(wall_s, history):
        later = [h["seconds"] for h in history[1:]]
        return wall_s + (full_epochs - len(history)) * statistics.mean(later) if later else None
    print(f"lr sweep: {len(cfgs)} lrs {[c.lr for c in cfgs]} of the vtab run ({cfg.method}, {cfg.num_prompts} "
          f"prompt(s), batch {cfg.batch_size}, {cfg.epochs} epochs) | {n_train} train / {n_val} val generated "
          f"images | {runtime.device_name(device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        _release(device)
        tic, alone_projected = time.perf_counter(), 0.0
        for i, c in enumerate(cfgs):
            start = time.perf_counter()
            runtime.seed_everything(c.seed)
            model = config.model_from_config(c, c.head_size(), verbose=False)
            outcome = classification.fit(c, model, train, evals, settings, Path(tmp) / f"alone{i}.pt")
            alone_projected += projected(time.perf_counter() - start, outcome.history) or 0.0
            del model
        alone_s = time.perf_counter() - tic
        _release(device)
        tic = time.perf_counter()
        models = []
        for c in cfgs:
            runtime.seed_everything(c.seed)
            models.append(config.model_from_config(c, c.head_size(), verbose=False))
        outcomes = batched.fit_batched(cfgs, models, [train] * len(cfgs), [evals] * len(cfgs), settings,
                                       [Path(tmp) / f"batched{i}.pt" for i in range(len(cfgs))])
        batched_s = time.perf_counter() - tic
        del models
        _release(device)
    result = {"points": len(cfgs), "lrs": [c.lr for c in cfgs], "epochs": cfg.epochs, "full_epochs": full_epochs,
              "train_images": n_train, "val_images": n_val, "one_at_a_time_s": alone_s, "batched_s": batched_s,
              "ratio": alone_s / batched_s, "one_at_a_time_projected_s": alone_projected if cfg.epochs > 1 else None,
              "batched_projected_s": projected(batched_s, outcomes[0].history),
              "compiled": bool(settings.compile), "bf16": settings.bf16}
    print(f"lr sweep: one at a time {alone_s:.1f} s, batched {batched_s:.1f} s: {result['ratio']:.2f}x", flush=True)
    return result


def table2_projection(vtab_warm, sweep):
    """Table 2 and Table 2 --sweep on this device, from measured whole runs: each final run at the warm VTAB run's
    wall projected to the recipe's epochs (dtd's test size rounded up to 10,000 for every task: an upper bound),
    each cell's sweep at the batched sweep's projected wall. None where a unit is missing or too short."""
    final_s = (vtab_warm or {}).get("projected_wall_s") or (vtab_warm or {}).get("wall_s")
    if not final_s:
        return None
    table2_s = TABLE2_CELLS * final_s
    sweep_s = (sweep or {}).get("batched_projected_s")
    alone_s = (sweep or {}).get("one_at_a_time_projected_s")
    return {"cells": TABLE2_CELLS, "final_run_s": final_s, "table2_s": table2_s,
            "table2_sweep_s": table2_s + TABLE2_CELLS * sweep_s if sweep_s else None,
            "table2_sweep_one_at_a_time_s": table2_s + TABLE2_CELLS * alone_s if alone_s else None}


# -----------------------------------------------------------------------------
# --report's mini Table 2: whole runs one at a time (as before: compiler reset per run, a state every epoch) vs
# runs of one graph key batched (harness.batched) and compiled once, in one process


def mini_table_configs(arch="tiny", runs_per_key=6, epochs=3, img_size=32):
    """A mini Table 2 of 2 * runs_per_key runs: two methods (two graph keys) x tasks of different class counts x
    seeds, the paper's recipe on a small model, 64 generated training images at batch 16 (4 steps an epoch)."""
    arch_name, overrides = arch_spec(arch)
    overrides = dict(overrides or {}, patch_size=8) if arch == "tiny" else overrides
    tasks = ("dtd", "eurosat", "oxford_iiit_pet")
    cfgs = []
    for method in ("gated+temp", "vpt-deep"):
        for i in range(runs_per_key):
            cfgs.append(config.resolve(tasks[i % len(tasks)], SSL, method, arch=arch_name, arch_overrides=overrides,
                                       img_size=img_size, epochs=epochs, warmup_epochs=1, batch_size=16,
                                       num_prompts=4, seed=42 + i // len(tasks)))
    return cfgs


def mini_table_data(cfg):
    """64 generated training images and 32 test images of the run's task, at the run's size."""
    train = synthetic_split(cfg.task, "train", 64, cfg.img_size, seed=cfg.seed)
    return train, {"test": synthetic_split(cfg.task, "test", 32, cfg.img_size, seed=cfg.seed + 1)}


def mini_table_model(cfg):
    """The run's model on one backbone (random weights seeded 0, as one checkpoint), prompts and head seeded by
    the run."""
    runtime.seed_everything(0)
    backbone = config.model_from_config(cfg, cfg.head_size(), verbose=False).backbone_state_dict()
    runtime.seed_everything(cfg.seed)
    model = config.model_from_config(cfg, cfg.head_size(), verbose=False)
    model.load_state_dict(backbone, strict=False)
    return model


def time_mini_table(device, compile="aot_eager", arch="tiny", runs_per_key=6, epochs=3):
    """Seconds for the mini Table 2 one run at a time as before (runtime.reset_compiler before every run, the
    resumable state every epoch) and batched with graphs compiled once per key (batched.fit_batched, state every
    runtime.SAVE_EVERY epochs), in this process, and their ratio. `compile`: the torch.compile backend (on a CPU
    "aot_eager": dynamo's and AOTAutograd's tracing, the fixed cost a run pays, without inductor's codegen)."""
    from harness import batched
    cfgs = mini_table_configs(arch, runs_per_key, epochs)
    settings = runtime.Settings(device=device, bf16=False, compile=compile, quiet=True)
    data = [mini_table_data(c) for c in cfgs]
    save_every = runtime.SAVE_EVERY
    with tempfile.TemporaryDirectory() as tmp, runtime.flush_denormals(device):
        runtime.SAVE_EVERY = 1
        try:
            tic = time.perf_counter()
            alone = []
            for i, (cfg, (train, evals)) in enumerate(zip(cfgs, data)):
                runtime.reset_compiler()
                outcome = classification.fit(cfg, mini_table_model(cfg), train, evals, settings,
                                             Path(tmp) / f"alone{i}.pt")
                alone.append(outcome.final["test_acc"])
            alone_s = time.perf_counter() - tic
        finally:
            runtime.SAVE_EVERY = save_every
        runtime.reset_compiler()
        tic = time.perf_counter()
        together, jobs = [], 0
        for key_cfgs in _by_key(cfgs):
            idx = [cfgs.index(c) for c in key_cfgs]
            outcomes = batched.fit_batched(key_cfgs, [mini_table_model(c) for c in key_cfgs],
                                           [data[i][0] for i in idx], [data[i][1] for i in idx], settings,
                                           [Path(tmp) / f"batched{i}.pt" for i in idx])
            together += [o.final["test_acc"] for o in outcomes]
            jobs += 1
        batched_s = time.perf_counter() - tic
    result = {"runs": len(cfgs), "graph_keys": jobs, "epochs": epochs, "arch": arch, "compile": str(compile),
              "device": runtime.device_name(device), "one_at_a_time_s": alone_s, "batched_s": batched_s,
              "ratio": alone_s / batched_s}
    print(format_mini_table(result), flush=True)
    return result


def _by_key(cfgs):
    order = classification.by_graph_key(cfgs)
    groups = {}
    for i in order:
        groups.setdefault(classification.graph_key(cfgs[i]), []).append(cfgs[i])
    return list(groups.values())


def format_mini_table(r):
    return (f"mini Table 2 ({r['runs']} runs, {r['graph_keys']} graph keys, {r['epochs']} epochs, {r['arch']}, "
            f"compile backend {r['compile']}, {r['device']}): one at a time {r['one_at_a_time_s']:.1f} s, batched + "
            f"compiled once {r['batched_s']:.1f} s: {r['ratio']:.2f}x")

