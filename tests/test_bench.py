"""bench.py: the analytic FLOP count against hand counts, the CLI's refusals, and every mode end to end on a CPU."""
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from bench import bench
from bench import report
from bench import runs
import gated_prompt as gp
from harness import runtime

CPU = torch.device("cpu")
TINY = ["--arch", "tiny", "--img-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "2"]


def tiny_cfg(**overrides):
    """D = 8, one block, 32px images of 16px patches: N = 4 patches, T = 5 tokens without prompts."""
    return gp.vit_config("vit_small", img_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2, **overrides)


# --- FLOP count -----------------------------------------------------------------------------------------


def test_flops_hand_count():
    f = bench.flops(tiny_cfg(), num_prompts=0, num_classes=3)
    D, T, N = 8, 5, 4
    assert f["linear"] == 2 * T * D * 3 * D + 2 * T * D * D + 2 * (2 * T * D * 4 * D) == 7680  # qkv, proj, fc1+fc2
    assert f["attention"] == 2 * T * T * D + 2 * T * T * D == 800                            # QK^T, AV
    assert f["patch_embed"] == 2 * N * (3 * 16 * 16) * D == 49152
    assert f["head"] == 2 * D * 3 == 48
    assert f["forward"] == 7680 + 800 + 49152 + 48
    # linear probe: nothing before the head is trainable, so the backward is the head's alone
    assert f["train"] == f["forward"] + 2 * 48

    g = bench.flops(tiny_cfg(), num_prompts=1, num_classes=3)   # T = 6
    lin, att = 2 * 6 * 96 * D, 4 * 36 * D
    assert (g["linear"], g["attention"]) == (lin, att)
    # frozen backbone: linear layers 2x (input grads only), attention 3x (both operands), patch embed 1x
    assert g["train"] == 49152 + 2 * lin + 3 * att + 3 * 48


def test_flops_scaling():
    cfg = tiny_cfg()   # N = 4: 3 prompts -> T = 8, 11 prompts -> T = 16
    a, b = bench.flops(cfg, 3), bench.flops(cfg, 11)
    assert b["attention"] == 4 * a["attention"]        # quadratic in tokens
    assert b["linear"] == 2 * a["linear"]              # linear in tokens
    assert b["patch_embed"] == a["patch_embed"]        # prompts are not patches
    deep = bench.flops(gp.vit_config("vit_small", img_size=32, patch_size=16, embed_dim=8, depth=3, num_heads=2), 3)
    assert deep["linear"] == 3 * a["linear"] and deep["attention"] == 3 * a["attention"]


def test_flops_vit_base():
    """ViT-B/16 at 224 without prompts: the well-known 17.6 GMACs = 35.1 GFLOPs per image; training with
    prompts costs ~2x the forward (frozen weights need no weight gradients), not 3x."""
    cfg = gp.vit_config("vit_base")
    assert bench.flops(cfg, 0, 0)["forward"] / 1e9 == pytest.approx(35.1, rel=0.01)
    f = bench.flops(cfg, 100)
    assert 2.0 < f["train"] / f["forward"] < 2.1
    # prompts first inserted at block 7: blocks 1..6 run forward only and see 197 tokens
    late = bench.flops(cfg, 100, insert_at=7)
    assert late["forward"] < f["forward"] and 1.5 < late["train"] / late["forward"] < 1.7


@pytest.mark.parametrize("method,train", [
    ("gated+temp", 49152 + 2 * 9216 + 3 * 1152 + 3 * 48),   # T = 6: linear 2*6*96*8, attention 4*36*8
    ("linear", 7680 + 800 + 49152 + 48 + 2 * 48),            # no prompts: forward + the head's backward
])
def test_model_flops_reads_the_built_model(method, train):
    model = gp.VisionTransformer(tiny_cfg(), gp.prompt_config(method, num_classes=3, num_prompts=1))
    assert bench.model_flops(model)["train"] == train


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                       ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_lookup(name, peak):
    assert bench.peak_for_name(name) == peak


# --- arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--end-to-end", "vtab", "--segmentation"], "argument --segmentation: not allowed with argument --end-to-end"),
    (["--report", "--segmentation"], "argument --segmentation: not allowed with argument --report"),
    (["--epochs", "2"], "--epochs, --train-images, --val-images and --test-images belong to --end-to-end and"),
    (["--segmentation", "--train-images", "5"], "belong to --end-to-end and --report"),
    (["--segmentation", "--batch", "2", "4"], "--batch takes one value with --end-to-end / --segmentation"),
    (["--end-to-end", "cub", "--prompts", "1", "2"], "--prompts takes one value with --end-to-end"),
    (["--segmentation", "--sweep-batch"], "--sweep-prompts / --sweep-batch time the step table"),
    (["--report", "--sweep-prompts", "1"], "--sweep-prompts / --sweep-batch time the step table"),
    (["--report", "--prompts", "1"], "--report times the targets' fixed configurations"),
    (["--report", "--skip-reference"], "--report times the targets' fixed configurations"),
    (["--out-dir", "x"], "--out-dir and --only belong to --report"),
    (["--only", "step"], "--out-dir and --only belong to --report"),
    (["--report", "--only", "speed"], "argument --only: invalid choice: 'speed'"),
    (["--segmentation", "--img-size", "500"], "--img-size 500 is not a multiple of vit_base's patch size 16"),
    (["--arch", "tiny", "--img-size", "40"], "--img-size 40 is not a multiple of tiny's patch size 16"),
    (["--arch", "vit_huge", "--img-size", "230"], "--img-size 230 is not a multiple of vit_huge's patch size 14"),
    (["--end-to-end", "vtab", "--train-images", "0"], "--val-images and --test-images must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--prompts", "0"], "--prompts 0 is the linear probe (--method linear); gated+temp needs >= 1 prompt"),
    (["--steps", "0"], "--steps and --repeats must be >= 1, --warmup >= 0"),
    (["--warmup", "-1"], "--steps and --repeats must be >= 1, --warmup >= 0"),
])
def test_cli_refuses_with_its_reason(argv, message, capsys):
    """One line (the usage stays on --help), exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_accepts_what_it_documents():
    linear = bench.parse_args(["--prompts", "0", "--method", "linear"])
    assert (linear.prompts, linear.method) == ([0], "linear")
    huge = bench.parse_args(["--arch", "vit_huge", "--img-size", "224"])
    assert (huge.arch, huge.img_size) == ("vit_huge", 224)
    report = bench.parse_args(["--report", "--epochs", "2", "--train-images", "8", "--out-dir", "x"])
    assert (report.epochs, report.train_images, report.out_dir) == (2, 8, "x")
    assert report.only == ["step", "kernels", "sweeps", "e2e", "segmentation", "table"] and report.compile_mode == "default"
    staged = bench.parse_args(["--report", "--only", "e2e", "step", "--compile-mode", "max-autotune"])
    assert staged.only == ["step", "e2e"] and staged.compile_mode == "max-autotune"   # in the report's order


def test_defaults_per_mode():
    table = bench.parse_args([])
    assert (table.batch, table.prompts, table.img_size) == ([64], [100], None)   # None: the recipe's 224
    assert (table.steps, table.warmup, table.repeats) == (20, 5, 5)
    seg, e2e = bench.parse_args(["--segmentation"]), bench.parse_args(["--end-to-end", "cub"])
    for args in (seg, e2e):
        assert (args.batch, args.prompts, args.img_size, args.epochs) == (None, None, None, None)
    report = bench.parse_args(["--report"])
    assert (report.steps, report.warmup, report.repeats, report.epochs, report.out_dir) == (10, 3, 3, 5, "runs/bench")
    assert (report.img_size, report.train_images, report.test_images) == (None, None, None)   # the real sizes
    smoke = bench.parse_args(["--report", "--arch", "tiny", "--steps", "4"])
    assert (smoke.img_size, smoke.steps, smoke.warmup, smoke.repeats, smoke.epochs) == (32, 4, 1, 2, 2)


@pytest.mark.parametrize("argv,device,expected", [
    ([], "cpu", False), ([], "cuda", True), (["--no-compile"], "cuda", False), (["--compile"], "cpu", True)])
def test_compile_only_on_cuda_unless_told(argv, device, expected):
    assert bench.compile_enabled(bench.parse_args(argv), torch.device(device)) is expected


def test_no_module_imports_the_cli():
    code = ("import sys, pathlib, importlib\n"
            "for f in sorted(pathlib.Path('harness').glob('**/*.py')) + sorted(pathlib.Path('bench').glob('*.py')):\n"
            "    if f.stem != '__main__': importlib.import_module('.'.join(f.with_suffix('').parts).replace('.__init__', ''))\n"
            "print('reproduce' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --- default table and sweeps ---------------------------------------------------------------------------


def test_cli_table_and_json(tmp_path, capsys, monkeypatch):
    """The table from known timings: time_loop gives the fast path 30 (20-40) train and 80 eval images/s, the
    reference 10 and 40, so the speed-ups are 3.00x and 2.00x; the steps themselves still run once each."""
    timings = iter([[20.0, 30.0, 40.0], [80.0], [10.0], [40.0]])

    def time_loop(fn, batch, steps, warmup, repeats, device):
        fn()
        return next(timings)
    monkeypatch.setattr(bench, "time_loop", time_loop)
    out_file = tmp_path / "bench.json"
    out = bench.main(TINY + ["--prompts", "1", "--batch", "2", "--json", str(out_file)])
    rows = {(r["path"], r["step"]): r for r in out["results"]}
    assert list(rows) == [("fast", "train"), ("fast", "eval"), ("reference", "train"), ("reference", "eval")]
    assert (rows["fast", "train"]["images_per_s"], rows["fast", "train"]["images_per_s_min"],
            rows["fast", "train"]["images_per_s_max"]) == (30.0, 20.0, 40.0)
    for r in rows.values():
        assert r["peak_fraction"] is None and r["peak_memory_gib"] is None   # CPU: unknown peak, no GPU memory
        assert r["mode"] == "eager" and not r["compiled"]                     # CPU: no compile unless --compile
    assert rows["fast", "train"]["bf16"] and not rows["reference", "train"]["bf16"]
    assert not rows["reference", "train"]["fused_attention"]
    assert rows["fast", "eval"]["batch"] == 8 and rows["fast", "train"]["batch"] == 2   # eval: 4 x the batch
    assert [(r["step"], r["speedup"]) for r in out["ratios"]] == [("train", 3.0), ("eval", 2.0)]
    printed = capsys.readouterr().out
    assert "3.00x" in printed and "2.00x" in printed
    saved = json.loads(out_file.read_text())
    assert saved["device"].startswith("cpu") and saved["torch"] == torch.__version__ and len(saved["results"]) == 4
    assert saved["ratios"] == out["ratios"]


def test_cli_sweeps_and_peak_override():
    out = bench.main(TINY + ["--batch", "2", "--steps", "1", "--repeats", "1", "--peak-tflops", "1",
                             "--sweep-prompts", "1", "4", "--sweep-batch", "1"])
    assert out["results"] == [] and out["ratios"] == []             # a sweep replaces the main table
    assert [(r["prompts"], r["step"]) for r in out["sweeps"]["prompts"]] == [(1, "train"), (1, "eval"),
                                                                           (4, "train"), (4, "eval")]
    assert [(r["prompts"], r["batch"], r["path"]) for r in out["sweeps"]["batch"]] == [(100, 1, "fast"),
                                                                                       (100, 4, "fast")]
    assert all(r["peak_fraction"] == r["tflops"] for r in out["sweeps"]["prompts"])   # peak = 1 TFLOP/s


def test_sweeps_time_a_shared_point_once(monkeypatch):
    calls = []
    real = bench.measure

    def measure(args, device, path, num_prompts, batch, **kwargs):
        calls.append((num_prompts, batch))
        return real(args, device, path, num_prompts, batch, **kwargs)
    monkeypatch.setattr(bench, "measure", measure)
    out = bench.main(TINY + ["--prompts", "3", "--batch", "2", "--steps", "1", "--repeats", "1",
                             "--sweep-prompts", "1", "3", "--sweep-batch", "2", "4"])
    assert calls == [(1, 2), (3, 2), (3, 4)]                          # (3, 2) lies in both sweeps
    shared = [r for r in out["sweeps"]["prompts"] if r["prompts"] == 3]
    assert shared == [r for r in out["sweeps"]["batch"] if r["batch"] in (2, 8)]


def test_out_of_memory_configuration_is_skipped(monkeypatch, capsys):
    """A configuration that does not fit (e.g. the fp32 reference at a large batch) is reported, not fatal."""
    real = bench.measure

    def measure(args, device, path, *rest, **kwargs):
        if path == "reference":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(args, device, path, *rest, **kwargs)
    monkeypatch.setattr(bench, "measure", measure)
    out = bench.main(TINY + ["--prompts", "1", "--batch", "2", "--steps", "1", "--repeats", "1"])
    assert [r["path"] for r in out["results"]] == ["fast", "fast"] and out["ratios"] == []
    assert "reference out of GPU memory" in capsys.readouterr().out


def broken_compile(*args, **kwargs):
    def call(*a, **k):
        raise RuntimeError("no backend\nsecond line")
    return call


class CountingBackend:
    """A torch.compile backend that runs dynamo's graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_working_compile_is_timed_and_reported(monkeypatch):
    """The fast path's steps run through a compiled backbone graph (counted) and say so; the reference path never
    compiles."""
    backend = CountingBackend()
    monkeypatch.setattr(bench, "compile_enabled", lambda args, device: backend)
    out = bench.main(TINY + ["--prompts", "1", "--batch", "2", "--steps", "1", "--repeats", "1"])
    fast = [r for r in out["results"] if r["path"] == "fast"]
    reference = [r for r in out["results"] if r["path"] == "reference"]
    assert all(r["mode"] == "torch.compile" and r["compiled"] and r["compile_s"] > 0 for r in fast)
    assert all(r["mode"] == "eager" and r["compile_s"] is None for r in reference)   # never compiled
    assert backend.graphs >= 3   # the start-up check's probe, the training and the evaluation backbone


