"""Throughput benchmark for Gated Prompt Tuning: the fast path against the official code's numerics.

Times one training step (forward + backward + SGD-momentum step; frozen backbone, trainable prompts,
gates, temperatures and head) and one evaluation step (no-grad forward on a larger batch) for

  fast       bf16 autocast + fused attention (SDPA) + torch.compile, via runtime.make_train_step
             (exactly the step reproduce.py trains with);
  reference  fp32, explicit-softmax attention, eager: the official code's numerics;

starting from the same weights, and prints images/s (median and min-max over --repeats), achieved
TFLOP/s (analytic count, see `flops`), the fraction of the GPU's bf16 dense peak, peak GPU memory and
the fast/reference speed-up, all measured in the same run.

    python bench.py                                   # ViT-B/16, gated+temp, 100 prompts, batch 64
    python bench.py --prompts 10 100 --batch 32 128 --json bench.json
    python bench.py --sweep-prompts --sweep-batch     # fast path: images/s vs prompts and vs batch
    python bench.py --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 --warmup 1 \\
        --repeats 2 --no-compile                      # seconds on a CPU (what the tests run)

On a CPU the same code runs (bf16 autocast works there too); peak fraction and memory are left blank.

Two more modes answer "how long does a whole run take":

  --end-to-end vtab|cub   one whole run of reproduce.py's harness (make_loaders, build_model, train: the
                          paper's recipe, 100 epochs, final test evaluation) on GENERATED images of the
                          real sizes: vtab = 1,000 train / 10,000 test at 224x224 (the dtd/MAE recipe),
                          cub = 5,994 train cached at 256 (GPU random crop + flip) / 5,794 test (the
                          cub/MAE recipe). Random backbone; bf16 + torch.compile on CUDA. Prints setup,
                          epoch 1 (includes compiling), median later epoch, train, test-evaluation and
                          total seconds, next to the targets on one H100 (< 60 s, < 5 min).
  --segmentation          the SETR-PUP ADE20K training iteration (batch 16 of 512x512 crops, 150
                          classes, 100 prompts) and the sliding-window inference of one 512x683 image:
                          iterations/s, images/s, peak memory, projected hours for 160,000 iterations.

    python bench.py --end-to-end vtab --json e2e_vtab.json
    python bench.py --end-to-end cub --json e2e_cub.json
    python bench.py --segmentation --json seg.json
    python bench.py --end-to-end vtab --arch tiny --img-size 32 --train-images 24 --test-images 16 \\
        --epochs 2 --batch 8                            # CPU smoke test, seconds
    python bench.py --segmentation --arch tiny --img-size 64 --batch 2 --steps 2 --warmup 1 --repeats 2
"""
import argparse
import contextlib
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import data
import gated_prompt as gp
import reproduce
import runtime
import segmentation

NUM_CLASSES = 100   # head size; the head's FLOPs are negligible whatever it is
SSL = "mae"         # pooling only (mean of tokens vs CLS); irrelevant to speed
LR = 1e-3           # any value: the benchmark only needs finite losses

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

# --end-to-end: the issue's two runs. task = whose recipe (paper_hparams.yaml) is trained; train / test =
# generated images; target_s = the issue's target for the whole run on one H100
END_TO_END = {
    "vtab": dict(task="dtd", train=1000, test=10000, target_s=60, label="VTAB-1k task"),
    "cub": dict(task="cub", train=5994, test=5794, target_s=300, label="CUB-sized run"),
}
SYNTHETIC_PER_CLASS = 2   # generated images per class, tiled to the requested count

# --segmentation: mmseg's SETR-PUP ADE20K schedule and test image
SEG_ITERS = segmentation.DEFAULTS["iters"]     # 160,000
SEG_TEST_IMAGE = (512, 683)                    # H x W: a typical ADE20K image at the test scale (short side 512)
ADE_VAL_IMAGES = 2000


def arch_spec(name):
    """(gated_prompt arch name, vit_config overrides) for an --arch choice."""
    return ("vit_base", dict(TINY_ARCH)) if name == "tiny" else (name, {})


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
# Timing


