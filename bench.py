"""Throughput benchmark for Gated Prompt Tuning: the fast path against the official code's numerics.

Every config comes from recipes.resolve and every model from recipes.model_from_config; the training step is
runtime.make_train_step with trainer.classification_loss (segmentation: segmentation.setr_loss), the
evaluation step trainer.make_eval_step -- the functions the harness trains and evaluates with. Two paths:

  fast       bf16 autocast + fused attention (SDPA) + torch.compile, frozen weights stored in bf16 on CUDA:
             what training runs;
  reference  fp32, explicit-softmax attention, eager: the official code's numerics;

starting from the same weights, both stepping runtime.make_optimizer's SGD (fused on CUDA). Printed:
images/s (median and min-max over --repeats), achieved TFLOP/s (analytic count, see `flops`), the fraction
of the GPU's bf16 dense peak, peak GPU memory and the fast/reference speed-up, all measured in the same run.
torch.compile runs on CUDA unless --no-compile (--compile forces it on a CPU, where compiling takes minutes).

    python bench.py --report                          # everything below in one process -> BENCHMARKS.md
    python bench.py                                   # ViT-B/16, gated+temp, 100 prompts, batch 64
    python bench.py --prompts 10 100 --batch 32 128 --json bench.json
    python bench.py --sweep-prompts --sweep-batch     # fast path: images/s vs prompts and vs batch
    python bench.py --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 --warmup 1 --repeats 2

On a CPU the same code runs (bf16 autocast works there too); peak fraction and memory are left blank.

  --end-to-end vtab|cub   one whole run of trainer.make_loaders + trainer.train (the paper's recipe, 100
                          epochs, final test evaluation) on GENERATED images of the real sizes: vtab = 1,000
                          train / 10,000 test at 224x224 (the dtd/MAE recipe), cub = 5,994 train cached at 256
                          (GPU random crop + flip) / 5,794 test (the cub/MAE recipe). Random backbone.
  --segmentation          the SETR-PUP ADE20K training iteration and the sliding-window inference of one
                          512x683 image, sizes from the resolved ADE20K recipe; projected schedule hours.
  --report                the targets' figures in one process: the training step fast vs reference at 100
                          prompts / batch 64 and 1 prompt / batch 128, both sweeps (fast path without
                          compile), both end-to-end runs for a few epochs projected to 100; writes
                          BENCHMARKS.md and benchmarks.json (--out-dir). `--report --arch tiny` is the
                          seconds-long CPU smoke run of the same code.
"""
import argparse
import datetime
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import gated_prompt as gp
import recipes
import runtime
import segmentation
import trainer

NUM_CLASSES = 100   # `flops`' default head size; the head's FLOPs are negligible whatever it is
SSL = "mae"         # pooling only (mean of tokens vs CLS); irrelevant to speed
STEP_TASK = "dtd"   # whose recipe (lr, gate init, prompt dropout, head size) the step benchmark resolves

# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s, matched against the device name in order
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),      # SXM ("H100 80GB HBM3")
    ("H200", 989.0),      # also GH200
    ("A100", 312.0),
)
SWEEP_PROMPTS = (1, 10, 50, 100, 200)
SWEEP_BATCH = (16, 32, 64, 128, 256)

# "--arch tiny": ViT-B's layout (16px patches, 12 blocks, so SETR-PUP's aux heads on blocks 5 and 9 exist)
# at width 32, with 32-channel segmentation heads: the CPU smoke tests' size, not a real backbone
TINY_ARCH = dict(embed_dim=32, depth=12, num_heads=2)
TINY_HEAD_CHANNELS = 32
ARCH_CHOICES = sorted(gp.ARCHS) + ["tiny"]

# --end-to-end: task = whose recipe (paper_hparams.yaml) is trained; train / test = generated images;
# target_s = the target for the whole run on one H100
END_TO_END = {
    "vtab": dict(task="dtd", train=1000, test=10000, target_s=60, label="VTAB-1k task"),
    "cub": dict(task="cub", train=5994, test=5794, target_s=300, label="CUB"),
}
SYNTHETIC_PER_CLASS = 2   # generated images per class, tiled to the requested count

# --segmentation: the test image
SEG_TEST_IMAGE = (512, 683)   # H x W: a typical ADE20K image at the test scale (short side 512)
ADE_VAL_IMAGES = 2000

# --report: (prompts, batch, train-step images/s target on one H100, task). The shapes are the CUB and the
# VTAB (dtd) recipes', and the eval step runs at the harness's eval batch, so the end-to-end runs after them
# compile the same graphs (inductor's cache serves them)
REPORT_POINTS = ((100, 64, 2700, "cub"), (1, 128, 4200, "dtd"))
TARGET_SPEEDUP = 9.0
TARGET_PEAK_FRACTION = 0.5        # an aim, not a requirement
TARGET_MEMORY_GIB = 6.0           # the fast training step at 100 prompts, batch 64
REPORT_DEFAULTS = dict(steps=10, warmup=3, repeats=3, epochs=5)
# --report --arch tiny: sizes for a CPU smoke run of the same code; its step batches are the report's / 16
REPORT_SMOKE = dict(img_size=32, steps=2, warmup=1, repeats=2, epochs=3, train_images=48, test_images=32)
SMOKE_BATCH_DIVISOR = 16
TABLE_DEFAULTS = dict(steps=20, warmup=5, repeats=5)
CPU_SMOKE_NOTE = "CPU smoke run, not a GPU measurement"


def arch_spec(name):
    """(gated_prompt arch name, vit_config overrides or None) for an --arch choice."""
    return ("vit_base", dict(TINY_ARCH)) if name == "tiny" else (name, None)


def patch_size_of(name):
    return gp.ARCHS[arch_spec(name)[0]][0]

# -----------------------------------------------------------------------------
# FLOP count