def test_a_compiler_that_cannot_work_stops_at_start_naming_what_is_missing(monkeypatch, capsys):
    """A GPU image without Python headers: Triton cannot build its launcher. The start-up check (a tiny compiled
    call) stops bench with one line and exit status 2, before anything is timed; runs (runtime.Settings.for_device
    calls the same check) stop the same way."""
    def no_headers(*args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("fatal error: Python.h: No such file or directory\ncompilation terminated.")
        return call
    monkeypatch.setattr(runtime, "_COMPILE_CHECKED", {})   # this process's earlier checks are not this one's
    monkeypatch.setattr(torch, "compile", no_headers)
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(SystemExit) as exit_info:
        bench.cli(TINY + ["--prompts", "1", "--batch", "2", "--compile"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "torch.compile cannot build" in err and "Python development headers" in err and "--no-compile" in err
    with pytest.raises(runtime.UserError, match="Python development headers"):
        runtime.check_compile(torch.device("cpu"), "inductor")
    runtime.check_compile(torch.device("cpu"), False)   # compile off: nothing to check


def test_failed_compile_falls_back_to_eager(monkeypatch, capsys):
    """A compile that passes the start-up check but fails on a step is timed eager, and the row says why."""
    monkeypatch.setattr(runtime, "check_compile", lambda device, compile: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    out = bench.main(TINY + ["--prompts", "1", "--batch", "2", "--steps", "1", "--repeats", "1", "--compile",
                             "--skip-reference"])
    modes = {r["step"]: r["mode"] for r in out["results"]}
    assert modes == {step: f"eager (torch.compile failed on the {step} step: RuntimeError: no backend)"
                     for step in ("train", "eval")}
    assert all(r["compile_s"] is None for r in out["results"])
    assert all(r["images_per_s"] > 0 and not r["compiled"] for r in out["results"])
    assert "torch.compile failed on the train step" in capsys.readouterr().out


def test_training_row_peak_memory_holds_no_evaluation_batch(monkeypatch):
    """Each step's inputs are made after the memory reset before it: when the training row's peak starts, no
    evaluation batch exists (and the training batch is gone before the evaluation row's)."""
    def tensors():   # every live tensor (isinstance on a deprecated torch alias warns: not ours to see)
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    live = []
    earlier = {id(o) for o in tensors()}   # other tests' leftovers

    def reset(device):
        live.append(sorted(tuple(o.shape) for o in tensors()
                           if id(o) not in earlier and o.dim() == 4 and tuple(o.shape[1:]) == (3, 32, 32)))
    monkeypatch.setattr(bench, "_reset_memory", reset)
    bench.main(TINY + ["--prompts", "1", "--batch", "2", "--steps", "1", "--repeats", "1", "--skip-reference"])
    assert live == [[], []]


# --- --end-to-end ---------------------------------------------------------------------------------------

E2E_TINY = ["--arch", "tiny", "--img-size", "32", "--train-images", "20", "--test-images", "12", "--batch", "8"]


@pytest.mark.parametrize("run,task,batch,prompts,lr", [("vtab", "dtd", 128, 1, 0.25), ("cub", "cub", 64, 100, 0.1)])
def test_end_to_end_uses_the_papers_recipe(run, task, batch, prompts, lr):
    """Table 5's MAE rows: dtd 128 / 1 prompt / lr 0.25, CUB 64 / 100 prompts / lr 0.1; 100 epochs."""
    cfg = runs.end_to_end_config(bench.parse_args(["--end-to-end", run]), run)
    assert (cfg.task, cfg.ssl, cfg.method, cfg.arch) == (task, "mae", "gated+temp", "vit_base")
    assert (cfg.batch_size, cfg.num_prompts, cfg.lr, cfg.epochs, cfg.img_size) == (
        batch, prompts, lr, 100, 224)
    cfg = runs.end_to_end_config(bench.parse_args(["--end-to-end", run, "--epochs", "7", "--batch", "3",
                                                    "--prompts", "5", "--arch", "tiny"]), run)
    assert (cfg.epochs, cfg.batch_size, cfg.num_prompts) == (7, 3, 5)
    assert cfg.arch_overrides == {"embed_dim": 32, "depth": 12, "num_heads": 2}
    sizes = bench.END_TO_END[run]["train"], bench.END_TO_END[run]["val"], bench.END_TO_END[run]["test"]
    assert sizes == {"vtab": (1000, 0, 10000), "cub": (5394, 600, 5794)}[run]   # CUB: VPT's split sizes


@pytest.mark.parametrize("argv,device,bf16,compile", [([], "cpu", False, False), ([], "cuda", True, True),
                                                      (["--no-compile"], "cuda", True, False)])
def test_end_to_end_settings(argv, device, bf16, compile):
    settings = runs.end_to_end_settings(bench.parse_args(["--end-to-end", "vtab"] + argv), torch.device(device))
    assert (settings.bf16, settings.compile, settings.quiet, settings.device.type) == (bf16, compile, True, device)


def test_synthetic_split_tiles_every_class():
    split = runs.synthetic_split("dtd", "train", 100, 16, seed=0)   # 47 classes, 2 generated images each
    assert len(split) == 100 and split.pixels.dtype == torch.uint8 and split.sizes.tolist() == [[16, 16]] * 100
    assert split.labels.tolist() == [i % 47 for i in range(100)] and split.task == "dtd"
    assert torch.equal(split.image(0), split.image(94)) and not torch.equal(split.image(0), split.image(47))
    assert not torch.equal(split.image(0), runs.synthetic_split("dtd", "test", 1, 16, seed=1).image(0))


def test_projection_to_the_full_schedule():
    # setup 1 s, 3 epochs in 14 s of which epoch 1 took 10: later epochs 2 s each; 97 more of them; eval 2 s
    assert runs.projected_wall_s(1.0, 10.0, 14.0, 3, 2.0, 100) == 1 + 14 + 97 * 2 + 2 == 211
    assert runs.projected_wall_s(1.0, 10.0, 10.0, 1, 2.0, 100) is None     # no later epoch to go by


@pytest.mark.parametrize("run", ["vtab", "cub"])
def test_end_to_end_tiny(run, tmp_path, capsys, monkeypatch):
    """One whole run through classification.fit: CUB's epochs include its val pass (the FGVC protocol), VTAB's do not."""
    evaluated = []
    real_evaluate = runs.classification.evaluate

    def evaluate(eval_step, model, loader):
        evaluated.append(len(loader.split))
        return real_evaluate(eval_step, model, loader)
    monkeypatch.setattr(runs.classification, "evaluate", evaluate)
    out_file = tmp_path / "e2e.json"
    out = bench.main(["--end-to-end", run, "--epochs", "3", "--val-images", "4", "--json", str(out_file)] + E2E_TINY)
    r = out["end_to_end"]
    # CUB: val (4 images) after each of the 3 epochs, then test (12) and test at the best-val epoch; VTAB: test
    assert evaluated == {"vtab": [12], "cub": [4, 4, 4, 12, 12]}[run]
    assert r["epochs"] == 3 and len(r["epoch_s"]) == 3 and all(s > 0 for s in r["epoch_s"])
    assert r["setup_s"] > 0 and r["test_eval_s"] > 0 and r["train_s"] >= sum(r["epoch_s"])
    assert r["wall_s"] >= r["setup_s"] + r["train_s"] + r["test_eval_s"]
    assert r["projected_wall_s"] > r["wall_s"] and 0 <= r["test_acc"] <= 100
    assert (r["train_images"], r["val_images"], r["test_images"], r["batch_size"]) == (
        20, {"vtab": 0, "cub": 4}[run], 12, 8)
    assert r["num_prompts"] == {"vtab": 1, "cub": 100}[run]               # Table 5's MAE rows
    assert r["cached_size"] == {"vtab": 32, "cub": 36}[run]                # FGVC: cached 256/224 x the crop
    assert not r["images_on_gpu"] and not r["compiled"] and not r["bf16"]
    assert r["target_met"] is None and not r["full_size"]
    printed = capsys.readouterr().out
    assert "total wall" in printed and "projected wall for 100 epochs" in printed and "target" not in printed
    saved = json.loads(out_file.read_text())["end_to_end"]
    assert saved["epoch_s"] == r["epoch_s"] and saved["test_acc"] == r["test_acc"]


# --- --segmentation -------------------------------------------------------------------------------------


def test_segmentation_constants_come_from_the_ade20k_recipe():
    """mmseg's setr_pup_512x512_160k_b16_ade20k: batch 16 of 512 crops, 160k iterations, slide stride 341, aux
    heads on blocks 5 and 9 (ViT-B/16), 0.4 each; the paper's 100 prompts."""
    cfg = runs.segmentation_config(bench.parse_args(["--segmentation"]))
    assert (cfg.batch_size, cfg.img_size, cfg.iters, cfg.slide_stride) == (16, 512, 160000, 341)
    assert (list(cfg.aux_blocks), cfg.aux_loss_weight, cfg.num_prompts) == ([5, 9], 0.4, 100)
    cfg = runs.segmentation_config(bench.parse_args(["--segmentation", "--arch", "tiny", "--img-size", "64",
                                                      "--batch", "2", "--prompts", "3"]))
    assert (cfg.batch_size, cfg.img_size, cfg.num_prompts, cfg.head_channels) == (2, 64, 3, 32)


@pytest.mark.parametrize("size,crop,windows", [
    ((512, 683), 512, 2),    # test scale keeps 512 x 683: one row, columns at x = 0 and 171
    ((300, 300), 512, 1),    # rescaled to 512 x 512: one window
    ((512, 1400), 512, 4),   # columns at 0, 341, 682 and 888 (the last one shifted back to end at the border)
    ((700, 512), 512, 2),    # rows at 0 and 188
    ((256, 700), 512, 4),    # rescaled by 2 to 512 x 1400
    ((512, 683), 64, 2),     # crop 64: rescaled to 64 x 85, stride 341: columns at 0 and 21
])
def test_window_count_runs_slide_inference(size, crop, windows):
    def zeros(x):
        return torch.zeros(len(x), 1, *x.shape[-2:])
    assert runs.window_count(zeros, torch.zeros(3, *size, dtype=torch.uint8), crop, 341) == windows


def test_segmentation_tiny(tmp_path, capsys, monkeypatch):
    """The segmentation figures from known timings: time_loop reports 4, 2 and 6 images/s for the training
    iteration at batch 2 (median 4 images/s = 2 it/s, so 160,000 iterations take 80,000 s = 22.22 h) and 0.5
    images/s for inference (2 s per image, 4,000 s for 2,000 val images). The real calls still run once."""
    calls = []

    def time_loop(fn, batch, steps, warmup, repeats, device):
        fn()
        calls.append(batch)
        return [4.0, 2.0, 6.0] if batch == 2 else [0.5]
    monkeypatch.setattr(runs, "time_loop", time_loop)
    out_file = tmp_path / "seg.json"
    out = bench.main(["--segmentation", "--arch", "tiny", "--img-size", "64", "--batch", "2", "--json", str(out_file)])
    r = out["segmentation"]
    assert calls == [2, 1]
    assert (r["iters_per_s"], r["iters_per_s_min"], r["iters_per_s_max"], r["images_per_s"]) == (2.0, 1.0, 3.0, 4.0)
    assert r["projected_iters"] == 160000 and r["projected_s"] == 80000
    assert r["projected_hours"] == pytest.approx(22.222, abs=1e-3)
    assert r["infer_s_per_image"] == 2.0 and r["projected_val_eval_s"] == 4000
    assert (r["batch_size"], r["crop_size"], r["num_classes"], r["num_prompts"]) == (2, 64, 150, 100)
    assert (r["slide_stride"], r["aux_blocks"]) == (341, [5, 9])
    assert r["infer_scaled_to"] == [64, 85] and r["infer_windows"] == 2   # 64 x 85 at crop 64: columns 0 and 21
    assert r["train_mode"] == r["infer_mode"] == "eager" and not r["compiled"] and not r["bf16"]
    assert r["train_peak_memory_gib"] is None                              # CPU: no GPU memory
    assert "22.22 h projected" in capsys.readouterr().out
    assert json.loads(out_file.read_text())["segmentation"]["projected_hours"] == r["projected_hours"]


def test_segmentation_failed_compile_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(runtime, "check_compile", lambda device, compile: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    r = bench.main(["--segmentation", "--arch", "tiny", "--img-size", "32", "--batch", "2", "--prompts", "2",
                    "--steps", "1", "--warmup", "0", "--repeats", "1", "--compile"])["segmentation"]
    assert r["train_mode"].startswith("eager (torch.compile failed on the training step: RuntimeError: no backend")
    assert r["infer_mode"].startswith("eager (torch.compile failed on the inference: RuntimeError: no backend")
    assert r["iters_per_s"] > 0 and r["infer_s_per_image"] > 0


# --- --report -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    # the kernels stage has its own smoke test (test_kernels.py)
    # one timed call per measurement: the report's files are checked here, not its timings
    out = bench.main(["--report", "--arch", "tiny", "--out-dir", str(out_dir), "--only", "step", "sweeps", "e2e",
                      "segmentation", "--warmup", "0", "--repeats", "1"])
    assert out["units"]
    return out, (out_dir / "BENCHMARKS.md").read_text(), json.loads((out_dir / "benchmarks.json").read_text())


def markdown_table(markdown, heading):
    """Rows (lists of cell strings, header and rule left out) of the first table after `heading`."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:end]]


def number(cell):
    return float(re.match(r"[-\d,.]+", cell).group().replace(",", ""))


def fast_train(saved, prompts, batch):
    return next(r for r in saved["results"]
                if (r["prompts"], r["batch"], r["path"], r["step"]) == (prompts, batch, "fast", "train"))


def test_report_writes_both_files_saying_cpu(smoke_report):
    out, markdown, saved = smoke_report
    assert "**CPU smoke run, not a GPU measurement.**" in markdown
    for fact in (f"| device | {saved['device']} |", f"| torch | {torch.__version__} |", "| CUDA | none |",
                 f"| date | {saved['date']} |", f"| code | {runtime.code_version()} |"):
        assert fact in markdown
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", saved["date"])
    assert saved["results"] == json.loads(json.dumps(out["results"]))
    assert all(t["met"] is None for t in saved["targets"])                # a CPU judges no target
    assert saved["matmul_peak"]["size"] == 256 and saved["matmul_peak"]["tflops"] > 0
    assert saved["segmentation"]["projected_iters"] == 160000
    assert all(r["sdpa_kernel"] == ("flash (CPU)" if r["path"] == "fast" else "explicit softmax")
               for r in saved["results"])


def test_report_times_the_targets_shapes(smoke_report):
    _, _, saved = smoke_report
    # the targets' 100 prompts / batch 64 and 1 prompt / batch 128, batches / 16 for the tiny smoke run;
    # eval at the harness's eval batch (256 / 16)
    expected = [(100, 4, "train"), (100, 16, "eval"), (1, 8, "train"), (1, 16, "eval")]
    shapes = {(r["prompts"], r["batch"], r["path"], r["step"]) for r in saved["results"]}
    assert shapes == {(prompts, batch, path, step) for path in ("fast", "reference")
                      for prompts, batch, step in expected}
    assert [(r["prompts"], r["batch"], r["step"]) for r in saved["ratios"]] == expected
    assert [r["prompts"] for r in saved["sweeps"]["prompts"] if r["step"] == "train"] == [1, 10, 50, 100, 200]
    assert [r["batch"] for r in saved["sweeps"]["batch"] if r["step"] == "train"] == [1, 2, 4, 8, 16]
    assert all(r["mode"] == "eager" for rows in saved["sweeps"].values() for r in rows)
    assert list(saved["units"]) == ["step 100x4", "matmul peak", "step 1x8", "sweep 1x4", "sweep 10x4", "sweep 50x4",
                                    "sweep 100x4", "sweep 200x4", "sweep 100x1", "sweep 100x2", "sweep 100x8",
                                    "sweep 100x16", "end-to-end vtab", "end-to-end cub", "segmentation"]
    points = {name: list(zip(rows[::2], rows[1::2])) for name, rows in saved["sweeps"].items()}   # (train, eval)
    shared = [pair for pair in points["prompts"] if pair[0]["prompts"] == 100]
    assert shared == [pair for pair in points["batch"] if pair[0]["batch"] == 4]      # timed once, reused
    for run, prompts, val in (("vtab", 1, 0), ("cub", 100, 8)):
        e2e = saved["end_to_end"][run]
        assert (e2e["epochs"], e2e["train_images"], e2e["val_images"], e2e["test_images"], e2e["num_prompts"]) == (
            2, 16, val, 8, prompts)
        assert e2e["projected_wall_s"] > e2e["wall_s"] > 0


def test_report_markdown_figures_are_the_json_numbers(smoke_report):
    _, markdown, saved = smoke_report
    targets = {row[0]: row for row in markdown_table(markdown, "## Targets (one H100)")}
    ratio = {(r["prompts"], r["batch"]): r["speedup"] for r in saved["ratios"] if r["step"] == "train"}
    for prompts, batch, shape in ((100, 4, "100 prompts, batch 4"), (1, 8, "1 prompt, batch 8")):
        # CPU smoke: compile is off, so the headline rows are labelled as eager
        assert number(targets[f"train step, {shape} (ran eager)"][1]) == pytest.approx(
            fast_train(saved, prompts, batch)["images_per_s"], abs=0.5)
        assert number(targets[f"fast / reference, train step, {shape} (ran eager)"][1]) == pytest.approx(
            ratio[prompts, batch], abs=0.005)
        assert targets[f"% of bf16 dense peak (spec), train step, {shape}"][1] == "n/a"   # CPU: no known peak
        # a CPU's 256-wide matmul is no peak (the tiny step can beat it): no fraction of it
        assert targets[f"% of bf16 matmul peak (measured), train step, {shape}"][1] == "n/a"
    assert number(targets["train step, 100 prompts, batch 4 (ran eager)"][2].split()[1].replace(",", "")) == 3700
    assert number(targets["train step, 1 prompt, batch 8 (ran eager)"][2].split()[1].replace(",", "")) == 5700
    assert targets["peak GPU memory, train step, 100 prompts, batch 4"][1] == "n/a"  # CPU: no GPU memory
    assert number(targets["peak GPU memory, train step, 100 prompts, batch 4"][2].split()[1]) == 6
    for run, label in (("vtab", "VTAB-1k task"), ("cub", "CUB")):
        row = targets[f"{label} end to end (projected from 2 to 100 epochs)"]
        assert number(row[1]) == pytest.approx(saved["end_to_end"][run]["projected_wall_s"], abs=0.05)
        assert row[3] == "n/a"
    assert number(targets["VTAB-1k task end to end (projected from 2 to 100 epochs)"][2].split()[1]) == 60
    assert number(targets["CUB end to end (projected from 2 to 100 epochs)"][2].split()[1]) == 240
    steps = markdown_table(markdown, "## Training and evaluation steps")
    assert len(steps) == len(saved["results"])
    for row, r in zip(steps, saved["results"]):
        assert [int(row[0]), int(row[1]), row[2], row[3], row[4]] == [r["prompts"], r["batch"], r["path"], r["step"],
                                                                     r["mode"]]
        assert row[5] == "n/a" and r["compile_s"] is None                  # eager: no compiling call
        assert row[6] == r["sdpa_kernel"]
        assert number(row[7]) == pytest.approx(r["images_per_s"], abs=0.05)


def test_report_refuses_vit_b_on_a_cpu(capsys):
    """--report at the real sizes would run ViT-B on a CPU for hours: it says so instead, before any work."""
    with pytest.raises(SystemExit) as exit_info:
        bench.cli(["--report", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--arch tiny" in err and "on a GPU" in err


def _report_units(out_dir):
    try:
        return json.loads((out_dir / "benchmarks.json").read_text())["units"]
    except (OSError, ValueError, KeyError):
        return {}


def test_a_report_killed_part_way_keeps_its_rows_and_a_rerun_completes_it(tmp_path):
    """A real `bench.py --report --arch tiny` process (its step stage) killed once its first unit is written leaves
    a valid benchmarks.json holding that unit; a rerun keeps it (same device and code) and measures the rest."""
    argv = [sys.executable, "bench/bench.py", "--report", "--arch", "tiny", "--only", "step", "--steps", "1",
            "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 240
    while not _report_units(tmp_path) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    units = ["step 100x4", "matmul peak", "step 1x8"]
    done = _report_units(tmp_path)
    # the kill lands after the first unit; the quick 'matmul peak' may have been written too
    assert 1 <= len(done) < len(units) and list(done) == units[:len(done)], "killed part way"
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    # fast then reference path, each train (batch 4) and eval (the eval batch 256 / 16)
    assert [(r["prompts"], r["batch"]) for r in saved["results"]] == [(100, 4), (100, 16)] * 2
    assert "train step, 100 prompts, batch 4 (ran eager)" in (tmp_path / "BENCHMARKS.md").read_text()
    second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[1/3] step 100x4: measured earlier (same device and code), kept" in second.stdout
    final = _report_units(tmp_path)
    assert list(final) == units
    assert all(final[unit] == done[unit] for unit in done)                 # not measured again


COMMITTED = ROOT / "bench" / "BENCHMARKS.md", ROOT / "bench" / "benchmarks.json"


def test_a_report_without_out_dir_never_writes_over_the_committed_report(tmp_path, monkeypatch):
    """From the repository root, from bench/ (where `python bench.py` used to run) or anywhere, the default goes
    to runs/bench under the working directory; only --out-dir bench writes the committed H100 report."""
    for cwd in (ROOT, ROOT / "bench", tmp_path):
        monkeypatch.chdir(cwd)
        out_dir = Path(bench.parse_args(["--report", "--arch", "tiny"]).out_dir).resolve()
        assert out_dir == (cwd / "runs" / "bench").resolve() and out_dir != COMMITTED[0].parent
    monkeypatch.chdir(ROOT)
    assert Path(bench.parse_args(["--report", "--out-dir", "bench"]).out_dir).resolve() == COMMITTED[0].parent
    before = [path.read_bytes() for path in COMMITTED]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "report_units", lambda *a: [])   # the files, not the timings
    bench.main(["--report", "--arch", "tiny"])
    assert sorted(p.name for p in (tmp_path / "runs" / "bench").iterdir()) == ["BENCHMARKS.md", "benchmarks.json"]
    assert [path.read_bytes() for path in COMMITTED] == before


def test_both_entry_points_run_and_their_help_names_the_new_paths(tmp_path, monkeypatch, capsys):
    """`python -m bench` from the repository root (bench/__main__.py, run here as -m runs it) and
    `python bench/bench.py` from anywhere (a real process: its own sys.path)."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["bench", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bench", run_name="__main__", alter_sys=True)
    module = capsys.readouterr().out
    script = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert exit_info.value.code == 0 and script.returncode == 0, script.stderr
    for help_text in (module, script.stdout):
        assert help_text.startswith("usage: python -m bench")
        assert "python -m bench --report --arch tiny" in help_text and "--out-dir bench" in help_text
        assert "bench.py --" not in help_text and "bench_runs" not in help_text and "bench_report" not in help_text


@pytest.mark.parametrize("content,found", [("[1, 2]", "a JSON list"), ('{"format": 99, "identity": {}, "units": {}}',
                                                                       "format 99"),
                                           ('{"results": []}', "no identity and units")])
def test_a_benchmarks_json_of_another_shape_or_version_is_refused_in_one_line(tmp_path, capsys, content, found):
    (tmp_path / "benchmarks.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        bench.cli(["--report", "--arch", "tiny", "--only", "step", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert str(tmp_path / "benchmarks.json") in err and found in err, err
    assert (tmp_path / "benchmarks.json").read_text() == content and not (tmp_path / "BENCHMARKS.md").exists()
    assert report.read_report(COMMITTED[1])["identity"]["device"].startswith("NVIDIA")   # the committed one reads


@pytest.mark.parametrize("argv,message", [
    (["--report", "--arch", "tiny", "--out-dir", "/proc/no-such-dir"], "--out-dir /proc/no-such-dir: cannot create it"),
    (["--report", "--arch", "tiny", "--device", "gpu"], "--device gpu is not a device"),
    (["--arch", "tiny", "--json", "/proc/no-such/b.json"], "--json /proc/no-such/b.json cannot be written"),
    (["--sweep-batch", "0", "--arch", "tiny"], "--sweep-batch values must be >= 1"),
    (["--sweep-prompts", "-1", "--arch", "tiny"], "--sweep-prompts values must be >= 0"),
] + ([(["--report", "--arch", "tiny", "--device", "cuda"], "no CUDA GPU is visible")]
     if not torch.cuda.is_available() else []))
def test_bad_output_folder_device_or_sweep_value_is_one_line_and_exit_2_before_any_output(argv, message, monkeypatch,
                                                                                        capsys):
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("timed before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        bench.cli(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and message in out.err and out.out == "", out


def test_the_table_stage_times_a_sweep_batched_and_projects_table_2(tmp_path, monkeypatch):
    """Stage table: the VTAB run again in the same process, the paper's 7-point lr grid (Section A.2) one at a
    time and batched, Table 2 projected as 114 final runs (19 VTAB-1k tasks x 2 backbones x 3 methods) plus 114
    batched sweeps, and the mini Table 2 (here at 2 runs, eager: the sizes, not the plumbing, are smaller)."""
    real_mini = bench.time_mini_table
    monkeypatch.setattr(bench, "time_mini_table", lambda device, compile: real_mini(device, False, runs_per_key=1,
                                                                                      epochs=1))
    out = bench.main(["--report", "--arch", "tiny", "--only", "table", "--out-dir", str(tmp_path), "--warmup", "0",
                      "--repeats", "1"])
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert list(saved["units"]) == ["end-to-end vtab again", "lr sweep", "mini table 2"]
    table = saved["table"]
    sweep, warm, projection = table["lr_sweep"], table["vtab_again"], table["projection"]
    assert sweep["lrs"] == [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0] and sweep["points"] == 7
    assert (sweep["train_images"], sweep["val_images"], sweep["epochs"]) == (16, 8, 2)
    assert sweep["ratio"] == pytest.approx(sweep["one_at_a_time_s"] / sweep["batched_s"])
    assert warm["graphs"] == "eager" and warm["projected_wall_s"] > warm["wall_s"]   # CPU: compile off
    assert projection["cells"] == 114 and projection["final_run_s"] == warm["projected_wall_s"]
    assert projection["table2_s"] == pytest.approx(114 * warm["projected_wall_s"])
    assert projection["table2_sweep_s"] == pytest.approx(114 * (warm["projected_wall_s"]
                                                               + sweep["batched_projected_s"]))
    assert table["mini_table"]["runs"] == 2 and table["mini_table"]["graph_keys"] == 2
    targets = {t["figure"]: t for t in out["targets"]}
    assert targets["7-point lr sweep, one at a time / batched"]["target"] == 2.0
    assert targets["Table 2 (114 runs, projected)"]["target"] == 3600
    assert targets["Table 2 --sweep (projected)"]["target"] == 3 * 3600
    assert all(t["met"] is None for t in out["targets"])                  # a CPU judges no target
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"one at a time {sweep['one_at_a_time_s']:.1f} s, batched {sweep['batched_s']:.1f} s: " \
           f"**{sweep['ratio']:.2f}x**" in markdown
    assert f"= {projection['table2_s'] / 60:.1f} min" in markdown and "Mini Table 2 (2 runs, 2 graph keys" in markdown


def test_the_max_autotune_lever_times_todays_step_then_the_same_step_autotuned(monkeypatch):
    """GELU and bias in the GEMM epilogues come from inductor's max-autotune mode: the unit times today's
    compiled train step (mode default), then the same from the same weights with mode max-autotune, and reports
    both compiling calls' seconds (the autotuning's cost) beside the ratio."""
    calls = []

    def measure(args, device, path, prompts, batch, state=None, **kwargs):
        calls.append((args.compile_mode, path, prompts, batch, state))
        rate, compile_s = (100.0, 20.0) if args.compile_mode == "default" else (125.0, 95.0)
        return [{"images_per_s": rate, "compile_s": compile_s, "mode": "torch.compile"}], "weights"
    monkeypatch.setattr(bench, "_measure_or_oom", measure)
    monkeypatch.setattr(bench, "compile_enabled", lambda args, device: "inductor")
    args = bench.parse_args(["--report", "--arch", "tiny"])
    unit = bench.time_autotune(args, torch.device("cpu"), None, 100, 4, "cub")
    assert calls == [("default", "fast", 100, 4, None), ("max-autotune", "fast", 100, 4, "weights")]
    assert args.compile_mode == "default"                                  # the caller's flags untouched
    assert unit["ratio"] == 1.25 and unit["compile_s"] == {"default": 20.0, "max-autotune": 95.0}
    assert unit["lever"]["mode"] == "torch.compile max-autotune (compiling call 95 s, default mode 20 s)"