def peak_tflops(device, override=None):
    """The device's bf16 dense peak (TFLOP/s) from PEAK_BF16_TFLOPS, `override` if given, else None."""
    if override:
        return override
    return peak_for_name(runtime.device_name(device)) if device.type == "cuda" else None


def peak_for_name(name):
    """Look a GPU name (as torch.cuda.get_device_name gives it) up in PEAK_BF16_TFLOPS; None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.upper() in name.upper()), None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


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


def build_model(args, num_prompts, fused, state=None):
    """The benchmarked model (random weights: speed does not depend on them). Given `state` (a state
    dict) it takes exactly those weights, so that every path starts from the same model."""
    arch, overrides = arch_spec(args.arch)

    def make():
        return gp.VisionTransformer(
            gp.vit_config(arch, SSL, img_size=args.img_size, fused_attention=fused, **overrides),
            gp.prompt_config(args.method, num_classes=NUM_CLASSES, num_prompts=num_prompts))
    if state is None:
        torch.manual_seed(0)
        return make()
    with torch.device("meta"):   # skip the random init, the weights come from `state`
        model = make()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    return model


def measure(args, device, path, num_prompts, batch, state=None, peak=None):
    """Time the training and the evaluation step of one path ("fast" or "reference").
    Returns (rows, state dict of the initial weights)."""
    fast = path == "fast"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if fast and args.compile:
        torch._dynamo.reset()   # fresh compile caches: no recompile limit hit across configurations
    model = build_model(args, num_prompts, fused=fast, state=state)
    state = state if state is not None else {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=LR, momentum=0.9)
    step, forward = runtime.make_train_step(model, optimizer, device, bf16=fast, compile=fast and args.compile)
    count = model_flops(model)
    eval_batch = batch * args.eval_batch_factor
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    eval_images = torch.randn(eval_batch, 3, args.img_size, args.img_size, generator=gen).to(device)

    def evaluate():
        with torch.no_grad(), runtime.autocast(device, fast):
            return forward(eval_images)

    rows = []
    for kind, fn, n, flops_per_image in (("train", lambda: step(images, labels), batch, count["train"]),
                                         ("eval", evaluate, eval_batch, count["forward"])):
        model.train(kind == "train")
        _reset_memory(device)
        rates = time_loop(fn, n, args.steps, args.warmup, args.repeats, device)
        median = statistics.median(rates)
        tflops = median * flops_per_image / 1e12
        rows.append({"prompts": num_prompts, "batch": n, "path": path, "step": kind,
                     "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
                     "repeats": rates, "gflops_per_image": flops_per_image / 1e9, "tflops": tflops,
                     "peak_fraction": tflops / peak if peak else None,
                     "peak_memory_gib": _peak_memory_gib(device),
                     "compiled": fast and args.compile, "bf16": fast, "fused_attention": fast})
    del model, optimizer, step, forward
    gc.collect()
    return rows, state

# -----------------------------------------------------------------------------
# Output


def _measure_or_oom(args, device, path, num_prompts, batch, **kwargs):
    """`measure`, but a configuration that does not fit in GPU memory prints a line and gives (None, None)."""
    try:
        return measure(args, device, path, num_prompts, batch, **kwargs)
    except torch.cuda.OutOfMemoryError:
        pass
    gc.collect()   # outside the except block: the traceback no longer holds the model
    torch.cuda.empty_cache()
    print(f"{num_prompts:>7} {batch:>5}  {path:<9} out of GPU memory", flush=True)
    return None, None


HEADER = (f"{'prompts':>7} {'batch':>5}  {'path':<9} {'step':<5} {'images/s (min-max)':>28} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'mem GiB':>8}")


def format_row(row):
    spread = f"{row['images_per_s']:.1f} ({row['images_per_s_min']:.1f}-{row['images_per_s_max']:.1f})"
    frac = f"{100 * row['peak_fraction']:.1f}%" if row["peak_fraction"] is not None else ""
    mem = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else ""
    return (f"{row['prompts']:>7} {row['batch']:>5}  {row['path']:<9} {row['step']:<5} {spread:>28} "
            f"{row['tflops']:>8.3g} {frac:>6} {mem:>8}")


def format_ratio(ratio):
    return (f"{ratio['prompts']:>7} {ratio['batch']:>5}  {'fast/ref':<9} {ratio['step']:<5} "
            f"{ratio['speedup']:>27.2f}x")


def run_table(args, device, peak):
    """The main table: every (prompts, batch), fast and reference path, and their ratio."""
    results, ratios = [], []
    print(HEADER)
    for num_prompts in args.prompts:
        for batch in args.batch:
            fast_rows, state = _measure_or_oom(args, device, "fast", num_prompts, batch, peak=peak)
            if fast_rows is None:
                continue
            for row in fast_rows:
                print(format_row(row), flush=True)
            results += fast_rows
            if args.skip_reference:
                continue
            ref_rows, _ = _measure_or_oom(args, device, "reference", num_prompts, batch, state=state, peak=peak)
            if ref_rows is None:
                continue
            for row in ref_rows:
                print(format_row(row), flush=True)
            results += ref_rows
            for f, r in zip(fast_rows, ref_rows):
                ratio = {"prompts": num_prompts, "batch": f["batch"], "step": f["step"],
                         "speedup": f["images_per_s"] / r["images_per_s"]}
                ratios.append(ratio)
                print(format_ratio(ratio), flush=True)
    return results, ratios


def run_sweep(args, device, peak, name, values):
    """Fast path only: images/s as one of prompts / batch varies, the other fixed at its first value."""
    print(f"\nsweep over {name} (fast path; {'batch' if name == 'prompts' else 'prompts'} fixed at "
          f"{args.batch[0] if name == 'prompts' else args.prompts[0]})")
    print(HEADER)
    rows = []
    for v in values:
        num_prompts, batch = (v, args.batch[0]) if name == "prompts" else (args.prompts[0], v)
        for row in _measure_or_oom(args, device, "fast", num_prompts, batch, peak=peak)[0] or []:
            print(format_row(row), flush=True)
            rows.append(row)
    return rows

# -----------------------------------------------------------------------------
# --end-to-end: one whole run of the classification harness on generated data


def synthetic_split(task, split, n, size, seed=0):
    """n generated uint8 images [n, 3, size, size] with the task's classes, as a data.ImageSplit.

    SYNTHETIC_PER_CLASS images per class come from data.make_synthetic_images (class-conditional stripes,
    so the run learns something) and are tiled to n; labels cycle through the classes. Generating every
    image separately would take minutes and ~10x the uint8 array in float temporaries at CUB's size, and
    the content does not change the speed."""
    classes = data.num_classes(task)
    per_class = max(1, min(SYNTHETIC_PER_CLASS, math.ceil(n / classes)))
    bank, _ = data.make_synthetic_images(classes, per_class, size, seed=seed)   # class-major
    i = torch.arange(n)
    labels = i % classes
    return data.ImageSplit(task, split, bank[labels * per_class + (i // classes) % per_class], labels)


def end_to_end_config(args, device):
    """The paper's recipe for the run's task (reproduce.resolve_config on `--task T --ssl mae`), with the
    bench flags that override it, a random backbone (no checkpoint) and the fast path on CUDA."""
    argv = ["--task", END_TO_END[args.end_to_end]["task"], "--ssl", "mae", "--method", args.method]
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch and args.batch[0]),
                        ("--num-prompts", args.prompts and args.prompts[0])):
        if value is not None:
            argv += [flag, str(value)]
    cfg = reproduce.resolve_config(reproduce.parse_args(argv + ([] if args.compile else ["--no-compile"])))
    arch, overrides = arch_spec(args.arch)
    # bf16 autocast is the fast path on CUDA; on a CPU it is slower than fp32, so (as reproduce's demo) off
    cfg.update(arch=arch, arch_overrides=overrides, img_size=args.img_size, bf16=device.type == "cuda")
    return cfg


@contextlib.contextmanager
def _timing(module, name, seconds, device):
    """While active, every call of module.<name> (looked up by the module's own code at call time) appends
    its wall seconds to `seconds`: how the final evaluation inside reproduce.train is timed."""
    real = getattr(module, name)

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _sync(device)
            seconds.append(time.perf_counter() - start)
    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, real)


def run_end_to_end(args, device):
    """Generate the data, then time build_model + make_loaders (setup) and reproduce.train (epochs, final
    test evaluation) exactly as reproduce.py runs them. Returns every number as a dict."""
    spec = END_TO_END[args.end_to_end]
    cfg = end_to_end_config(args, device)
    task, fgvc = cfg["task"], data.task_kind(cfg["task"]) == "fgvc"
    n_train, n_test = args.train_images or spec["train"], args.test_images or spec["test"]
    cached = args.img_size * data.FGVC_RESIZE // data.IMAGE_SIZE if fgvc else args.img_size   # 256 / 224
    compiled = cfg["compile"] and device.type == "cuda"   # reproduce.train compiles on CUDA only
    print(f"end-to-end {args.end_to_end}: {task}/mae recipe, {cfg['method']}, {cfg['num_prompts']} prompt(s), "
          f"batch {cfg['batch_size']}, {cfg['epochs']} epochs, {args.arch} (random weights) | {n_train} train / "
          f"{n_test} test generated images cached at {cached}px"
          f"{f', random {args.img_size}px crop + flip' if fgvc else ''} | {runtime.device_name(device)} | "
          f"{'bf16' if cfg['bf16'] else 'fp32'}{' + compile' if compiled else ', eager'}", flush=True)

    tic = time.perf_counter()
    train_split = synthetic_split(task, "train", n_train, cached, seed=0)
    test_split = synthetic_split(task, "test", n_test, cached, seed=1)
    generation_s = time.perf_counter() - tic

    if compiled:
        torch._dynamo.reset()   # compile from scratch, as a fresh `python reproduce.py` process does
    _reset_memory(device)
    start = time.perf_counter()
    runtime.seed_everything(cfg["seed"])
    model = reproduce.build_model(cfg, None, data.num_classes(task)).to(device)
    on_gpu = reproduce.fits_on_gpu([train_split, test_split], device)   # what make_loaders decides next
    train_loader, eval_loaders = reproduce.make_loaders(cfg, train_split, {"test": test_split}, device)
    _sync(device)
    setup_s = time.perf_counter() - start
    eval_s = []
    train_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _timing(reproduce, "final_metrics", eval_s, device):
        history, final = reproduce.train(cfg, model, train_loader, eval_loaders, device,
                                         Path(tmp) / "state.pt", quiet=True)
    end = time.perf_counter()
    test_eval_s = sum(eval_s)

    epoch_s = [record["seconds"] for record in history]
    median_s = statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else None
    full_epochs = reproduce.HPARAMS["recipe"]["epochs"]
    full_size = (n_train, n_test, args.img_size) == (spec["train"], spec["test"], data.IMAGE_SIZE)
    result = {
        "run": args.end_to_end, "task": task, "method": cfg["method"], "arch": args.arch,
        "num_prompts": cfg["num_prompts"], "batch_size": cfg["batch_size"], "epochs": len(history),
        "train_images": n_train, "test_images": n_test, "img_size": args.img_size, "cached_size": cached,
        "bf16": cfg["bf16"], "compiled": compiled, "images_on_gpu": on_gpu,
        "data_generation_s": generation_s, "setup_s": setup_s, "epoch1_s": epoch_s[0],
        "median_epoch_s": median_s, "epoch_s": epoch_s, "train_s": end - train_start - test_eval_s,
        "test_eval_s": test_eval_s, "wall_s": end - start,
        "train_images_per_s": n_train / (median_s or epoch_s[0]),
        "test_acc": final["test_acc"], "peak_memory_gib": _peak_memory_gib(device),
        "target_s": spec["target_s"], "full_size": full_size,
        # an estimate of the full run from a shorter one: the later epochs all cost the median
        "projected_wall_s": (setup_s + epoch_s[0] + (full_epochs - 1) * median_s + test_eval_s
                             if median_s is not None and len(history) != full_epochs else None),
    }
    result["target_met"] = (result["wall_s"] < spec["target_s"]
                            if device.type == "cuda" and full_size and len(history) == full_epochs else None)
    print(format_end_to_end(result, spec, device, full_epochs), flush=True)
    return result


def format_end_to_end(r, spec, device, full_epochs):
    lines = [("data generation (not counted)", f"{r['data_generation_s']:.1f} s"),
             ("setup (model build, loaders)", f"{r['setup_s']:.2f} s"),
             ("epoch 1" + (" (includes compiling)" if r["compiled"] else ""), f"{r['epoch1_s']:.2f} s")]
    if r["median_epoch_s"] is not None:
        lines.append(("epoch 2" if r["epochs"] == 2 else f"median epoch, epochs 2-{r['epochs']}",
                      f"{r['median_epoch_s']:.3f} s   ({r['train_images_per_s']:.0f} train images/s)"))
    lines += [(f"train, {r['epochs']} epochs", f"{r['train_s']:.2f} s"),
              (f"final test evaluation ({r['test_images']} images)", f"{r['test_eval_s']:.2f} s"),
              ("total wall (setup + train + evaluation)", f"{r['wall_s']:.2f} s" + _target(r, spec, device))]
    if r["projected_wall_s"] is not None:
        lines.append((f"projected wall for {full_epochs} epochs", f"{r['projected_wall_s']:.1f} s"
                      + (f"   target < {spec['target_s']} s" if device.type == "cuda" and r["full_size"] else "")))
    lines += [("images kept on the GPU", "yes" if r["images_on_gpu"] else "no"),
              ("test accuracy (generated data)", f"{r['test_acc']:.2f} %")]
    if r["peak_memory_gib"] is not None:
        lines.append(("peak GPU memory", f"{r['peak_memory_gib']:.2f} GiB"))
    width = max(len(name) for name, _ in lines) + 2
    return "\n".join(f"  {name:<{width}}{value}" for name, value in lines)


def _target(r, spec, device):
    """The issue's target beside the measured total, on CUDA (the targets are for one H100)."""
    if device.type != "cuda":
        return ""
    text = f"   target < {spec['target_s']} s on one H100 ({spec['label']})"
    if r["target_met"] is None:
        return text + ": not comparable (reduced sizes or epochs)"
    return text + (": met" if r["target_met"] else ": MISSED")

# -----------------------------------------------------------------------------
# --segmentation: the SETR-PUP ADE20K training iteration and sliding-window inference


def _compiled_or_eager(make, model, use_compile, device, what):
    """(make(torch.compile(model)), "torch.compile") if its first call (run here, untimed) works, else
    (make(model), "eager ...") with the reason printed. make(forward) returns the function to time."""
    if not use_compile:
        return make(model), "eager"
    fn = make(torch.compile(model))
    try:
        fn()
        _sync(device)
        return fn, "torch.compile"
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any compiler failure: time eager instead, and say so
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        note = f"eager (torch.compile failed on the {what}: {type(err).__name__}: {reason})"
        print(f"  {note}", flush=True)
        return make(model), note


def _window_count(height, width, crop, stride):
    """Sliding windows segmentation.slide_inference runs on a height x width image."""
    h, w = max(height, crop), max(width, crop)
    return (max(h - crop + stride - 1, 0) // stride + 1) * (max(w - crop + stride - 1, 0) // stride + 1)


def run_segmentation(args, device):
    """Time segmentation.py's training iteration (forward, main + 0.4 x aux losses, backward, SGD step, poly
    lr step) on random data, then segmentation.predict (single scale, sliding window) on one 512x683 image.
    Returns every number as a dict."""
    batch, crop, prompts = args.batch[0], args.img_size, args.prompts[0]
    arch, overrides = arch_spec(args.arch)
    cfg = segmentation.segmentation_config(dict(
        method=args.method, arch=arch, arch_overrides=overrides, num_prompts=prompts, crop_size=crop,
        batch_size=batch, **({"head_channels": TINY_HEAD_CHANNELS} if args.arch == "tiny" else {})))
    bf16 = device.type == "cuda"
    use_compile = args.compile and device.type == "cuda"   # compiling on a CPU takes minutes
    print(f"segmentation: SETR-PUP (aux heads on blocks {', '.join(map(str, cfg['aux_blocks']))}) on {args.arch} "
          f"(random weights), {cfg['method']}, {prompts} prompts, {segmentation.NUM_CLASSES} classes, batch "
          f"{batch} of {crop}x{crop} random crops | {runtime.device_name(device)} | "
          f"{'bf16 autocast' if bf16 else 'fp32'}{', compile requested' if use_compile else ', eager'}", flush=True)
    if use_compile:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = segmentation.build_segmenter(cfg, verbose=False).to(device)
    optimizer = torch.optim.SGD(model.param_groups(cfg["lr"]), lr=cfg["lr"], momentum=0.9, weight_decay=0.0)
    scheduler = segmentation.poly_scheduler(optimizer, SEG_ITERS)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen).to(device)
    labels = torch.randint(0, segmentation.NUM_CLASSES, (batch, crop, crop), generator=gen).to(device)

    def make_step(forward):
        def step():   # segmentation.train_segmentation's iteration
            with runtime.autocast(device, bf16):
                logits, aux = forward(images)
            loss = segmentation.seg_loss(logits, labels) + segmentation.AUX_LOSS_WEIGHT * sum(
                segmentation.seg_loss(a, labels) for a in aux)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            return loss.detach()
        return step

    model.train()
    _reset_memory(device)
    step, train_mode = _compiled_or_eager(make_step, model, use_compile, device, "training step")
    rates = time_loop(step, batch, args.steps, args.warmup, args.repeats, device)   # images/s
    train_peak = _peak_memory_gib(device)

    model.eval()
    image = torch.randint(0, 256, (3,) + SEG_TEST_IMAGE, dtype=torch.uint8, generator=gen).to(device)
    stride = crop * 2 // 3   # mmseg's 341 for 512

    def make_infer(forward):
        return lambda: segmentation.predict(forward, image, crop, stride, multi_scale=False, bf16=bf16)

    _reset_memory(device)
    infer, infer_mode = _compiled_or_eager(make_infer, model, use_compile, device, "inference")
    infer_rates = time_loop(infer, 1, args.steps, max(1, args.warmup), args.repeats, device)
    infer_peak = _peak_memory_gib(device)

    images_per_s = statistics.median(rates)
    iters_per_s = images_per_s / batch
    seconds_per_image = 1 / statistics.median(infer_rates)
    test_size = segmentation.rescale_size(*SEG_TEST_IMAGE, (4 * crop, crop))   # = 512 x 683 at crop 512
    result = {
        "arch": args.arch, "method": cfg["method"], "num_prompts": prompts, "batch_size": batch, "crop_size": crop,
        "num_classes": segmentation.NUM_CLASSES, "bf16": bf16, "train_mode": train_mode, "infer_mode": infer_mode,
        "compiled": train_mode == "torch.compile",
        "iters_per_s": iters_per_s, "iters_per_s_min": min(rates) / batch, "iters_per_s_max": max(rates) / batch,
        "images_per_s": images_per_s, "train_peak_memory_gib": train_peak,
        "projected_iters": SEG_ITERS, "projected_s": SEG_ITERS / iters_per_s,
        "projected_hours": SEG_ITERS / iters_per_s / 3600,
        "infer_image": list(SEG_TEST_IMAGE), "infer_scaled_to": list(test_size),
        "infer_windows": _window_count(*test_size, crop, stride), "infer_s_per_image": seconds_per_image,
        "infer_peak_memory_gib": infer_peak,
        "projected_val_eval_s": ADE_VAL_IMAGES * seconds_per_image,   # single scale, if all were this size
    }
    print(format_segmentation(result), flush=True)
    return result


def format_segmentation(r):
    def mem(gib):
        return f"   peak {gib:.2f} GiB" if gib is not None else ""
    lines = [
        (f"train iteration ({r['train_mode']})",
         f"{r['iters_per_s']:.3f} it/s ({r['iters_per_s_min']:.3f}-{r['iters_per_s_max']:.3f})   "
         f"{r['images_per_s']:.1f} images/s" + mem(r["train_peak_memory_gib"])),
        (f"{r['projected_iters']:,} iterations (the schedule)", f"{r['projected_hours']:.2f} h projected"),
        (f"slide inference, one {r['infer_image'][0]}x{r['infer_image'][1]} image ({r['infer_mode']})",
         f"{r['infer_s_per_image']:.4f} s ({r['infer_windows']} windows of {r['crop_size']}px at "
         f"{r['infer_scaled_to'][0]}x{r['infer_scaled_to'][1]})" + mem(r["infer_peak_memory_gib"])),
        (f"{ADE_VAL_IMAGES:,} val images, single scale", f"{r['projected_val_eval_s']:.0f} s projected"),
    ]
    width = max(len(name) for name, _ in lines) + 2
    return "\n".join(f"  {name:<{width}}{value}" for name, value in lines)

# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Speed of Gated Prompt Tuning, three ways (random weights and data: speed only).\n\n"
                    "default        images/s, TFLOP/s and peak memory of the training step and evaluation\n"
                    "               step, fast path (bf16 + fused attention + torch.compile) against the\n"
                    "               reference path (fp32, explicit softmax, eager: the official code's\n"
                    "               numerics), from the same weights, with their speed ratio.\n"
                    "--end-to-end   seconds for one whole training run of reproduce.py on generated data of\n"
                    "               the real sizes (setup, epoch 1 with compiling, later epochs, evaluation).\n"
                    "--segmentation SETR-PUP ADE20K iterations/s, inference time, projected 160k-iteration hours.",
        epilog="examples:\n"
               "  python bench.py                                  # ViT-B/16, 100 prompts, batch 64\n"
               "  python bench.py --prompts 10 100 --batch 32 128 --json bench.json\n"
               "  python bench.py --sweep-prompts --sweep-batch    # fast path only\n"
               "  python bench.py --end-to-end vtab --json e2e_vtab.json   # target: < 60 s on one H100\n"
               "  python bench.py --end-to-end cub --json e2e_cub.json     # target: < 5 min on one H100\n"
               "  python bench.py --segmentation --json seg.json\n"
               "CPU smoke tests (seconds):\n"
               "  python bench.py --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 \\\n"
               "      --warmup 1 --repeats 2 --no-compile\n"
               "  python bench.py --end-to-end vtab --arch tiny --img-size 32 --train-images 24 \\\n"
               "      --test-images 16 --epochs 2 --batch 8\n"
               "  python bench.py --segmentation --arch tiny --img-size 64 --batch 2 --steps 2 \\\n"
               "      --warmup 1 --repeats 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--end-to-end", choices=sorted(END_TO_END), default=None, metavar="{vtab,cub}",
                      help="time one whole run of the harness (reproduce.py's make_loaders, build_model, train "
                           "with the paper's recipe, final test evaluation) on generated images: vtab = 1,000 "
                           "train / 10,000 test at 224px with the dtd/MAE recipe; cub = 5,994 train cached at "
                           "256px (random crop + flip on the GPU) / 5,794 test with the cub/MAE recipe")
    mode.add_argument("--segmentation", action="store_true",
                      help="time the SETR-PUP ADE20K training iteration (150 classes) and the sliding-window "
                           "inference of one 512x683 image; project the 160,000-iteration schedule")
    p.add_argument("--arch", default="vit_base", choices=ARCH_CHOICES,
                   help="backbone size; tiny = 12 blocks of width 32, for CPU smoke tests (default: %(default)s)")
    p.add_argument("--method", default="gated+temp", choices=sorted(gp.METHODS),
                   help="what is trained (default: %(default)s)")
    p.add_argument("--prompts", type=int, nargs="+", default=None, metavar="P",
                   help="prompt counts to time, one or more (default: 100; --end-to-end: the recipe's, "
                        "1 for vtab and 100 for cub; one value only with --end-to-end / --segmentation)")
    p.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="training batch sizes, one or more (default: 64; --end-to-end: the recipe's, 128 for "
                        "vtab and 64 for cub; --segmentation: 16; one value only in those modes)")
    p.add_argument("--eval-batch-factor", type=int, default=4, metavar="K",
                   help="the evaluation step runs on K x the training batch (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution, a multiple of the patch size (default: 224; --segmentation: the "
                        "crop, 512)")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per repetition, also for --segmentation (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps before timing; torch.compile compiles here (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions; the table shows their median and min-max (default: %(default)s)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the fast path without torch.compile (compiling happens on CUDA only in the "
                        "--end-to-end and --segmentation modes)")
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
    e2e = p.add_argument_group("--end-to-end sizes (defaults: the real ones; smaller for a quick check)")
    e2e.add_argument("--epochs", type=int, default=None, metavar="N",
                     help="epochs to train (default: the recipe's 100); fewer also prints a projection to 100")
    e2e.add_argument("--train-images", type=int, default=None, metavar="N",
                     help="generated training images (default: 1000 for vtab, 5994 for cub)")
    e2e.add_argument("--test-images", type=int, default=None, metavar="N",
                     help="generated test images (default: 10000 for vtab, 5794 for cub)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)

    single_run = args.end_to_end or args.segmentation
    if single_run and (args.sweep_prompts is not None or args.sweep_batch is not None):
        p.error("--sweep-prompts / --sweep-batch time the step table; not with --end-to-end or --segmentation")
    if not args.end_to_end and any(v is not None for v in (args.epochs, args.train_images, args.test_images)):
        p.error("--epochs, --train-images and --test-images belong to --end-to-end")
    for name in ("batch", "prompts"):
        values = getattr(args, name)
        if single_run and values is not None and len(values) > 1:
            p.error(f"--{name} takes one value with --end-to-end / --segmentation")
        if values is not None and min(values) < (1 if name == "batch" else 0):
            p.error(f"--{name} must be >= {1 if name == 'batch' else 0}")
    if args.batch is None and not args.end_to_end:
        args.batch = [16] if args.segmentation else [64]
    if args.prompts is None and not args.end_to_end:
        args.prompts = [100]
    if args.img_size is None:
        args.img_size = 512 if args.segmentation else data.IMAGE_SIZE
    patch = patch_size_of(args.arch)
    if args.img_size % patch:
        p.error(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {patch}")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if any(v is not None and v < 1 for v in (args.epochs, args.train_images, args.test_images)):
        p.error("--epochs, --train-images and --test-images must be >= 1")
    return args


def main(argv=None):
    """Run the benchmark; prints the table(s) (or the --end-to-end / --segmentation report) and returns
    every number as a dict (also --json)."""
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    out = {"device": runtime.device_name(device), "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "peak_bf16_tflops": peak, "args": vars(args), "results": [], "ratios": [], "sweeps": {}}
    if args.end_to_end:
        out["end_to_end"] = run_end_to_end(args, device)
    elif args.segmentation:
        out["segmentation"] = run_segmentation(args, device)
    else:
        print(f"{args.arch}, {args.method}, {args.img_size}px, eval batch = {args.eval_batch_factor} x batch | "
              f"{out['device']} (bf16 dense peak: {peak or 'unknown'} TFLOP/s) | torch {torch.__version__} | "
              f"fast = bf16 + SDPA{' + compile' if args.compile else ''}, reference = fp32 + explicit softmax, "
              f"eager")
        sweeps = [("prompts", args.sweep_prompts, SWEEP_PROMPTS), ("batch", args.sweep_batch, SWEEP_BATCH)]
        if all(values is None for _, values, _ in sweeps):
            out["results"], out["ratios"] = run_table(args, device, peak)
        for name, values, default in sweeps:
            if values is not None:
                out["sweeps"][name] = run_sweep(args, device, peak, name, values or list(default))
    if args.json:
        runtime.write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
