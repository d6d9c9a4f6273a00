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
"""
import argparse
import gc
import statistics
import time

import torch

import gated_prompt as gp
import runtime

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
    def make():
        return gp.VisionTransformer(
            gp.vit_config(args.arch, SSL, img_size=args.img_size, fused_attention=fused),
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
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Images/s, TFLOP/s and peak memory of the Gated Prompt Tuning training step and\n"
                    "evaluation step, for the fast path (bf16 + fused attention + torch.compile) and the\n"
                    "reference path (fp32, explicit softmax, eager: the official code's numerics), from\n"
                    "the same weights, with their speed ratio. Random weights and data: speed only.",
        epilog="examples:\n"
               "  python bench.py                                  # ViT-B/16, 100 prompts, batch 64\n"
               "  python bench.py --prompts 10 100 --batch 32 128 --json bench.json\n"
               "  python bench.py --sweep-prompts --sweep-batch    # fast path only\n"
               "  python bench.py --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 \\\n"
               "      --warmup 1 --repeats 2 --no-compile          # CPU smoke test, seconds",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_base", choices=sorted(gp.ARCHS), help="backbone size (default: %(default)s)")
    p.add_argument("--method", default="gated+temp", choices=sorted(gp.METHODS),
                   help="what is trained (default: %(default)s)")
    p.add_argument("--prompts", type=int, nargs="+", default=[100], metavar="P",
                   help="prompt counts to time, one or more (default: 100)")
    p.add_argument("--batch", type=int, nargs="+", default=[64], metavar="B",
                   help="training batch sizes, one or more (default: 64)")
    p.add_argument("--eval-batch-factor", type=int, default=4, metavar="K",
                   help="the evaluation step runs on K x the training batch (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution, a multiple of the patch size "
                                                             "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps before timing; torch.compile compiles here (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions; the table shows their median and min-max (default: %(default)s)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run the fast path without torch.compile")
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
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if args.img_size % gp.ARCHS[args.arch][0]:
        p.error(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {gp.ARCHS[args.arch][0]}")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None):
    """Run the benchmark; prints the table(s) and returns every number as a dict (also --json)."""
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    out = {"device": runtime.device_name(device), "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "peak_bf16_tflops": peak, "args": vars(args), "results": [], "ratios": [], "sweeps": {}}
    print(f"{args.arch}, {args.method}, {args.img_size}px, eval batch = {args.eval_batch_factor} x batch | "
          f"{out['device']} (bf16 dense peak: {peak or 'unknown'} TFLOP/s) | torch {torch.__version__} | "
          f"fast = bf16 + SDPA{' + compile' if args.compile else ''}, reference = fp32 + explicit softmax, eager")
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
