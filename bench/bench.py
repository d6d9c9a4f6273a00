"""Throughput benchmark for Gated Prompt Tuning: the fast path against the official code's numerics.

Every config comes from config.resolve and every model from config.model_from_config; the training step is
runtime.make_train_step with classification.classifier_forward and classification.classification_loss, the evaluation step
classification.make_eval_step -- what classification.fit trains and evaluates with (segmentation: segmentation.Training).
Two paths:

  fast       bf16 autocast + fused attention (SDPA) + torch.compile of the backbone, frozen weights stored in
             bf16 on CUDA: what training runs;
  reference  fp32, explicit-softmax attention, eager: the official code's numerics;

starting from the same weights, both stepping runtime.make_optimizer's SGD (fused on CUDA). Printed:
images/s (median and min-max over --repeats), achieved TFLOP/s (analytic count, see `flops`), the fraction
of the GPU's bf16 dense peak, peak GPU memory, the SDPA kernel that ran, whether the timed calls ran compiled
(counted), and the fast/reference speed-up, all measured in the same run. torch.compile runs on CUDA unless
--no-compile (--compile forces it on a CPU, where compiling takes minutes); a compiler that cannot work on the
device stops the benchmark at start with exit status 2.

    python -m bench --report --only step --out-dir bench   # the headline rows -> the committed bench/BENCHMARKS.md
    python -m bench                                   # ViT-B/16, gated+temp, 100 prompts, batch 64
    python -m bench --prompts 10 100 --batch 32 128 --json bench.json
    python -m bench --kernels qkv-attention --fp8       # opt-in kernels on the fast path (FP8: sm_89+ only)
  python -m bench --sweep-prompts --sweep-batch     # fast path: images/s vs prompts and vs batch
    python -m bench --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 --warmup 1 --repeats 2

On a CPU the same code runs (bf16 autocast works there too); peak fraction and memory are left blank.
--end-to-end and --segmentation: bench/runs.py. --report: the units below (report_units) measured in order,
headline first, each written to benchmarks.json as it finishes (bench/report.py: targets, store, writer), in
runs/bench/ unless --out-dir says otherwise: only --out-dir bench writes the committed report.
"""
import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn import attention as nn_attention
from torch.nn.attention import SDPBackend

if __name__ == "__main__" and not __package__:   # `python bench/bench.py`: import from the repository root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import report
from harness.data import datasets
import gated_prompt as gp
from harness import config
from harness import runtime
from harness import serving
from harness import classification
from harness import kernels as fast_kernels
from bench.runs import (ARCH_CHOICES, END_TO_END, SEGMENTATION_LEVERS, SSL, _compiled_or_eager, _peak_memory_gib,
                        _release, _reset_memory, arch_spec, compile_enabled, patch_size_of, run_end_to_end,
                        run_mode_of, sdpa_kernel, segmentation_config, table2_projection, time_loop, time_lr_sweep,
                        time_mini_table, time_segmentation, time_segmentation_lever)

NUM_CLASSES = 100   # `flops`' default head size; the head's FLOPs are negligible whatever it is
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
REPORT_DEFAULTS = dict(steps=10, warmup=3, repeats=3, epochs=5)
# --report --arch tiny: sizes for a CPU smoke run of the same code; its step batches are the report's / 16
REPORT_SMOKE = dict(img_size=32, steps=1, warmup=1, repeats=2, epochs=2, train_images=16, val_images=8,
                    test_images=8)
SMOKE_BATCH_DIVISOR = 16
REPORT_OUT_DIR = "runs/bench"   # --report's default: never the committed report (bench/), which --out-dir bench names
TABLE_DEFAULTS = dict(steps=20, warmup=5, repeats=5)


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

def peak_tflops(device, override=None):
    """The device's bf16 dense peak (TFLOP/s) from PEAK_BF16_TFLOPS, `override` if given, else None."""
    if override:
        return override
    return peak_for_name(runtime.device_name(device)) if device.type == "cuda" else None