def flops(cfg, num_prompts, num_classes=NUM_CLASSES, insert_at=1, trainable_temperatures=False):
    """Analytic matmul FLOPs per image, counting a [m,k] x [k,n] product as 2*m*n*k.

    With D = width, L = depth, r = MLP ratio (4), p = patch size, N = (img/p)^2 patches and
    T = 1 + prompts + N tokens in a block (blocks before `insert_at` see no prompts), per image:

      patch embedding   2 * N * (3 p^2) * D              (a matmul in disguise)
      per block linear  2 * T * (3D^2 + D^2 + 2 r D^2)   qkv, proj, fc1, fc2  = 24 T D^2 for r = 4
      per block attn    2 * T^2 * D  (Q K^T)  +  2 * T^2 * D  (softmax(.) V)  = 4 T^2 D
      head              2 * D * classes

    Training = forward + backward, and the backward is cheap because the backbone is frozen:
      * linear layers need only the gradient w.r.t. their input (dX = dY W^T, 1x forward), not w.r.t.
        their frozen weights, so they cost 2x forward, not the usual 3x;
      * the attention products multiply two activations, and both need gradients: 3x forward;
      * the patch embedding gets no backward at all: prompts are inserted after it and nothing before
        it is trainable, so no gradient flows into it (likewise blocks before the first prompted one);
      * the head trains normally (3x forward), negligible.
    So a training step is ~2x the forward FLOPs (slightly more through attention), not 3x; a linear
    probe (no prompts) is ~1x. Norms, GELU, softmax, gates and the optimizer step are not counted
    (element-wise, the usual MFU convention), nor is the recomputation inside flash-attention's
    backward: these are model FLOPs, the same for the fast and the reference path.

    Returns a dict: forward components, "forward" and "train" totals.
    """
    D, L, p, r = cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.mlp_ratio
    N = (cfg.img_size // p) ** 2
    linear = attention = linear_bwd = attention_bwd = 0.0
    first_backward = None   # first block through which gradients must flow
    if num_prompts:
        first_backward = 1 if trainable_temperatures else insert_at
    for block in range(1, L + 1):
        T = 1 + N + (num_prompts if block >= insert_at else 0)
        lin = 2 * T * (3 * D * D + D * D + 2 * r * D * D)
        att = 4 * T * T * D
        linear, attention = linear + lin, attention + att
        if first_backward is not None and block >= first_backward:
            linear_bwd, attention_bwd = linear_bwd + lin, attention_bwd + 2 * att
    patch_embed = 2 * N * 3 * p * p * D
    head = 2 * D * num_classes
    forward = patch_embed + linear + attention + head
    return {"patch_embed": patch_embed, "linear": linear, "attention": attention, "head": head,
            "forward": forward, "train": forward + linear_bwd + attention_bwd + 2 * head}


def model_flops(model):
    """`flops` for a built gp.VisionTransformer."""
    return flops(model.cfg, model.num_prompts, model.pcfg.num_classes, model.pcfg.insert_at,
                 model.temperatures is not None)

# -----------------------------------------------------------------------------
# Devices and timing


def peak_tflops(device, override=None):
    """The device's bf16 dense peak (TFLOP/s) from PEAK_BF16_TFLOPS, `override` if given, else None."""
    if override:
        return override
    return peak_for_name(runtime.device_name(device)) if device.type == "cuda" else None


def peak_for_name(name):
    """Look a GPU name (as torch.cuda.get_device_name gives it) up in PEAK_BF16_TFLOPS; None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.upper() in name.upper()), None)


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
    gc.collect()
    if device.type == "cuda":
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
    """(fn, mode, seconds of the compiling call or None). make(compile) returns the function to time. When
    compiling, its first call (made here, outside the timed loop) compiles; if that fails for any reason but
    memory, make(False) is timed instead and the mode says why."""
    if not compile:
        return make(False), "eager", None
    fn = make(compile)
    try:
        start = time.perf_counter()
        fn()
        _sync(device)
        return fn, "torch.compile", time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any compiler failure: time eager instead, and say so
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        mode = f"eager (torch.compile failed on the {what}: {type(err).__name__}: {reason})"
        print(f"  {mode}", flush=True)
        return make(False), mode, None

# -----------------------------------------------------------------------------
# The training and evaluation step, fast and reference path


def step_config(args, num_prompts, batch, task=STEP_TASK):
    """The resolved config the step benchmark builds its model (head: the task's classes) and optimizer from."""
    arch, overrides = arch_spec(args.arch)
    return recipes.resolve(task, SSL, args.method, arch=arch, arch_overrides=overrides, img_size=args.img_size,
                           num_prompts=num_prompts, batch_size=batch)


def build_path_model(cfg, path, state=None):
    """The model of one path (random weights: speed does not depend on them); the reference path runs the
    explicit-softmax attention. Given `state` (a state dict) it takes exactly those weights, so that both
    paths start from the same model."""
    vit_overrides = {} if path == "fast" else {"fused_attention": False}

    def make():
        return recipes.model_from_config(cfg, recipes.num_classes(cfg), verbose=False, **vit_overrides)
    if state is None:
        torch.manual_seed(0)
        return make()
    with torch.device("meta"):   # skip the random init, the weights come from `state`
        model = make()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    return model


def make_optimizer(cfg, model, device):
    """runtime.make_optimizer with the recipe's SGD settings (fused on CUDA, for both paths: the optimizer
    over the few trainable parameters is not what the paths differ in)."""
    return runtime.make_optimizer(model.trainable_parameters(), cfg["lr"], cfg["momentum"], cfg["weight_decay"],
                                  device)


def measure(args, device, path, num_prompts, batch, state=None, peak=None, compile=None, task=STEP_TASK,
            eval_batch=None):
    """Time the training and the evaluation step of one path ("fast" or "reference") on `task`'s recipe.
    compile: None = the run's setting (compile_enabled) for the fast path; the reference path never compiles.
    eval_batch: None = --eval-batch-factor x batch. Returns (rows, state dict of the initial weights)."""
    fast = path == "fast"
    compile = (compile_enabled(args, device) if compile is None else compile) and fast
    _release(device)
    if compile:
        torch._dynamo.reset()   # fresh compile caches: no recompile limit hit across configurations
    cfg = step_config(args, num_prompts, batch, task)
    model = build_path_model(cfg, path, state)
    state = state if state is not None else {k: v.clone() for k, v in model.state_dict().items()}
    runtime.place_model(model, device, bf16=fast)
    optimizer = make_optimizer(cfg, model, device)
    count = model_flops(model)
    size, classes = cfg["img_size"], recipes.num_classes(cfg)
    eval_batch = eval_batch or batch * args.eval_batch_factor
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    eval_images = torch.randn(eval_batch, 3, size, size, generator=gen).to(device)
    eval_labels = torch.randint(0, classes, (eval_batch,), generator=gen).to(device)

    def make_train(c):
        step = runtime.make_train_step(model, optimizer, trainer.classification_loss, device, bf16=fast, compile=c)
        return lambda: step(images, labels)

    def make_eval(c):
        eval_step = trainer.make_eval_step(model, device, bf16=fast, compile=c)
        return lambda: eval_step(eval_images, eval_labels)

    rows = []
    for kind, make, n, flops_per_image in (("train", make_train, batch, count["train"]),
                                           ("eval", make_eval, eval_batch, count["forward"])):
        model.train(kind == "train")
        _reset_memory(device)
        fn, mode, compile_s = _compiled_or_eager(make, compile, device, f"{kind} step")
        rates = time_loop(fn, n, args.steps, args.warmup, args.repeats, device)
        rows.append(step_row(path, kind, num_prompts, n, rates, flops_per_image, peak, device, fast, mode,
                             compile_s))
    del model, optimizer
    _release(device)
    return rows, state


def step_row(path, kind, num_prompts, batch, rates, flops_per_image, peak, device, fast, mode, compile_s):
    median = statistics.median(rates)
    tflops = median * flops_per_image / 1e12
    return {"prompts": num_prompts, "batch": batch, "path": path, "step": kind,
            "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
            "repeats": rates, "gflops_per_image": flops_per_image / 1e9, "tflops": tflops,
            "peak_fraction": tflops / peak if peak else None, "peak_memory_gib": _peak_memory_gib(device),
            "mode": mode, "compiled": mode == "torch.compile", "compile_s": compile_s, "bf16": fast,
            "fused_attention": fast}


def _measure_or_oom(args, device, path, num_prompts, batch, **kwargs):
    """`measure`, but a configuration that does not fit in GPU memory prints a line and gives (None, None)."""
    try:
        return measure(args, device, path, num_prompts, batch, **kwargs)
    except torch.cuda.OutOfMemoryError:
        pass
    _release(device)   # outside the except block: the traceback no longer holds the model
    print(f"{num_prompts:>7} {batch:>5}  {path:<9} out of GPU memory", flush=True)
    return None, None


HEADER = (f"{'prompts':>7} {'batch':>5}  {'path':<9} {'step':<5} {'images/s (min-max)':>28} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'mem GiB':>8}  how")


def format_row(row):
    spread = f"{row['images_per_s']:.1f} ({row['images_per_s_min']:.1f}-{row['images_per_s_max']:.1f})"
    frac = f"{100 * row['peak_fraction']:.1f}%" if row["peak_fraction"] is not None else ""
    mem = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else ""
    how = "compiled" if row["compiled"] else "eager"
    return (f"{row['prompts']:>7} {row['batch']:>5}  {row['path']:<9} {row['step']:<5} {spread:>28} "
            f"{row['tflops']:>8.3g} {frac:>6} {mem:>8}  {how}")


def format_ratio(ratio):
    return (f"{ratio['prompts']:>7} {ratio['batch']:>5}  {'fast/ref':<9} {ratio['step']:<5} "
            f"{ratio['speedup']:>27.2f}x")


def compare_paths(args, device, peak, num_prompts, batch, skip_reference=False, **measure_kwargs):
    """Fast and (unless skipped) reference path at one (prompts, batch), from the same weights; measure_kwargs
    go to `measure`. Returns (rows, ratios); rows is empty when the fast path does not fit."""
    fast_rows, state = _measure_or_oom(args, device, "fast", num_prompts, batch, peak=peak, **measure_kwargs)
    if fast_rows is None:
        return [], []
    for row in fast_rows:
        print(format_row(row), flush=True)
    if skip_reference:
        return fast_rows, []
    ref_rows, _ = _measure_or_oom(args, device, "reference", num_prompts, batch, state=state, peak=peak,
                                  **measure_kwargs)
    if ref_rows is None:
        return fast_rows, []
    ratios = []
    for f, r in zip(fast_rows, ref_rows):
        print(format_row(r), flush=True)
        ratios.append({"prompts": num_prompts, "batch": f["batch"], "step": f["step"],
                       "speedup": f["images_per_s"] / r["images_per_s"]})
    for ratio in ratios:
        print(format_ratio(ratio), flush=True)
    return fast_rows + ref_rows, ratios


def time_step_table(args, device, peak):
    """The main table: every (prompts, batch), fast and reference path, and their ratio."""
    results, ratios = [], []
    print(HEADER)
    for num_prompts in args.prompts:
        for batch in args.batch:
            rows, pair_ratios = compare_paths(args, device, peak, num_prompts, batch, args.skip_reference)
            results, ratios = results + rows, ratios + pair_ratios
    return results, ratios


def run_sweep(args, device, peak, name, values, fixed, measured, compile=None):
    """Fast path only: images/s as `name` ("prompts" or "batch") takes `values`, the other fixed at `fixed`.
    `measured` maps (prompts, batch) to rows already timed in this process (with the same compile setting):
    they are reused, and new ones are added."""
    print(f"\nsweep over {name} (fast path{' without torch.compile' if compile is False else ''}; "
          f"{'batch' if name == 'prompts' else 'prompts'} fixed at {fixed})")
    print(HEADER)
    rows = []
    for v in values:
        key = (v, fixed) if name == "prompts" else (fixed, v)
        if key not in measured:
            measured[key] = _measure_or_oom(args, device, "fast", *key, peak=peak, compile=compile)[0] or []
        for row in measured[key]:
            print(format_row(row), flush=True)
            rows.append(row)
    return rows

# -----------------------------------------------------------------------------
# --end-to-end: one whole run of the classification harness on generated data


def synthetic_split(task, split, n, size, seed=0):
    """n generated uint8 images of size x size with the task's classes, as a data.ImageSplit.

    SYNTHETIC_PER_CLASS images per class come from data.make_synthetic_images (class-conditional stripes,
    so the run learns something) and are tiled to n; labels cycle through the classes. Generating every
    image separately would take minutes and ~10x the uint8 array in float temporaries at CUB's size, and
    the content does not change the speed."""
    classes = data.num_classes(task)
    per_class = max(1, min(SYNTHETIC_PER_CLASS, math.ceil(n / classes)))
    bank, _ = data.make_synthetic_images(classes, per_class, size, seed=seed)   # class-major
    i = torch.arange(n)
    labels = i % classes
    return data.ImageSplit.from_dense(task, split, bank[labels * per_class + (i // classes) % per_class], labels)


def end_to_end_config(args, run):
    """The paper's recipe for the run's task (recipes.resolve(task, "mae", method)) with the bench flags that
    override it."""
    arch, overrides = arch_spec(args.arch)
    return recipes.resolve(END_TO_END[run]["task"], SSL, args.method, arch=arch, arch_overrides=overrides,
                           img_size=args.img_size, epochs=args.epochs,
                           batch_size=args.batch[0] if args.batch else None,
                           num_prompts=args.prompts[0] if args.prompts else None)


def end_to_end_settings(args, device):
    """How the harness runs there: bf16 autocast on CUDA (on a CPU it is slower than fp32), torch.compile
    as compile_enabled, quiet."""
    return runtime.Settings(device=device, bf16=device.type == "cuda", compile=compile_enabled(args, device),
                            quiet=True)


def projected_wall_s(setup_s, epoch1_s, train_s, epochs, eval_s, full_epochs):
    """The wall of a `full_epochs` run from a shorter one: setup, then the measured training, then each missing
    epoch at the mean of epochs 2.. (their share of train_s: train_s also holds the per-epoch sync and state
    save that the epochs' own seconds leave out), then the final evaluation. None without a later epoch."""
    if epochs < 2:
        return None
    later = (train_s - epoch1_s) / (epochs - 1)
    return setup_s + train_s + (full_epochs - epochs) * later + eval_s


def run_end_to_end(args, device, run):
    """Generate the data, then time what trainer.run_classification does after loading data: build the model,
    make_loaders (setup), trainer.train (epochs, final test evaluation). Returns every number as a dict."""
    spec, cfg, settings = END_TO_END[run], end_to_end_config(args, run), end_to_end_settings(args, device)
    task, size = cfg["task"], cfg["img_size"]
    fgvc = data.task_kind(task) == "fgvc"
    n_train, n_test = args.train_images or spec["train"], args.test_images or spec["test"]
    cached = size * data.FGVC_RESIZE // data.IMAGE_SIZE if fgvc else size   # 256 / 224
    print(f"end-to-end {run}: {task}/{SSL} recipe, {cfg['method']}, {cfg['num_prompts']} prompt(s), batch "
          f"{cfg['batch_size']}, {cfg['epochs']} epochs, {args.arch} (random weights) | {n_train} train / "
          f"{n_test} test generated images cached at {cached}px{f', random {size}px crop + flip' if fgvc else ''}"
          f" | {runtime.device_name(device)} | {'bf16' if settings.bf16 else 'fp32'}"
          f"{' + compile' if settings.compile else ', eager'}", flush=True)
    tic = time.perf_counter()
    train_split = synthetic_split(task, "train", n_train, cached, seed=0)
    test_split = synthetic_split(task, "test", n_test, cached, seed=1)
    generation_s = time.perf_counter() - tic
    outcome, timing = time_training_run(cfg, settings, train_split, {"test": test_split})
    full_epochs = recipes.HPARAMS["recipe"]["epochs"]
    result = end_to_end_result(run, cfg, settings, outcome, timing, n_train, n_test, cached, full_epochs)
    result.update(arch=args.arch, data_generation_s=generation_s)
    print(format_end_to_end(result, spec, device, full_epochs), flush=True)
    return result


def time_training_run(cfg, settings, train_split, eval_splits):
    """trainer.run_classification's steps after its data loading, timed: (trainer.Outcome, timings)."""
    device = settings.device
    _release(device)
    if settings.compile:
        torch._dynamo.reset()   # compile from scratch, as a fresh process does
    _reset_memory(device)
    start = time.perf_counter()
    runtime.seed_everything(cfg["seed"])
    model = runtime.place_model(recipes.model_from_config(cfg, recipes.num_classes(cfg), verbose=False), device,
                                settings.bf16)
    on_gpu = trainer.fits_on_gpu([train_split, *eval_splits.values()], device)   # make_loaders' decision
    train_loader, eval_loaders = trainer.make_loaders(cfg, train_split, eval_splits, device)
    _sync(device)
    setup_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        outcome = trainer.train(cfg, model, train_loader, eval_loaders, settings, Path(tmp) / "state.pt")
    wall_s = time.perf_counter() - start
    timing = {"setup_s": setup_s, "wall_s": wall_s, "images_on_gpu": on_gpu,
              "peak_memory_gib": _peak_memory_gib(device)}
    del model, train_loader, eval_loaders
    _release(device)
    return outcome, timing


def end_to_end_result(run, cfg, settings, outcome, timing, n_train, n_test, cached, full_epochs):
    """The end-to-end numbers as a dict; projected_wall_s when fewer epochs than the recipe's ran."""
    spec, device = END_TO_END[run], settings.device
    epoch_s = [record["seconds"] for record in outcome.history]
    epochs = len(epoch_s)
    later = (outcome.train_seconds - epoch_s[0]) / (epochs - 1) if epochs > 1 else None
    full_size = (n_train, n_test, cfg["img_size"]) == (spec["train"], spec["test"], data.IMAGE_SIZE)
    projected = (projected_wall_s(timing["setup_s"], epoch_s[0], outcome.train_seconds, epochs,
                                  outcome.eval_seconds, full_epochs) if epochs != full_epochs else None)
    comparable = device.type == "cuda" and full_size
    estimate = timing["wall_s"] if epochs == full_epochs else projected
    return {
        "run": run, "task": cfg["task"], "method": cfg["method"], "num_prompts": cfg["num_prompts"],
        "batch_size": cfg["batch_size"], "epochs": epochs, "train_images": n_train, "test_images": n_test,
        "img_size": cfg["img_size"], "cached_size": cached, "bf16": settings.bf16, "compiled": bool(settings.compile),
        "images_on_gpu": timing["images_on_gpu"], "setup_s": timing["setup_s"], "epoch1_s": epoch_s[0],
        "epoch_s": epoch_s, "later_epoch_s": later, "train_s": outcome.train_seconds,
        "test_eval_s": outcome.eval_seconds, "wall_s": timing["wall_s"],
        "train_images_per_s": n_train / later if later else None,
        "test_acc": outcome.final["test_acc"], "peak_memory_gib": timing["peak_memory_gib"],
        "target_s": spec["target_s"], "full_size": full_size, "full_epochs": full_epochs,
        "projected_wall_s": projected,
        "target_met": (estimate < spec["target_s"]) if comparable and estimate is not None else None,
    }


def format_end_to_end(r, spec, device, full_epochs):
    lines = [("data generation (not counted)", f"{r['data_generation_s']:.1f} s"),
             ("setup (model build, loaders)", f"{r['setup_s']:.2f} s"),
             ("epoch 1" + (" (includes compiling)" if r["compiled"] else ""), f"{r['epoch1_s']:.2f} s")]
    if r["later_epoch_s"] is not None:
        lines.append(("epoch 2" if r["epochs"] == 2 else f"mean epoch, epochs 2-{r['epochs']}",
                      f"{r['later_epoch_s']:.3f} s   ({r['train_images_per_s']:.0f} train images/s)"))
    lines += [(f"train, {r['epochs']} epochs", f"{r['train_s']:.2f} s"),
              (f"final test evaluation ({r['test_images']} images)", f"{r['test_eval_s']:.2f} s"),
              ("total wall (setup + train + evaluation)", f"{r['wall_s']:.2f} s"
               + (_target(r, spec, device) if r["projected_wall_s"] is None else ""))]
    if r["projected_wall_s"] is not None:
        lines.append((f"projected wall for {full_epochs} epochs", f"{r['projected_wall_s']:.1f} s"
                      + _target(r, spec, device)))
    lines += [("images kept on the GPU", "yes" if r["images_on_gpu"] else "no"),
              ("test accuracy (generated data)", f"{r['test_acc']:.2f} %")]
    if r["peak_memory_gib"] is not None:
        lines.append(("peak GPU memory", f"{r['peak_memory_gib']:.2f} GiB"))
    width = max(len(name) for name, _ in lines) + 2
    return "\n".join(f"  {name:<{width}}{value}" for name, value in lines)


def _target(r, spec, device):
    """The target beside the whole-run figure, on CUDA (the targets are for one H100)."""
    if device.type != "cuda":
        return ""
    text = f"   target < {spec['target_s']} s on one H100 ({spec['label']})"
    if r["target_met"] is None:
        return text + ": not comparable (reduced sizes)"
    return text + (": met" if r["target_met"] else ": MISSED")

# -----------------------------------------------------------------------------
# --segmentation: the SETR-PUP ADE20K training iteration and sliding-window inference


def segmentation_config(args):
    """The resolved ADE20K recipe (SETR-PUP), with the bench flags that override it."""
    arch, overrides = arch_spec(args.arch)
    tiny = {"head_channels": TINY_HEAD_CHANNELS} if args.arch == "tiny" else {}
    return recipes.resolve("ade20k", SSL, args.method, arch=arch, arch_overrides=overrides, img_size=args.img_size,
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
    """Config, model, optimizer, scheduler and random data as segmentation.Training builds them."""
    cfg = segmentation_config(args)
    bf16, compile = device.type == "cuda", compile_enabled(args, device)
    batch, crop = cfg["batch_size"], cfg["img_size"]
    print(f"segmentation: SETR-PUP (aux heads on blocks {', '.join(map(str, cfg['aux_blocks']))}) on {args.arch} "
          f"(random weights), {cfg['method']}, {cfg['num_prompts']} prompts, {segmentation.NUM_CLASSES} classes, "
          f"batch {batch} of {crop}x{crop} random crops | {runtime.device_name(device)} | "
          f"{'bf16 autocast' if bf16 else 'fp32'}{', compile requested' if compile else ', eager'}", flush=True)
    _release(device)
    if compile:
        torch._dynamo.reset()
    runtime.seed_everything(cfg["seed"])
    model = runtime.place_model(segmentation.build_segmenter(cfg, verbose=False), device, bf16)
    optimizer = runtime.make_optimizer(model.param_groups(cfg["lr"], cfg["head_lr_mult"]), cfg["lr"],
                                       cfg["momentum"], cfg["weight_decay"], device)
    scheduler = segmentation.poly_scheduler(optimizer, cfg["iters"], cfg["poly_power"], cfg["min_lr"])
    gen = torch.Generator().manual_seed(0)
    return {"cfg": cfg, "bf16": bf16, "compile": compile, "model": model, "optimizer": optimizer,
            "scheduler": scheduler,
            "images": torch.randn(batch, 3, crop, crop, generator=gen).to(device),
            "labels": torch.randint(0, segmentation.NUM_CLASSES, (batch, crop, crop), generator=gen).to(device),
            "test_image": torch.randint(0, 256, (3,) + SEG_TEST_IMAGE, dtype=torch.uint8, generator=gen).to(device)}


def time_segmentation_training(args, device, run):
    """Images/s of the training iteration: the step segmentation.Training builds, then the scheduler step."""
    cfg, model, scheduler = run["cfg"], run["model"], run["scheduler"]
    loss_fn = segmentation.setr_loss(cfg["aux_loss_weight"])

    def make(c):
        step = runtime.make_train_step(model, run["optimizer"], loss_fn, device, run["bf16"], c)

        def iteration():
            out = step(run["images"], run["labels"])
            scheduler.step()
            return out
        return iteration
    model.train()
    _reset_memory(device)
    fn, mode, compile_s = _compiled_or_eager(make, run["compile"], device, "training step")
    rates = time_loop(fn, cfg["batch_size"], args.steps, args.warmup, args.repeats, device)
    return {"rates": rates, "mode": mode, "compile_s": compile_s, "peak_memory_gib": _peak_memory_gib(device)}


def time_segmentation_inference(args, device, run):
    """Seconds per image of segmentation.predict at single scale, and the windows it slides."""
    cfg, model, image = run["cfg"], run["model"], run["test_image"]
    crop, stride = cfg["img_size"], cfg["slide_stride"]
    model.eval()

    def make(c):
        forward = runtime.compiled(model, c)
        return lambda: segmentation.predict(forward, image, crop, stride, bf16=run["bf16"])
    _reset_memory(device)
    fn, mode, compile_s = _compiled_or_eager(make, run["compile"], device, "inference")
    # the geometry alone decides the windows: a zero model stands in for the segmenter
    windows = window_count(lambda x: torch.zeros(len(x), 1, *x.shape[-2:], device=x.device), image, crop, stride)
    rates = time_loop(fn, 1, args.steps, max(1, args.warmup), args.repeats, device)
    return {"s_per_image": 1 / statistics.median(rates), "mode": mode, "compile_s": compile_s, "windows": windows,
            "peak_memory_gib": _peak_memory_gib(device)}


def segmentation_result(args, run, train, infer):
    cfg = run["cfg"]
    batch, crop, iters = cfg["batch_size"], cfg["img_size"], cfg["iters"]
    rates = train["rates"]
    iters_per_s = statistics.median(rates) / batch
    test_size = segmentation.test_scales(*SEG_TEST_IMAGE, crop, [1.0])[0]
    return {
        "arch": args.arch, "method": cfg["method"], "num_prompts": cfg["num_prompts"], "batch_size": batch,
        "crop_size": crop, "slide_stride": cfg["slide_stride"], "aux_blocks": list(cfg["aux_blocks"]),
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

# -----------------------------------------------------------------------------
# --report: the targets' figures in one process, written to BENCHMARKS.md and benchmarks.json


def report_shapes(args):
    """(points [(prompts, batch, target img/s, task, eval batch)], sweep prompts, sweep batches) of --report:
    REPORT_POINTS with the harness's eval batch (trainer.make_loaders'), and the sweeps; --arch tiny divides
    every step batch by SMOKE_BATCH_DIVISOR (the CPU smoke run)."""
    divisor = SMOKE_BATCH_DIVISOR if args.arch == "tiny" else 1
    points = [(prompts, batch // divisor, target, task, max(trainer.EVAL_BATCH, batch) // divisor)
              for prompts, batch, target, task in REPORT_POINTS]
    return points, SWEEP_PROMPTS, tuple(batch // divisor for batch in SWEEP_BATCH)


def run_report(args, device, peak):
    """Training step fast vs reference at the report's points (fast path compiled as the run's setting), both
    sweeps (fast path without compile; a shared point is timed once), both end-to-end runs. Returns a dict."""
    points, sweep_prompts, sweep_batch = report_shapes(args)
    print(f"--report: step comparison | {args.arch}, {args.method}, {args.img_size or data.IMAGE_SIZE}px\n{HEADER}")
    results, ratios = [], []
    for num_prompts, batch, _, task, eval_batch in points:
        rows, pair_ratios = compare_paths(args, device, peak, num_prompts, batch, task=task, eval_batch=eval_batch)
        results, ratios = results + rows, ratios + pair_ratios
    prompts_fixed, batch_fixed = points[0][:2]
    measured = {}
    sweeps = {"prompts": run_sweep(args, device, peak, "prompts", sweep_prompts, batch_fixed, measured, False),
              "batch": run_sweep(args, device, peak, "batch", sweep_batch, prompts_fixed, measured, False)}
    end_to_end = {}
    for run in END_TO_END:
        print()
        end_to_end[run] = run_end_to_end(args, device, run)
    report = {"report_points": points, "results": results, "ratios": ratios, "sweeps": sweeps,
              "end_to_end": end_to_end}
    report["targets"] = target_rows(report, device, args)
    return report


def _find(rows, prompts, batch, path="fast", step="train"):
    return next((r for r in rows if (r["prompts"], r["batch"], r["path"], r["step"]) == (prompts, batch, path, step)),
                None)


def _target_row(figure, value, unit, op, target, comparable, aim=False):
    met = None
    if comparable and value is not None:
        met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return {"figure": figure, "value": value, "unit": unit, "op": op, "target": target, "aim": aim, "met": met}


def target_rows(report, device, args):
    """Each target figure next to its target on one H100. met is None where the run cannot be compared: not
    an H100, or not ViT-B/16 gated+temp at 224 px, or (end to end) reduced data sizes."""
    comparable = (device.type == "cuda" and "H100" in runtime.device_name(device).upper()
                  and args.arch == "vit_base" and args.method == "gated+temp"
                  and (args.img_size or data.IMAGE_SIZE) == data.IMAGE_SIZE)
    rows = []
    for prompts, batch, target, *_ in report["report_points"]:
        shape = f"{prompts} prompt{'s' if prompts != 1 else ''}, batch {batch}"
        fast = _find(report["results"], prompts, batch)
        ratio = next((r["speedup"] for r in report["ratios"]
                      if (r["prompts"], r["batch"], r["step"]) == (prompts, batch, "train")), None)
        fraction = fast["peak_fraction"] if fast else None
        rows += [_target_row(f"train step, {shape}", fast and fast["images_per_s"], "img/s", ">=", target,
                             comparable),
                 _target_row(f"fast / reference, train step, {shape}", ratio, "x", ">=", TARGET_SPEEDUP, comparable),
                 _target_row(f"fraction of bf16 peak, train step, {shape}", fraction and 100 * fraction, "%", ">=",
                             100 * TARGET_PEAK_FRACTION, comparable, aim=True)]
    prompts, batch, *_ = report["report_points"][0]
    fast = _find(report["results"], prompts, batch)
    rows.append(_target_row(f"peak GPU memory, train step, {prompts} prompts, batch {batch}",
                            fast and fast["peak_memory_gib"], "GiB", "<=", TARGET_MEMORY_GIB, comparable))
    for run, r in report["end_to_end"].items():
        spec = END_TO_END[run]
        estimate = r["projected_wall_s"] if r["projected_wall_s"] is not None else r["wall_s"]
        projected = f"projected from {r['epochs']} to {r['full_epochs']} epochs" \
            if r["projected_wall_s"] is not None else f"{r['epochs']} epochs"
        rows.append(_target_row(f"{spec['label']} end to end ({projected})", estimate, "s", "<", spec["target_s"],
                                comparable and r["full_size"]))
    return rows


UNIT_FORMAT = {"img/s": "{:,.0f}", "x": "{:.2f}", "%": "{:.1f}", "GiB": "{:.2f}", "s": "{:.1f}"}


def format_value(value, unit):
    return "n/a" if value is None else UNIT_FORMAT[unit].format(value) + ("" if unit == "x" else " ") + unit


def report_markdown(out):
    """BENCHMARKS.md: header facts, the targets table, then every timed row."""
    lines = ["# Benchmarks", ""]
    if not out["cuda_device"]:
        lines += [f"**{CPU_SMOKE_NOTE}.** The GPU report's code on a CPU; no figure below says anything about "
                  "GPU speed, and no target is judged.", ""]
    if out["args"]["arch"] == "tiny":
        lines += [f"Tiny sizes: a 12-block ViT of width {TINY_ARCH['embed_dim']}, step batches the GPU report's / "
                  f"{SMOKE_BATCH_DIVISOR}, {out['args']['train_images']} train / {out['args']['test_images']} test "
                  "generated images end to end.", ""]
    lines += ["| | |", "|---|---|", f"| device | {out['device']} |", f"| torch | {out['torch']} |",
              f"| CUDA | {out['cuda'] or 'none'} |", f"| date | {out['date']} |",
              f"| command | `{out['command']}` |",
              f"| model | {out['args']['arch']}, {out['args']['method']}, {out['img_size']} px, random weights |",
              f"| bf16 dense peak | {out['peak_bf16_tflops'] or 'unknown'} TFLOP/s |", ""]
    lines += ["## Targets (one H100)", "", "| figure | measured | target on one H100 | met |", "|---|---|---|---|"]
    for t in out["targets"]:
        target = ("aim " if t["aim"] else "") + f"{t['op']} " + format_value(t["target"], t["unit"])
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['figure']} | {format_value(t['value'], t['unit'])} | {target} | {met} |")
    lines += ["", "## Training and evaluation steps, fast vs reference", ""] + _markdown_steps(out["results"])
    lines += ["", "## Sweeps (fast path without torch.compile)", ""]
    for name, rows in out["sweeps"].items():
        lines += [f"Over {name}:", ""] + _markdown_steps(rows) + [""]
    lines += ["## End to end (generated data)", ""] + _markdown_end_to_end(out["end_to_end"])
    lines += ["", "The end-to-end runs compile the same graphs as the step comparison before them (same shapes and "
              "eval batch), and inductor's caches outlive torch._dynamo.reset, so their epoch 1 holds little "
              "compiling: it is what a repeated run of that shape costs. A first run on a fresh machine adds about "
              "the comparison's compiling-call seconds (fast path, train + eval) of the same shape.", "",
              "Every number is in the JSON file written beside this one.", ""]
    return "\n".join(lines)


def _markdown_steps(rows):
    lines = ["| prompts | batch | path | step | torch.compile | compiling call s | images/s (min-max) | TFLOP/s | "
             "% peak | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "n/a"
        lines.append(f"| {r['prompts']} | {r['batch']} | {r['path']} | {r['step']} | {r['mode']} | {compile_s} | "
                     f"{r['images_per_s']:,.1f} ({r['images_per_s_min']:,.1f}-{r['images_per_s_max']:,.1f}) | "
                     f"{r['tflops']:.3g} | {frac} | {mem} |")
    return lines


def _markdown_end_to_end(runs):
    lines = ["| run | train / test images | epochs run | setup s | epoch 1 s | later epoch s | train s | "
             "test eval s | wall s | projected wall s | compiled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in runs.items():
        later = f"{r['later_epoch_s']:.3f}" if r["later_epoch_s"] is not None else "n/a"
        projected = f"{r['projected_wall_s']:.1f}" if r["projected_wall_s"] is not None else "n/a"
        lines.append(f"| {run} ({r['task']}, {r['num_prompts']} prompt(s), batch {r['batch_size']}) | "
                     f"{r['train_images']} / {r['test_images']} | {r['epochs']} | {r['setup_s']:.2f} | "
                     f"{r['epoch1_s']:.2f} | {later} | {r['train_s']:.2f} | {r['test_eval_s']:.2f} | "
                     f"{r['wall_s']:.2f} | {projected} | {'yes' if r['compiled'] else 'no'} |")
    return lines


def write_report(out, out_dir):
    """BENCHMARKS.md and benchmarks.json in out_dir; returns their paths."""
    markdown, json_file = Path(out_dir) / "BENCHMARKS.md", Path(out_dir) / "benchmarks.json"
    runtime.write_json(json_file, out)
    runtime.write_text(markdown, report_markdown(out))
    print(f"wrote {markdown} and {json_file}")
    return markdown, json_file

# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(
        description="Speed of Gated Prompt Tuning (random weights and data: speed only).\n\n"
                    "default        images/s, TFLOP/s and peak memory of the training step and evaluation\n"
                    "               step, fast path (bf16 + fused attention + torch.compile) against the\n"
                    "               reference path (fp32, explicit softmax, eager: the official code's\n"
                    "               numerics), from the same weights, with their speed ratio.\n"
                    "--end-to-end   seconds for one whole training run (trainer.train) on generated data of\n"
                    "               the real sizes (setup, epoch 1 with compiling, later epochs, evaluation).\n"
                    "--segmentation SETR-PUP ADE20K iterations/s, inference time, projected schedule hours.\n"
                    "--report       all the targets' figures in one process -> BENCHMARKS.md, benchmarks.json.",
        epilog="examples:\n"
               "  python bench.py --report                         # the GPU report, ~10 min on one H100\n"
               "  python bench.py                                  # ViT-B/16, 100 prompts, batch 64\n"
               "  python bench.py --prompts 10 100 --batch 32 128 --json bench.json\n"
               "  python bench.py --sweep-prompts --sweep-batch    # fast path only\n"
               "  python bench.py --end-to-end vtab --json e2e_vtab.json   # target: < 60 s on one H100\n"
               "  python bench.py --end-to-end cub --json e2e_cub.json     # target: < 5 min on one H100\n"
               "  python bench.py --segmentation --json seg.json\n"
               "CPU smoke runs (seconds):\n"
               "  python bench.py --report --arch tiny --out-dir /tmp/smoke\n"
               "  python bench.py --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 \\\n"
               "      --warmup 1 --repeats 2\n"
               "  python bench.py --end-to-end vtab --arch tiny --img-size 32 --train-images 24 \\\n"
               "      --test-images 16 --epochs 2 --batch 8\n"
               "  python bench.py --segmentation --arch tiny --img-size 64 --batch 2 --steps 2 \\\n"
               "      --warmup 1 --repeats 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--end-to-end", choices=sorted(END_TO_END), default=None, metavar="{vtab,cub}",
                      help="time one whole run of the harness (trainer.make_loaders + trainer.train with the "
                           "paper's recipe, final test evaluation) on generated images: vtab = 1,000 train / "
                           "10,000 test at 224px with the dtd/MAE recipe; cub = 5,994 train cached at 256px "
                           "(random crop + flip on the GPU) / 5,794 test with the cub/MAE recipe")
    mode.add_argument("--segmentation", action="store_true",
                      help="time the SETR-PUP ADE20K training iteration (150 classes) and the sliding-window "
                           "inference of one 512x683 image; project the recipe's iteration schedule")
    mode.add_argument("--multitask", action="store_true", help="inference images/s: a batch mixing 8 prompt packs (gated_prompt.MultiTask) vs one pack, same batch and prompts")
    mode.add_argument("--report", action="store_true",
                      help="in one process: the training step fast vs reference at 100 prompts / batch 64 and "
                           "1 prompt / batch 128, both sweeps (fast path without compile), both end-to-end runs "
                           "(a few epochs, projected to 100); writes BENCHMARKS.md and benchmarks.json")
    p.add_argument("--arch", default="vit_base", choices=ARCH_CHOICES,
                   help="backbone size; tiny = 12 blocks of width 32, for CPU smoke tests (default: %(default)s)")
    p.add_argument("--method", default="gated+temp", choices=sorted(gp.METHODS),
                   help="what is trained (default: %(default)s)")
    p.add_argument("--prompts", type=int, nargs="+", default=None, metavar="P",
                   help="prompt counts to time, one or more (default: 100; --end-to-end / --segmentation: the "
                        "recipe's, one value only)")
    p.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="training batch sizes, one or more (default: 64; --end-to-end / --segmentation: the "
                        "recipe's, one value only)")
    p.add_argument("--eval-batch-factor", type=int, default=4, metavar="K",
                   help="the evaluation step runs on K x the training batch (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution, a multiple of the patch size (default: the recipe's, 224; "
                        "--segmentation: the crop, 512; --report --arch tiny: 32)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per repetition (default: {TABLE_DEFAULTS['steps']}; --report: "
                        f"{REPORT_DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before timing, after the compiling call (default: "
                        f"{TABLE_DEFAULTS['warmup']}; --report: {REPORT_DEFAULTS['warmup']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repetitions; the table shows their median and min-max (default: "
                        f"{TABLE_DEFAULTS['repeats']}; --report: {REPORT_DEFAULTS['repeats']})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fast path (default: on CUDA only; compiling on a CPU takes minutes)")
    p.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                   help="the device's bf16 dense peak, for the %%peak column (default: looked up for "
                        "H100 / H200 / A100, blank otherwise)")
    p.add_argument("--sweep-prompts", type=int, nargs="*", default=None, metavar="P",
                   help=f"instead of the table: fast-path images/s vs prompt count "
                        f"(no values: {' '.join(map(str, SWEEP_PROMPTS))}; batch = first --batch)")
    p.add_argument("--sweep-batch", type=int, nargs="*", default=None, metavar="B",
                   help=f"instead of the table: fast-path images/s vs batch size "
                        f"(no values: {' '.join(map(str, SWEEP_BATCH))}; prompts = first --prompts)")
    e2e = p.add_argument_group("--end-to-end / --report sizes (defaults: the real ones; smaller for a quick check)")
    e2e.add_argument("--epochs", type=int, default=None, metavar="N",
                     help=f"epochs to train (default: the recipe's 100; --report: {REPORT_DEFAULTS['epochs']}); "
                          "fewer also gives a projection to 100")
    e2e.add_argument("--train-images", type=int, default=None, metavar="N",
                     help="generated training images (default: 1000 for vtab, 5994 for cub; --report: for both)")
    e2e.add_argument("--test-images", type=int, default=None, metavar="N",
                     help="generated test images (default: 10000 for vtab, 5794 for cub; --report: for both)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="--report: where BENCHMARKS.md and benchmarks.json go (default: .)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    return p


def check_args(p, args):
    """Refuse flag combinations that do not apply (p.error: message on stderr, exit status 2)."""
    single_run = args.end_to_end or args.segmentation
    if (single_run or args.report) and (args.sweep_prompts is not None or args.sweep_batch is not None):
        p.error("--sweep-prompts / --sweep-batch time the step table; not with --end-to-end, --segmentation "
                "or --report")
    if args.report and (args.prompts is not None or args.batch is not None or args.skip_reference):
        p.error("--report times the targets' fixed configurations, fast and reference path; --prompts, --batch "
                "and --skip-reference do not apply")
    if args.out_dir is not None and not args.report:
        p.error("--out-dir belongs to --report")
    if not (args.end_to_end or args.report) and any(
            v is not None for v in (args.epochs, args.train_images, args.test_images)):
        p.error("--epochs, --train-images and --test-images belong to --end-to-end and --report")
    for name in ("batch", "prompts"):
        values = getattr(args, name)
        if single_run and values is not None and len(values) > 1:
            p.error(f"--{name} takes one value with --end-to-end / --segmentation")
        if values is not None and min(values) < (1 if name == "batch" else 0):
            p.error(f"--{name} must be >= {1 if name == 'batch' else 0}")
    if args.prompts is not None and min(args.prompts) == 0 and args.method != "linear":
        p.error(f"--prompts 0 is the linear probe (--method linear); {args.method} needs >= 1 prompt")
    patch = patch_size_of(args.arch)
    if args.img_size is not None and (args.img_size < patch or args.img_size % patch):
        p.error(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {patch}")
    if any(v is not None and v < 1 for v in (args.steps, args.repeats)) or (args.warmup or 0) < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if any(v is not None and v < 1 for v in (args.epochs, args.train_images, args.test_images)):
        p.error("--epochs, --train-images and --test-images must be >= 1")


def fill_defaults(args):
    """The mode's defaults for what was not given. None left in batch / prompts / img_size / epochs means the
    recipe's (resolved with the config)."""
    if args.report:
        defaults = dict(REPORT_DEFAULTS, **(REPORT_SMOKE if args.arch == "tiny" else {}))
        args.out_dir = args.out_dir or "."
    else:
        defaults = TABLE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not (args.end_to_end or args.segmentation or args.report):
        args.batch = args.batch or [64]
        args.prompts = args.prompts or [100]
    return args


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return fill_defaults(args)


def main(argv=None):
    """Run the benchmark; prints the table(s) (or the --end-to-end / --segmentation / --report figures) and
    returns every number as a dict (also --json; --report also writes BENCHMARKS.md and benchmarks.json)."""
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    if args.report and device.type != "cuda" and args.arch != "tiny":
        raise SystemExit(f"bench.py: error: --report times ViT-B at the targets' sizes, hours on a {device.type}; "
                         "run it on a GPU, or add --arch tiny for the CPU smoke run")
    peak = peak_tflops(device, args.peak_tflops)
    out = {"device": runtime.device_name(device), "cuda_device": device.type == "cuda", "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(["python bench.py"] + list(sys.argv[1:] if argv is None else argv)),
           "img_size": args.img_size or data.IMAGE_SIZE, "compile": compile_enabled(args, device),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "peak_bf16_tflops": peak, "args": vars(args), "results": [], "ratios": [], "sweeps": {}}
    with runtime.flush_denormals(device):
        run_mode(args, device, peak, out)
    if args.report:
        write_report(out, args.out_dir)
    if args.json:
        runtime.write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


def run_mode(args, device, peak, out):
    """The chosen mode's measurements, into `out`."""
    if args.report:
        out.update(run_report(args, device, peak))
    elif args.end_to_end:
        out["end_to_end"] = run_end_to_end(args, device, args.end_to_end)
    elif args.segmentation:
        out["segmentation"] = time_segmentation(args, device)
    elif args.multitask:
        out["multitask"] = time_multitask(args, device)
    else:
        print(f"{args.arch}, {args.method}, {out['img_size']}px, eval batch = {args.eval_batch_factor} x batch | "
              f"{out['device']} (bf16 dense peak: {peak or 'unknown'} TFLOP/s) | torch {torch.__version__} | "
              f"fast = bf16 + SDPA{' + compile' if out['compile'] else ''}, reference = fp32 + explicit softmax, "
              f"eager")
        sweeps = [("prompts", args.sweep_prompts, SWEEP_PROMPTS), ("batch", args.sweep_batch, SWEEP_BATCH)]
        if all(values is None for _, values, _ in sweeps):
            out["results"], out["ratios"] = time_step_table(args, device, peak)
        measured = {}
        for name, values, default in sweeps:
            if values is not None:
                fixed = args.batch[0] if name == "prompts" else args.prompts[0]
                out["sweeps"][name] = run_sweep(args, device, peak, name, values or list(default), fixed, measured)


def time_multitask(args, device, packs=8):
    """The mixed-batch row: gated_prompt.MultiTask on a batch whose images cycle through `packs` prompt packs
    (--method, the first --prompts, random prompt sides on one random backbone) against the plain model of one
    pack on a batch of the same size (the first --batch). Inference: eval mode, no grad, bf16 autocast on CUDA,
    both eager; the two are timed alternately, --repeats times each."""
    P, B = args.prompts[0], args.batch[0]
    cfg = step_config(args, P, B)
    bf16 = device.type == "cuda"
    single = recipes.model_from_config(cfg, recipes.num_classes(cfg), verbose=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"pack0": single.save_pack(f"{tmp}/pack0.pt")}
        for k in range(1, packs):   # the same pack with fresh random tensors (speed does not depend on them)
            pack = gp.read_pack(paths["pack0"])
            pack["tensors"] = {name: torch.randn_like(t) for name, t in pack["tensors"].items()}
            paths[f"pack{k}"] = f"{tmp}/pack{k}.pt"
            torch.save(pack, paths[f"pack{k}"])
        mixed = gp.MultiTask(single, paths)
    mixed.to(device)
    runtime.place_model(single, device, bf16)
    images = torch.randn(B, 3, cfg["img_size"], cfg["img_size"], device=device)
    tasks = [f"pack{b % packs}" for b in range(B)]

    def run(model, *extra):
        def fn():
            with torch.no_grad(), runtime.autocast(device, bf16):
                return model(images, *extra)
        return fn
    fns = {"single": run(single), "mixed": run(mixed, tasks)}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    rates = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            rates[name] += time_loop(fn, B, args.steps, 0, 1, device)
    single_rate, mixed_rate = (statistics.median(rates[n]) for n in ("single", "mixed"))
    row = {"packs": packs, "batch": B, "prompts": P, "method": args.method, "arch": args.arch,
           "img_size": cfg["img_size"], "device": runtime.device_name(device), "bf16": bf16, "mode": "eager",
           "single_images_per_second": single_rate, "mixed_images_per_second": mixed_rate,
           "single_rates": rates["single"], "mixed_rates": rates["mixed"], "ratio": mixed_rate / single_rate}
    print(f"mixed batch of {packs} packs vs one pack ({args.arch}, {args.method}, {P} prompts, batch {B}, "
          f"{cfg['img_size']}px, eager{', bf16' if bf16 else ', fp32'}, {row['device']}): {single_rate:.1f} vs "
          f"{mixed_rate:.1f} images/s -> {row['ratio']:.3f}x")
    return row


if __name__ == "__main__":
    main()