def peak_for_name(name):
    """Look a GPU name (as torch.cuda.get_device_name gives it) up in PEAK_BF16_TFLOPS; None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.upper() in name.upper()), None)


# -----------------------------------------------------------------------------
# The training and evaluation step, fast and reference path


def step_config(args, num_prompts, batch, task=STEP_TASK):
    """The resolved config the step benchmark builds its model (head: the task's classes) and optimizer from."""
    arch, overrides = arch_spec(args.arch)
    return config.resolve(task, SSL, args.method, arch=arch, arch_overrides=overrides, img_size=args.img_size,
                           num_prompts=num_prompts, batch_size=batch)


def build_path_model(cfg, path, state=None):
    """The model of one path (random weights: speed does not depend on them); the reference path runs the
    explicit-softmax attention. Given `state` (a state dict) it takes exactly those weights, so that both
    paths start from the same model."""
    vit_overrides = {} if path == "fast" else {"fused_attention": False}

    def make():
        return config.model_from_config(cfg, cfg.head_size(), verbose=False, **vit_overrides)
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
    return runtime.make_optimizer(model.trainable_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                                  device)


def measure(args, device, path, num_prompts, batch, state=None, peak=None, compile=None, task=STEP_TASK,
            eval_batch=None, kernels=(), backends=None, kinds=("train", "eval"), timer=None):
    """Time the training and the evaluation step of one path ("fast" or "reference") on `task`'s recipe, as
    classification.fit runs them (the fast path's backbone compiled apart from the head: classification.classifier_forward).
    compile: None = the run's setting (compile_enabled) for the fast path; the reference path never compiles.
    eval_batch: None = --eval-batch-factor x batch. Each step's inputs are made after the memory reset before it,
    so the training row's peak holds no evaluation batch. kernels, backends: the fast path's opt-in kernels
    (harness.kernels.apply); kinds: the steps timed; timer: time_loop's stand-in (the profiled step).
    Returns (rows, state dict of the initial weights)."""
    fast = path == "fast"
    compile = (compile_enabled(args, device) if compile is None else compile) if fast else False
    _release(device)
    if compile:
        runtime.reset_compiler()   # every configuration starts from empty dynamo caches, as every harness run
    cfg = step_config(args, num_prompts, batch, task)
    model = build_path_model(cfg, path, state)
    state = state if state is not None else {k: v.clone() for k, v in model.state_dict().items()}
    runtime.place_model(model, device, bf16=fast)
    fast_kernels.apply(model, kernels if fast else (), device, backends)
    optimizer = make_optimizer(cfg, model, device)
    count, size, classes = model_flops(model), cfg.img_size, cfg.head_size()
    eval_batch = eval_batch or batch * args.eval_batch_factor
    gen = torch.Generator().manual_seed(0)

    def inputs(n):
        return (torch.randn(n, 3, size, size, generator=gen).to(device),
                torch.randint(0, classes, (n,), generator=gen).to(device))

    def make_train(c):
        images, labels = inputs(batch)
        forward = classification.classifier_forward(model, device, fast, c, args.compile_mode)
        step = runtime.make_train_step(model, optimizer, classification.classification_loss, device, forward=forward)
        return (lambda: step(images, labels)), step.compiled

    def make_eval(c):
        images, labels = inputs(eval_batch)
        eval_step = classification.make_eval_step(model, device, fast, c, args.compile_mode)
        return (lambda: eval_step(images, labels)), eval_step.compiled

    kernel = "QKVAttention" if fast and "qkv-attention" in kernels else sdpa_kernel(model, inputs(2)[0], device, fast)
    rows = []
    for kind, make, n, flops_per_image in (("train", make_train, batch, count["train"]),
                                           ("eval", make_eval, eval_batch, count["forward"])):
        if kind not in kinds:
            continue
        model.train(kind == "train")
        _reset_memory(device)
        fn, counted, compile_s = _compiled_or_eager(make, compile, device, f"{kind} step")
        rates = (timer or time_loop)(fn, n, args.steps, args.warmup, args.repeats, device)
        rows.append(step_row(path, kind, num_prompts, n, rates, flops_per_image, peak, device, fast,
                             run_mode_of(counted), compile_s, kernel))
        rows[-1]["kernels"] = list(kernels) if fast else []
        del fn
    del model, optimizer
    _release(device)
    return rows, state


def step_row(path, kind, num_prompts, batch, rates, flops_per_image, peak, device, fast, mode, compile_s, kernel):
    median = statistics.median(rates)
    tflops = median * flops_per_image / 1e12
    return {"prompts": num_prompts, "batch": batch, "path": path, "step": kind,
            "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
            "repeats": rates, "gflops_per_image": flops_per_image / 1e9, "tflops": tflops,
            "peak_fraction": tflops / peak if peak else None, "peak_memory_gib": _peak_memory_gib(device),
            "mode": mode, "compiled": mode == "torch.compile", "compile_s": compile_s, "bf16": fast,
            "fused_attention": fast, "sdpa_kernel": kernel}


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
            rows, pair_ratios = compare_paths(args, device, peak, num_prompts, batch, args.skip_reference,
                                              kernels=args.kernels)
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
            measured[key] = _measure_or_oom(args, device, "fast", *key, peak=peak, compile=compile,
                                            kernels=args.kernels)[0] or []
        for row in measured[key]:
            print(format_row(row), flush=True)
            rows.append(row)
    return rows

# -----------------------------------------------------------------------------
# Kernels: harness.kernels' opt-in levers against today's fast path (both in the same unit), the SDPA backends per
# sequence length, the GEMM-shape ceiling and the kernel-type split of one profiled training step

ATTENTION_BACKENDS = ("cudnn", "flash", "efficient")   # SDPA's fused kernels; math is the reference path's
# the step's levers: together without and with FP8 (the targets' two cases), then each alone
LEVERS = (report.LEVERS_BF16, report.LEVERS_FP8, ("qkv-attention",), ("attention-backend",), ("fp8",))
AGREEMENT_BATCH = 4          # images of the one eager step that compares a lever's numbers with today's
PROFILED_STEPS = 3           # training steps recorded by the kernel-split profile
CLI_KERNELS = ("qkv-attention", "upsample", "channels-last")   # --kernels (attention-backend needs a measured table)
SDPA_NAMES = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
              "MATH": "math"}
# kernel / operator name -> type, first match wins (attention first: fused attention kernels may name cutlass)
KERNEL_TYPES = (("attention", r"flash|fmha|attention|sdpa|softmax"),
                ("GEMM", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|triton_tem|scaled_mm|conv|"
                         r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
                ("elementwise", r"elementwise|vectorized|triton_(poi|red|per)|reduce|norm|gelu|copy|cat|fill|"
                                r"index|gather|scatter|upsample|^aten::"),
                ("other", r""))


def step_model(args, prompts, batch, task=STEP_TASK):
    """The step benchmark's model for (prompts, batch) on the meta device: its shapes, no memory."""
    cfg = step_config(args, prompts, batch, task)
    with torch.device("meta"):
        return config.model_from_config(cfg, cfg.head_size(), verbose=False)


def block_tokens(vit, prompted=True):
    """Tokens in one block: CLS, prompts (if `prompted`), registers, patches."""
    cfg = vit.cfg
    return 1 + (vit.num_prompts if prompted else 0) + cfg.num_reg_tokens + (cfg.img_size // cfg.patch_size) ** 2


def attention_shapes(args):
    """(what, batch, tokens, heads, head dim) of the report's prompted attention: each step point's, and SETR-PUP's
    at its crop."""
    shapes = []
    for prompts, batch, _, task, _ in report_shapes(args)[0]:
        vit = step_model(args, prompts, batch, task)
        shapes.append((f"step {prompts}x{batch}", batch, block_tokens(vit)))
    seg = segmentation_config(args)
    with torch.device("meta"):
        vit = config.model_from_config(seg, 0, verbose=False)
    shapes.append((f"SETR-PUP {seg.img_size}px", seg.batch_size, block_tokens(vit)))
    return [(what, batch, tokens, vit.cfg.num_heads, vit.cfg.embed_dim // vit.cfg.num_heads)
            for what, batch, tokens in shapes]


def time_attention_backends(args, device):
    """Forward + backward of scaled_dot_product_attention (bf16, q / k / v views of one packed projection, as the
    model runs it) under each of ATTENTION_BACKENDS at the report's sequence lengths: ms per call, SDPA's own
    choice, and the fastest -- `table` {tokens: kernel}, what harness.kernels' attention-backend lever runs.
    A CPU has none of these kernels: "n/a"."""
    if device.type != "cuda":
        return {"n/a": f"SDPA's CUDA kernels; this device is {runtime.device_name(device)}", "shapes": [], "table": {}}
    rows, table = [], {}
    for what, batch, tokens, heads, dim in attention_shapes(args):
        packed = torch.randn(batch, tokens, 3, heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = packed.permute(2, 0, 3, 1, 4)
        grad = torch.randn(batch, heads, tokens, dim, device=device, dtype=torch.bfloat16)
        default = SDPBackend(torch._fused_sdp_choice(q, k, v)).name
        ms, failed = {}, {}
        for name in ATTENTION_BACKENDS:
            def call(name=name):
                with nn_attention.sdpa_kernel([fast_kernels.SDPA_BACKENDS[name]]):
                    out = F.scaled_dot_product_attention(q, k, v)
                return torch.autograd.grad(out, packed, grad)
            try:
                ms[name] = 1000 / statistics.median(time_loop(call, 1, args.steps, args.warmup, args.repeats, device))
            except RuntimeError as err:   # a kernel that does not take this shape / dtype / device
                failed[name] = (str(err).strip().splitlines() or [""])[0][:200]
        winner = min(ms, key=ms.get) if ms else None
        if winner:
            table[str(tokens)] = winner
        rows.append({"what": what, "batch": batch, "tokens": tokens, "heads": heads, "head_dim": dim, "ms": ms,
                     "failed": failed, "sdpa_default": SDPA_NAMES.get(default, default), "winner": winner})
        print(f"  attention {what}: {batch} x {tokens} tokens: "
              + ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items()) + f" | SDPA picks {rows[-1]['sdpa_default']},"
              f" fastest {winner}", flush=True)
        del packed, q, k, v, grad
    return {"shapes": rows, "table": table}


def lever_refusal(lever, device, table):
    """Why `lever` cannot run here, or None."""
    if lever == "fp8":
        return fast_kernels.fp8_unsupported(device, flag="fp8")
    if lever == "attention-backend" and not table:
        return "attention-backend: no measured table of SDPA kernels per sequence length on this device"
    return None


def lever_agreement(args, device, prompts, task, levers, table):
    """One eager bf16 training forward + backward of AGREEMENT_BATCH images, today's fast path and with `levers`,
    from the same weights (eval mode: no dropout): the largest difference of the logits and of the prompts'
    gradient, relative to today's largest value. The float64 equality is proven on a CPU (tests/test_kernels.py);
    this says that the device's kernels compute the same model."""
    cfg = step_config(args, prompts, AGREEMENT_BATCH, task)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(AGREEMENT_BATCH, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    state, found = None, []
    for names in ((), levers):
        model = build_path_model(cfg, "fast", state)
        if state is None:   # temperatures away from 1, so that folding them into the projection is exercised
            state = {k: v.clone() for k, v in model.state_dict().items()}
            if "temperatures" in state:
                state["temperatures"] = torch.linspace(0.5, 2.0, len(state["temperatures"]))
            model.load_state_dict(state)
        runtime.place_model(model, device, bf16=True)
        fast_kernels.apply(model, names, device, table)
        model.eval()
        with runtime.autocast(device, True):
            logits = model(images)
        logits.float().logsumexp(-1).sum().backward()
        found.append((logits.detach().float(), model.prompts.grad.detach().float()))
        del model
    (logits, grad), (lever_logits, lever_grad) = found
    return {"logits": ((lever_logits - logits).abs().max() / logits.abs().max()).item(),
            "prompt_grad": ((lever_grad - grad).abs().max() / grad.abs().max()).item()}


def time_lever(args, device, peak, prompts, batch, task, levers, table):
    """The training step of today's fast path, then with `levers` (harness.kernels) on, from the same weights, in
    this unit: both rows, their ratio, and lever_agreement. attention-backend without a measured table is left out
    and named; a set with a lever that cannot run here otherwise (FP8 on a CPU or before sm_89) is not timed --
    without it, it would repeat another unit -- and the unit holds the reason."""
    refused = {lever: lever_refusal(lever, device, table) for lever in levers}
    refused = {lever: why for lever, why in refused.items() if why}
    on = [lever for lever in levers if lever not in refused]
    out = {"prompts": prompts, "batch": batch, "task": task, "asked": list(levers), "kernels": on, "left_out": refused}
    if not on or set(refused) - {"attention-backend"}:
        print(f"  {'+'.join(levers)}: not run: " + "; ".join(refused.values()), flush=True)
        return out
    table = {int(tokens): name for tokens, name in (table or {}).items()}
    kw = dict(peak=peak, task=task, kinds=("train",))
    today, state = _measure_or_oom(args, device, "fast", prompts, batch, **kw)
    if today is None:
        return dict(out, left_out=dict(refused, today="out of GPU memory"))
    lever, _ = _measure_or_oom(args, device, "fast", prompts, batch, state=state, kernels=on, backends=table, **kw)
    if lever is None:
        return dict(out, left_out=dict(refused, lever="out of GPU memory"), today=today[0])
    if "attention-backend" in on:
        lever[0]["sdpa_kernel"] += " (measured table)"
    ratio = lever[0]["images_per_s"] / today[0]["images_per_s"]
    agreement = lever_agreement(args, device, prompts, task, on, table)
    for row in (today[0], lever[0]):
        print(format_row(row) + f"  {'+'.join(row['kernels']) or 'today'}", flush=True)
    print(f"  {'+'.join(on)}: {ratio:.3f}x today's train step; relative difference: logits "
          f"{agreement['logits']:.2e}, prompt gradient {agreement['prompt_grad']:.2e}", flush=True)
    return dict(out, today=today[0], lever=lever[0], ratio=ratio, agreement=agreement)


def time_autotune(args, device, peak, prompts, batch, task):
    """Bias and GELU fused into the fc1 / fc2 GEMMs (forward and backward): inductor's max-autotune mode times
    Triton GEMM templates with those epilogues against cuBLAS at each shape of the graph and keeps the faster, so
    this lever is a compile mode, not a kernel of ours. Today's compiled train step, then the same compiled with
    mode max-autotune, from the same weights: both rows, the ratio, and the compiling-call seconds of each (what
    the autotuning costs, paid once per graph shape). Other GEMM kernels round bf16 differently: same math."""
    out = {"prompts": prompts, "batch": batch, "task": task, "asked": ["max-autotune"], "kernels": ["max-autotune"],
           "left_out": {}}
    if not compile_enabled(args, device):
        return dict(out, kernels=[], left_out={"max-autotune": "a torch.compile mode, and compile is off here"})
    kw = dict(peak=peak, task=task, kinds=("train",))
    today, state = _measure_or_oom(args, device, "fast", prompts, batch, **kw)
    if today is None:
        return dict(out, left_out={"today": "out of GPU memory"})
    tuned_args = argparse.Namespace(**dict(vars(args), compile_mode="max-autotune"))
    tuned, _ = _measure_or_oom(tuned_args, device, "fast", prompts, batch, state=state, **kw)
    if tuned is None:
        return dict(out, left_out={"lever": "out of GPU memory"}, today=today[0])
    compile_s = {"default": today[0]["compile_s"], "max-autotune": tuned[0]["compile_s"]}
    tuned[0]["mode"] += (f" max-autotune (compiling call {_or_blank(compile_s['max-autotune'])} s, default mode "
                         f"{_or_blank(compile_s['default'])} s)")
    ratio = tuned[0]["images_per_s"] / today[0]["images_per_s"]
    print(f"  max-autotune: {ratio:.3f}x today's train step; compiling call {compile_s}", flush=True)
    return dict(out, today=today[0], lever=tuned[0], ratio=ratio, compile_s=compile_s)


def _or_blank(seconds):
    return "n/a" if seconds is None else f"{seconds:.0f}"


def step_gemms(vit, batch):
    """The matmuls of one training step of a prompted frozen ViT, as [name, M, N, K, count] (an [M, K] x [K, N]
    product `count` times): the patch embedding, each block's qkv / proj / fc1 / fc2 forward, and their input
    gradients (dx = dy W) in the blocks gradients flow through -- the frozen weights get none. Blocks before the
    prompts' insertion see fewer tokens. The same matmuls as `flops` counts (its linear terms)."""
    cfg, D = vit.cfg, vit.cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    patches = (cfg.img_size // cfg.patch_size) ** 2
    first_backward = (1 if vit.temperatures is not None else vit.pcfg.insert_at) if vit.num_prompts else None
    counts = {("patch embedding", batch * patches, D, 3 * cfg.patch_size ** 2): 1}
    for block in range(1, cfg.depth + 1):
        M = batch * block_tokens(vit, prompted=block >= vit.pcfg.insert_at)
        shapes = [("qkv", M, 3 * D, D), ("proj", M, D, D), ("fc1", M, hidden, D), ("fc2", M, D, hidden)]
        if first_backward is not None and block >= first_backward:
            shapes += [("qkv dx", M, D, 3 * D), ("proj dx", M, D, D), ("fc1 dx", M, D, hidden), ("fc2 dx", M, hidden, D)]
        for shape in shapes:
            counts[shape] = counts.get(shape, 0) + 1
    return [[*shape, count] for shape, count in counts.items()]


def time_gemm_ceiling(args, device):
    """torch.matmul (bf16) at every GEMM shape of the report's training steps against the square-matmul peak
    measured here: TFLOP/s and fraction of that peak per shape, and per step the milliseconds all its GEMMs take
    at those rates -- the images/s the step would reach if nothing but its GEMMs took time."""
    peak = report.measure_matmul_peak(device)
    points = []
    for prompts, batch, _, task, _ in report_shapes(args)[0]:
        rows = []
        for name, M, N, K, count in step_gemms(step_model(args, prompts, batch, task), batch):
            a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            # forward: x W^T with W [N, K] stored row-major (F.linear); input gradient: dy W with W [K, N]
            w = torch.randn(N, K, device=device, dtype=torch.bfloat16).t() if "dx" not in name else \
                torch.randn(K, N, device=device, dtype=torch.bfloat16)
            rate = statistics.median(time_loop(lambda: torch.matmul(a, w), 1, args.steps, args.warmup, args.repeats,
                                               device))
            tflops = 2 * M * N * K * rate / 1e12
            rows.append({"name": name, "M": M, "N": N, "K": K, "count": count, "tflops": tflops,
                         "peak_fraction": tflops / peak["tflops"], "ms_per_step": 1000 * count / rate})
            del a, w
        gemm_ms = sum(r["ms_per_step"] for r in rows)
        flop = sum(2 * r["M"] * r["N"] * r["K"] * r["count"] for r in rows)
        points.append({"prompts": prompts, "batch": batch, "shapes": rows, "gemm_ms_per_step": gemm_ms,
                       "gemm_tflops": flop / gemm_ms / 1e9, "peak_fraction": flop / gemm_ms / 1e9 / peak["tflops"],
                       "ceiling_images_per_s": batch / gemm_ms * 1000})
        print(f"  GEMMs of the step at {prompts} prompts, batch {batch}: {gemm_ms:.2f} ms "
              f"({points[-1]['gemm_tflops']:.1f} TFLOP/s, {100 * points[-1]['peak_fraction']:.1f}% of the square "
              f"matmul's {peak['tflops']:.1f}) -> at most {points[-1]['ceiling_images_per_s']:,.0f} img/s", flush=True)
    return {"matmul_peak": peak, "points": points}


def kernel_type(name):
    return next(kind for kind, pattern in KERNEL_TYPES if re.search(pattern, name, re.IGNORECASE))


def kernel_split(prof, device, steps):
    """Milliseconds per step by KERNEL_TYPES of a torch.profiler run over `steps` steps: the CUDA kernels' own
    time on a GPU; on a CPU the operators' self time (aten ops and the Python ranges around them). Also the ten
    largest entries."""
    events = [e for e in prof.key_averages()]
    cuda = [e for e in events if device.type == "cuda" and str(e.device_type).endswith("CUDA")]
    if cuda:
        timed = [(e.key, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))
                 for e in cuda]
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events]
    split = {kind: 0.0 for kind, _ in KERNEL_TYPES}
    for name, us in timed:
        split[kernel_type(name)] += us / 1000 / steps
    top = sorted(timed, key=lambda t: -t[1])[:10]
    return {"source": "CUDA kernels" if cuda else "CPU operators (self time)", "ms_per_step": split,
            "total_ms_per_step": sum(split.values()),
            "top": [{"name": name[:120], "type": kernel_type(name), "ms_per_step": us / 1000 / steps}
                    for name, us in top]}


def profile_step_split(args, device, peak, prompts, batch, task):
    """Today's fast-path training step at (prompts, batch), compiled as the step rows: its rate, then
    PROFILED_STEPS steps under torch.profiler, split by kernel type (kernel_split)."""
    found = {}

    def profiled(fn, n, steps, warmup, repeats, device):
        rates = time_loop(fn, n, steps, warmup, repeats, device)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                fn()
            runtime.synchronize(device)
        found.update(kernel_split(prof, device, PROFILED_STEPS))
        return rates
    rows, _ = _measure_or_oom(args, device, "fast", prompts, batch, peak=peak, task=task, kinds=("train",),
                              timer=profiled)
    if rows is None:
        return {"prompts": prompts, "batch": batch, "left_out": "out of GPU memory"}
    split = found["ms_per_step"]
    print(f"  kernel split of the train step ({found['source']}), ms per step: "
          + ", ".join(f"{kind} {ms:.2f}" for kind, ms in split.items()), flush=True)
    return dict(found, prompts=prompts, batch=batch, row=rows[0])


def recorded_failure(measure_unit, device):
    """measure_unit, but an error (a kernel the device or this torch rejects, memory) becomes the unit's figures,
    {"failed": "Type: first line"}, so that the report goes on to the next unit."""
    def run():
        try:
            return measure_unit()
        except Exception as err:  # noqa: BLE001 - any failure of an opt-in kernel is a finding, not a stop
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        _release(device)   # outside the except block: the traceback no longer holds the model
        print(f"  failed: {reason}", flush=True)
        return {"failed": reason}
    return run


def kernel_units(args, device, peak):
    """The kernels stage's units in order, as report_units' (stage, key, measure): the SDPA backends (whose table
    the attention-backend lever runs), the levers together (bf16, then with FP8) at both step points, SETR-PUP's
    levers together, the GEMM ceiling, the kernel split, then each lever alone. A unit that fails records why
    (recorded_failure) and the stage goes on."""
    (p0, b0, _, task0, _), (p1, b1, _, task1, _) = report_shapes(args)[0][:2]
    cache = {}

    def backends():
        if "backends" not in cache:
            cache["backends"] = recorded_failure(lambda: time_attention_backends(args, device), device)()
        return cache["backends"]

    def lever(prompts, batch, task, levers):
        key = f"lever {'+'.join(levers)} {prompts}x{batch}"
        return "kernels", key, lambda: time_lever(args, device, peak, prompts, batch, task, levers,
                                                  backends().get("table"))

    def segmentation(levers):
        return ("kernels", f"segmentation lever {'+'.join(levers)}",
                lambda: time_segmentation_lever(args, device, levers))
    together, alone = LEVERS[:2], LEVERS[2:]
    units = ([("kernels", "attention backends", backends)]
             + [lever(p, b, task, levers) for levers in together for p, b, task in ((p0, b0, task0), (p1, b1, task1))]
             + [segmentation(SEGMENTATION_LEVERS[-1])]
             + [("kernels", "gemm ceiling", lambda: time_gemm_ceiling(args, device)),
                ("kernels", f"kernel split {p0}x{b0}", lambda: profile_step_split(args, device, peak, p0, b0, task0))]
             + [lever(p0, b0, task0, levers) for levers in alone]
             + [("kernels", f"lever max-autotune {p0}x{b0}",
                 lambda: time_autotune(args, device, peak, p0, b0, task0))]
             + [segmentation(levers) for levers in SEGMENTATION_LEVERS[:-1]])
    return [(stage, key, recorded_failure(measure_unit, device)) for stage, key, measure_unit in units]


def kernel_report(units):
    """The kernels stage's units in the report: {attention_backends, levers, gemm_ceiling, kernel_split,
    segmentation_levers, failed: {unit: why}}, those measured so far."""
    ok = {k: v for k, v in units.items() if not (isinstance(v, dict) and "failed" in v)}
    return {"attention_backends": ok.get("attention backends"),
            "levers": [v for k, v in ok.items() if k.startswith("lever ")],
            "gemm_ceiling": ok.get("gemm ceiling"),
            "kernel_split": next((v for k, v in ok.items() if k.startswith("kernel split ")), None),
            "segmentation_levers": [v for k, v in ok.items() if k.startswith("segmentation lever ")],
            "failed": {k: v["failed"] for k, v in units.items() if k not in ok}}


# -----------------------------------------------------------------------------
# --report: the targets' figures in one process, written to BENCHMARKS.md and benchmarks.json


def report_shapes(args):
    """(points [(prompts, batch, target img/s, task, eval batch)], sweep prompts, sweep batches) of --report:
    report.REPORT_POINTS with the harness's eval batch (classification.make_loaders'), and the sweeps; --arch tiny
    divides every step batch by SMOKE_BATCH_DIVISOR (the CPU smoke run)."""
    divisor = SMOKE_BATCH_DIVISOR if args.arch == "tiny" else 1
    points = [(prompts, batch // divisor, target, task, max(classification.EVAL_BATCH, batch) // divisor)
              for prompts, batch, target, task in report.REPORT_POINTS]
    return points, SWEEP_PROMPTS, tuple(batch // divisor for batch in SWEEP_BATCH)


def report_units(args, device, peak):
    """The report's units in order, as (stage, key, measure() -> figures): the headline step comparison (100
    prompts, batch 64) first, then the device's matmul peak, the other comparison, the sweep points (fast path
    without compile; a point shared by both sweeps once), both end-to-end runs, the segmentation figures."""
    points, sweep_prompts, sweep_batch = report_shapes(args)

    def step_unit(prompts, batch, task, eval_batch):
        def run():
            rows, ratios = compare_paths(args, device, peak, prompts, batch, task=task, eval_batch=eval_batch)
            return {"rows": rows, "ratios": ratios}
        return run

    def sweep_unit(prompts, batch):
        return lambda: {"rows": _measure_or_oom(args, device, "fast", prompts, batch, peak=peak, compile=False)[0]
                        or []}
    units = [("step", f"step {p}x{b}", step_unit(p, b, task, eb)) for p, b, _, task, eb in points]
    units.insert(1, ("step", "matmul peak", lambda: report.measure_matmul_peak(device)))
    units += kernel_units(args, device, peak)
    (prompts_fixed, batch_fixed), sweep = points[0][:2], []
    for key in [(p, batch_fixed) for p in sweep_prompts] + [(prompts_fixed, b) for b in sweep_batch]:
        if key not in sweep:
            sweep.append(key)
            units.append(("sweeps", f"sweep {key[0]}x{key[1]}", sweep_unit(*key)))
    units += [("e2e", f"end-to-end {run}", lambda run=run: run_end_to_end(args, device, run)) for run in END_TO_END]
    units.append(("segmentation", "segmentation", lambda: time_segmentation(args, device)))
    units += [("table", "end-to-end vtab again", lambda: run_end_to_end(args, device, "vtab")),
              ("table", "lr sweep", lambda: time_lr_sweep(args, device)),
              ("table", "mini table 2", lambda: time_mini_table(device, "aot_eager"))]
    return units


def assemble_report(args, device, units):
    """The report's tables from the units measured so far (missing ones are left out)."""
    points, sweep_prompts, sweep_batch = report_shapes(args)
    (prompts_fixed, batch_fixed) = points[0][:2]
    steps = [units[f"step {p}x{b}"] for p, b, *_ in points if f"step {p}x{b}" in units]

    def sweep(keys):
        return [row for p, b in keys if f"sweep {p}x{b}" in units for row in units[f"sweep {p}x{b}"]["rows"]]
    tables = {"on_gpu": device.type == "cuda", "report_points": points,
              "results": [r for s in steps for r in s["rows"]],
              "ratios": [r for s in steps for r in s["ratios"]],
              "matmul_peak": units.get("matmul peak"),
              "sweeps": {"prompts": sweep([(p, batch_fixed) for p in sweep_prompts]),
                         "batch": sweep([(prompts_fixed, b) for b in sweep_batch])},
              "end_to_end": {run: units[f"end-to-end {run}"] for run in END_TO_END if f"end-to-end {run}" in units},
              "segmentation": units.get("segmentation"), "kernels": kernel_report(units),
              "table": {"vtab_again": units.get("end-to-end vtab again"), "lr_sweep": units.get("lr sweep"),
                        "mini_table": units.get("mini table 2"),
                        "projection": table2_projection(units.get("end-to-end vtab again"), units.get("lr sweep"))}}
    comparable = (device.type == "cuda" and "H100" in runtime.device_name(device).upper()
                  and args.arch == "vit_base" and args.method == "gated+temp"
                  and (args.img_size or datasets.IMAGE_SIZE) == datasets.IMAGE_SIZE)
    tables["targets"] = (report.target_rows(tables, comparable) + report.lever_target_rows(tables, comparable)
                         + report.table_target_rows(tables, comparable))
    return tables


def run_report(args, device, peak, header):
    """Measure the report's units of the chosen stages (--only) in order, skipping those the store already holds
    for this identity; the store rewrites benchmarks.json and BENCHMARKS.md after each. Returns the report."""
    identity = {"device": header["device"], "code_version": header["code_version"], "torch": header["torch"],
                **{k: getattr(args, k) for k in ("arch", "method", "img_size", "compile", "compile_mode", "steps",
                                                  "warmup", "repeats", "epochs", "train_images", "val_images",
                                                  "test_images", "eval_batch_factor", "peak_tflops")}}
    store = report.Store(args.out_dir, header, identity)
    units = [u for u in report_units(args, device, peak) if u[0] in args.only]
    print(f"--report: {len(units)} units ({', '.join(args.only)}) | {args.arch}, {args.method}, "
          f"{args.img_size or datasets.IMAGE_SIZE}px | {store.json}", flush=True)
    for n, (stage, key, measure_unit) in enumerate(units, 1):
        if key in store.units:
            print(f"[{n}/{len(units)}] {key}: measured earlier (same device and code), kept", flush=True)
            continue
        print(f"\n[{n}/{len(units)}] {key} ...", flush=True)
        tic = time.perf_counter()
        store.add(key, measure_unit(), lambda done: assemble_report(args, device, done))
        print(f"[{n}/{len(units)}] {key}: done in {time.perf_counter() - tic:.1f} s, written to {store.json}",
              flush=True)
    out = store.write(assemble_report(args, device, store.units))
    print("\ntargets (one H100):")
    for t in out["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['figure']}: {report.format_value(t['value'], t['unit'])} (target {t['op']} "
              f"{report.format_value(t['target'], t['unit'])}): {met}")
    print(f"wrote {store.markdown} and {store.json}")
    return out


# -----------------------------------------------------------------------------
# CLI

DESCRIPTION = """Speed of Gated Prompt Tuning (random weights and data: speed only).

default        images/s, TFLOP/s and peak memory of the training step and evaluation
               step, fast path (bf16 + fused attention + torch.compile) against the
               reference path (fp32, explicit softmax, eager: the official code's
               numerics), from the same weights, with their speed ratio.
--end-to-end   seconds for one whole training run (classification.fit) on generated data of
               the real sizes (setup, epoch 1 with compiling, later epochs, evaluation).
--segmentation SETR-PUP ADE20K iterations/s, inference time, projected schedule hours.
--report       the targets' figures -> BENCHMARKS.md, benchmarks.json in --out-dir (default
               runs/bench; --out-dir bench: the committed report), rewritten after every
               unit; a rerun keeps the units measured on the same device and code."""

EPILOG = """examples (from the repository root; python bench/bench.py takes the same flags):
  python -m bench --report --only step --out-dir bench   # the committed report's headline rows, ~5 min on one H100
  python -m bench --report --only kernels --out-dir bench  # opt-in kernels (harness/kernels.py) vs today's
  python -m bench --report --only sweeps --out-dir bench # then the other stages, each its own command
  python -m bench --report --only table --out-dir bench  # whole tables: a VTAB run again, the 7-point lr sweep
                                                         # batched vs one at a time, Table 2 projected, mini Table 2
  python -m bench --report                            # all stages, into runs/bench/ (skips what is done)
  python -m bench                                     # ViT-B/16, 100 prompts, batch 64
  python -m bench --prompts 10 100 --batch 32 128 --json bench.json
  python -m bench --sweep-prompts --sweep-batch       # fast path only
  python -m bench --end-to-end vtab --json e2e_vtab.json      # target: < 60 s on one H100
  python -m bench --end-to-end cub --compile-mode max-autotune
  python -m bench --segmentation --json seg.json
CPU smoke runs (seconds to minutes):
  python -m bench --report --arch tiny                # into runs/bench/, never over the committed report
                                                      # (its stage table, the mini Table 2: ~20 min on 2 cores)
  python -m bench --arch vit_small --prompts 1 --batch 2 --img-size 32 --steps 2 --warmup 1 --repeats 2
  python -m bench --end-to-end vtab --arch tiny --img-size 32 --train-images 24 --test-images 16 \\
      --epochs 2 --batch 8"""


def build_parser():
    p = runtime.ArgumentParser(prog="python -m bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--end-to-end", choices=sorted(END_TO_END), default=None, metavar="{vtab,cub}",
                      help="time one whole run of the harness (classification.fit with the paper's recipe) on generated "
                           "images: vtab = 1,000 train / 10,000 test at 224px, dtd/MAE recipe; cub = 5,394 train "
                           "cached at 256px (random crop + flip on the GPU) / 600 val every epoch / 5,794 test")
    mode.add_argument("--segmentation", action="store_true",
                      help="time the SETR-PUP ADE20K training iteration (150 classes) and the sliding-window "
                           "inference of one 512x683 image; project the recipe's iteration schedule")
    mode.add_argument("--multitask", action="store_true", help="inference images/s: a batch mixing 8 prompt packs (gated_prompt.MultiTask) vs one pack, same batch and prompts")
    mode.add_argument("--report", action="store_true",
                      help="the step comparison at 100 prompts / batch 64 and 1 prompt / batch 128 with the "
                           "device's bf16 matmul peak, both sweeps, both end-to-end runs, segmentation; writes "
                           "BENCHMARKS.md and benchmarks.json after every unit")
    p.add_argument("--only", nargs="+", choices=report.STAGES, default=None, metavar="STAGE",
                   help=f"--report: these stages only, of {' '.join(report.STAGES)} (default: all)")
    p.add_argument("--arch", default="vit_base", choices=ARCH_CHOICES,
                   help="backbone size; tiny = 12 blocks of width 32, for CPU smoke tests (default: %(default)s)")
    p.add_argument("--method", default="gated+temp", choices=sorted(gp.METHODS),
                   help="what is trained (default: %(default)s)")
    p.add_argument("--prompts", type=int, nargs="+", default=None, metavar="P",
                   help="prompt counts (default: 100; --end-to-end / --segmentation: the recipe's, one value)")
    p.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="training batch sizes (default: 64; --end-to-end / --segmentation: the recipe's, one value)")
    p.add_argument("--eval-batch-factor", type=int, default=4, metavar="K",
                   help="the evaluation step runs on K x the training batch (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution, a multiple of the patch size (default: the recipe's, 224; "
                        "--segmentation: the crop, 512; --report --arch tiny: 32)")
    _add_timing_args(p)
    _add_compile_args(p)
    p.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    p.add_argument("--kernels", nargs="+", default=[], metavar="NAME", choices=CLI_KERNELS,
                   help=f"the fast path with these opt-in kernels of harness/kernels.py on: {', '.join(CLI_KERNELS)} "
                        "(same numbers as today's path; default: none)")
    p.add_argument("--fp8", action="store_true",
                   help="the fast path's frozen Linear weights in FP8 e4m3 (changes the numerics; CUDA compute "
                        "capability >= 8.9 only)")
    p.add_argument("--sweep-prompts", type=int, nargs="*", default=None, metavar="P",
                   help=f"instead of the table: fast-path images/s vs prompt count (no values: "
                        f"{' '.join(map(str, SWEEP_PROMPTS))}; batch = first --batch)")
    p.add_argument("--sweep-batch", type=int, nargs="*", default=None, metavar="B",
                   help=f"instead of the table: fast-path images/s vs batch size (no values: "
                        f"{' '.join(map(str, SWEEP_BATCH))}; prompts = first --prompts)")
    _add_size_args(p)
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help=f"--report: where BENCHMARKS.md and benchmarks.json go (default: {REPORT_OUT_DIR}; "
                        "bench: the committed report)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    return p


def _add_timing_args(p):
    for name, what in (("steps", "timed steps per repetition"),
                       ("warmup", "untimed steps before timing, after the compiling call"),
                       ("repeats", "timed repetitions; the table shows their median and min-max")):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{what} (default: {TABLE_DEFAULTS[name]}; --report: {REPORT_DEFAULTS[name]})")


def _add_compile_args(p):
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fast path (default: on CUDA only; compiling on a CPU takes minutes)")
    p.add_argument("--compile-mode", choices=("default", "max-autotune"), default="default",
                   help="max-autotune: inductor's autotuning without CUDA graphs; compiling-call seconds are "
                        "reported beside the speed (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                   help="the device's bf16 dense peak, for the %%peak column (default: looked up for "
                        "H100 / H200 / A100, blank otherwise)")


def _add_size_args(p):
    e2e = p.add_argument_group("--end-to-end / --report sizes (defaults: the real ones; smaller for a quick check)")
    e2e.add_argument("--epochs", type=int, default=None, metavar="N",
                     help=f"epochs to train (default: the recipe's 100; --report: {REPORT_DEFAULTS['epochs']}); "
                          "fewer also gives a projection to 100")
    for name, real in (("train", "1000 for vtab, 5394 for cub"), ("val", "600 for cub, none for vtab"),
                       ("test", "10000 for vtab, 5794 for cub")):
        e2e.add_argument(f"--{name}-images", type=int, default=None, metavar="N",
                         help=f"generated {name} images (default: {real})")


def check_args(p, args):
    """Refuse flag combinations that do not apply (p.error: message on stderr, exit status 2)."""
    single_run = args.end_to_end or args.segmentation
    sizes = (args.epochs, args.train_images, args.val_images, args.test_images)
    if (single_run or args.report) and (args.sweep_prompts is not None or args.sweep_batch is not None):
        p.error("--sweep-prompts / --sweep-batch time the step table; not with --end-to-end, --segmentation "
                "or --report")
    if args.report and (args.prompts is not None or args.batch is not None or args.skip_reference):
        p.error("--report times the targets' fixed configurations, fast and reference path; --prompts, --batch "
                "and --skip-reference do not apply")
    if args.report and (args.kernels or args.fp8):
        p.error("--report times every kernel as its own row (stage kernels); --kernels and --fp8 do not apply")
    if (args.out_dir is not None or args.only is not None) and not args.report:
        p.error("--out-dir and --only belong to --report")
    if not (args.end_to_end or args.report) and any(v is not None for v in sizes):
        p.error("--epochs, --train-images, --val-images and --test-images belong to --end-to-end and --report")
    for name in ("batch", "prompts"):
        values = getattr(args, name)
        if single_run and values is not None and len(values) > 1:
            p.error(f"--{name} takes one value with --end-to-end / --segmentation")
        if values is not None and min(values) < (1 if name == "batch" else 0):
            p.error(f"--{name} must be >= {1 if name == 'batch' else 0}")
    for name, least in (("sweep_batch", 1), ("sweep_prompts", 0)):
        values = getattr(args, name)
        if values and min(values) < least:
            p.error(f"--{name.replace('_', '-')} values must be >= {least}")
    if args.prompts is not None and min(args.prompts) == 0 and args.method != "linear":
        p.error(f"--prompts 0 is the linear probe (--method linear); {args.method} needs >= 1 prompt")
    patch = patch_size_of(args.arch)
    if args.img_size is not None and (args.img_size < patch or args.img_size % patch):
        p.error(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {patch}")
    if any(v is not None and v < 1 for v in (args.steps, args.repeats)) or (args.warmup or 0) < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if any(v is not None and v < 1 for v in sizes):
        p.error("--epochs, --train-images, --val-images and --test-images must be >= 1")


def fill_defaults(args):
    """The mode's defaults for what was not given. None left in batch / prompts / img_size / epochs means the
    recipe's (resolved with the config)."""
    if args.report:
        defaults = dict(REPORT_DEFAULTS, **(REPORT_SMOKE if args.arch == "tiny" else {}))
        args.out_dir = args.out_dir or REPORT_OUT_DIR
        args.only = [stage for stage in report.STAGES if stage in (args.only or report.STAGES)]
    else:
        defaults = TABLE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kernels = list(args.kernels) + (["fp8"] if args.fp8 else [])
    if not (args.end_to_end or args.segmentation or args.report):
        args.batch = args.batch or [64]
        args.prompts = args.prompts or [100]
    return args


def check_out_dir(out_dir):
    """--report writes after every unit: an out-dir that cannot be made or written stops before any timing."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise runtime.UserError(f"--out-dir {out_dir}: cannot create it ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise runtime.UserError(f"--out-dir {out_dir}: not writable")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return fill_defaults(args)


def main(argv=None):
    """Run the benchmark; prints the table(s) (or the --end-to-end / --segmentation / --report figures) and
    returns every number as a dict (also --json; --report writes BENCHMARKS.md and benchmarks.json). A compile
    that cannot work on the device stops here (runtime.UserError) before anything is timed."""
    args = parse_args(argv)
    device = runtime.pick_device(runtime.check_device(args.device))
    if args.report:
        check_out_dir(args.out_dir)
    if args.json:
        serving.check_out(args.json, "--json", suffixes=None)
    if args.report and device.type != "cuda" and args.arch != "tiny":
        raise runtime.UserError(f"--report times ViT-B at the targets' sizes, hours on a {device.type}; run it on a "
                                "GPU, or add --arch tiny for the CPU smoke run")
    if args.fp8 and fast_kernels.fp8_unsupported(device):
        raise runtime.UserError(fast_kernels.fp8_unsupported(device))
    args.compile = compile_enabled(args, device)
    runtime.check_compile(device, args.compile)
    peak = peak_tflops(device, args.peak_tflops)
    out = {"device": runtime.device_name(device), "cuda_device": device.type == "cuda", "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None, "code_version": runtime.code_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(["python -m bench"] + list(sys.argv[1:] if argv is None else argv)),
           "img_size": args.img_size or datasets.IMAGE_SIZE, "compile": args.compile,
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "peak_bf16_tflops": peak, "args": vars(args), "results": [], "ratios": [], "sweeps": {}}
    with runtime.flush_denormals(device):
        if args.report:
            out = run_report(args, device, peak, out)
        else:
            run_mode(args, device, peak, out)
    if args.json:
        runtime.write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


def run_mode(args, device, peak, out):
    """The chosen mode's measurements (all but --report), into `out`."""
    if args.end_to_end:
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
    single = config.model_from_config(cfg, cfg.head_size(), verbose=False).eval()
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
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, device=device)
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
           "img_size": cfg.img_size, "device": runtime.device_name(device), "bf16": bf16, "mode": "eager",
           "single_images_per_second": single_rate, "mixed_images_per_second": mixed_rate,
           "single_rates": rates["single"], "mixed_rates": rates["mixed"], "ratio": mixed_rate / single_rate}
    print(f"mixed batch of {packs} packs vs one pack ({args.arch}, {args.method}, {P} prompts, batch {B}, "
          f"{cfg.img_size}px, eager{', bf16' if bf16 else ', fp32'}, {row['device']}): {single_rate:.1f} vs "
          f"{mixed_rate:.1f} images/s -> {row['ratio']:.3f}x")
    return row


def cli(argv=None):
    """The command line: main, with a user error (bad input, a compiler that cannot work) as one line on stderr
    and exit status 2 instead of a traceback."""
    try:
        main(argv)
    except runtime.UserError as err:
        print(f"python -m bench: error: {err}", file=sys.stderr)
        sys.exit(runtime.EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
