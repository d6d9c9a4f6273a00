"""bench.py: the analytic FLOP count against hand counts, and the CLI end to end on a CPU."""
import json
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import gated_prompt as gp  # noqa: E402

TINY = ["--arch", "vit_small", "--img-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "2", "--no-compile"]


def tiny_cfg(**overrides):
    """D = 8, one block, 32px images of 16px patches: N = 4 patches, T = 5 tokens without prompts."""
    return gp.vit_config("vit_small", img_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2, **overrides)


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


def test_model_flops_matches_config():
    model = gp.VisionTransformer(tiny_cfg(), gp.prompt_config("gated+temp", num_classes=3, num_prompts=1))
    assert bench.model_flops(model) == bench.flops(tiny_cfg(), 1, 3, trainable_temperatures=True)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                       ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_lookup(name, peak):
    assert bench.peak_for_name(name) == peak


def test_cli_table_and_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    out = bench.main(TINY + ["--prompts", "1", "--batch", "2", "--json", str(out_file)])
    rows = {(r["path"], r["step"]): r for r in out["results"]}
    assert set(rows) == {(p, s) for p in ("fast", "reference") for s in ("train", "eval")}
    for r in rows.values():
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and len(r["repeats"]) == 2
        assert r["peak_fraction"] is None and r["peak_memory_gib"] is None   # CPU: unknown peak, no GPU memory
    assert rows["fast", "eval"]["batch"] == 4 * rows["fast", "train"]["batch"] == 8
    assert {r["step"] for r in out["ratios"]} == {"train", "eval"} and all(r["speedup"] > 0 for r in out["ratios"])
    printed = capsys.readouterr().out
    assert "fast/ref" in printed and "reference" in printed
    saved = json.loads(out_file.read_text())
    assert saved["device"].startswith("cpu") and saved["torch"] and len(saved["results"]) == 4
    assert saved["ratios"] == out["ratios"]


def test_cli_sweeps_and_peak_override():
    out = bench.main(TINY + ["--batch", "2", "--steps", "1", "--repeats", "1", "--peak-tflops", "1",
                             "--sweep-prompts", "1", "4", "--sweep-batch", "1"])
    assert out["results"] == [] and out["ratios"] == []             # a sweep replaces the main table
    assert [(r["prompts"], r["step"]) for r in out["sweeps"]["prompts"]] == [(1, "train"), (1, "eval"),
                                                                           (4, "train"), (4, "eval")]
    assert [(r["batch"], r["path"]) for r in out["sweeps"]["batch"]] == [(1, "fast"), (4, "fast")]
    assert all(r["peak_fraction"] == r["tflops"] for r in out["sweeps"]["prompts"])   # peak = 1 TFLOP/s


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        bench.parse_args(["--img-size", "30"])


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


# --- --end-to-end ---------------------------------------------------------------------------------------

E2E_TINY = ["--arch", "tiny", "--img-size", "32", "--train-images", "20", "--test-images", "12", "--batch", "8"]


def test_defaults_per_mode():
    table, seg, e2e = bench.parse_args([]), bench.parse_args(["--segmentation"]), bench.parse_args(["--end-to-end", "cub"])
    assert (table.batch, table.prompts, table.img_size) == ([64], [100], 224)
    assert (seg.batch, seg.prompts, seg.img_size) == ([16], [100], 512)
    assert (e2e.batch, e2e.prompts, e2e.img_size, e2e.epochs) == (None, None, 224, None)   # None: the recipe's


@pytest.mark.parametrize("argv", [["--end-to-end", "vtab", "--segmentation"], ["--epochs", "2"],
                                  ["--segmentation", "--batch", "2", "4"], ["--end-to-end", "cub", "--prompts", "1", "2"],
                                  ["--segmentation", "--sweep-batch"], ["--segmentation", "--img-size", "500"],
                                  ["--end-to-end", "vtab", "--train-images", "0"], ["--arch", "tiny", "--img-size", "40"]])
def test_cli_rejects_bad_mode_combinations(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.parametrize("run,task,batch,prompts,lr", [("vtab", "dtd", 128, 1, 0.25), ("cub", "cub", 64, 100, 0.1)])
def test_end_to_end_uses_the_papers_recipe(run, task, batch, prompts, lr):
    cfg = bench.end_to_end_config(bench.parse_args(["--end-to-end", run]), torch.device("cpu"))
    assert (cfg["task"], cfg["ssl"], cfg["method"], cfg["arch"]) == (task, "mae", "gated+temp", "vit_base")
    assert (cfg["batch_size"], cfg["num_prompts"], cfg["lr"], cfg["epochs"]) == (batch, prompts, lr, 100)
    assert cfg["compile"] and not cfg["bf16"] and cfg["img_size"] == 224   # bf16 on CUDA only
    cfg = bench.end_to_end_config(bench.parse_args(["--end-to-end", run, "--epochs", "7", "--batch", "3",
                                                    "--prompts", "5", "--no-compile"]), torch.device("cuda"))
    assert (cfg["epochs"], cfg["batch_size"], cfg["num_prompts"], cfg["compile"], cfg["bf16"]) == (7, 3, 5, False, True)
    assert (bench.END_TO_END[run]["train"], bench.END_TO_END[run]["test"]) == {"vtab": (1000, 10000),
                                                                               "cub": (5994, 5794)}[run]


def test_synthetic_split_tiles_every_class():
    split = bench.synthetic_split("dtd", "train", 100, 16, seed=0)   # 47 classes, 2 generated images each
    assert split.images.shape == (100, 3, 16, 16) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [i % 47 for i in range(100)] and split.task == "dtd"
    assert torch.equal(split.images[0], split.images[94]) and not torch.equal(split.images[0], split.images[47])
    assert not torch.equal(split.images[0], bench.synthetic_split("dtd", "test", 1, 16, seed=1).images[0])


@pytest.mark.parametrize("run", ["vtab", "cub"])
def test_end_to_end_tiny(run, tmp_path, capsys):
    real_final_metrics = bench.reproduce.final_metrics
    out_file = tmp_path / "e2e.json"
    out = bench.main(["--end-to-end", run, "--epochs", "3", "--json", str(out_file)] + E2E_TINY)
    r = out["end_to_end"]
    assert r["epochs"] == 3 and len(r["epoch_s"]) == 3 and all(s > 0 for s in r["epoch_s"])
    assert r["epoch1_s"] == r["epoch_s"][0] and r["median_epoch_s"] == statistics.median(r["epoch_s"][1:]) > 0
    assert r["train_images_per_s"] == pytest.approx(20 / r["median_epoch_s"])
    assert r["setup_s"] > 0 and r["test_eval_s"] > 0 and r["train_s"] >= sum(r["epoch_s"])
    assert r["wall_s"] >= r["setup_s"] + r["train_s"] + r["test_eval_s"] - 1e-9
    assert r["projected_wall_s"] == pytest.approx(r["setup_s"] + r["epoch1_s"] + 99 * r["median_epoch_s"]
                                                  + r["test_eval_s"])
    assert 0 <= r["test_acc"] <= 100
    assert (r["train_images"], r["test_images"], r["batch_size"]) == (20, 12, 8)
    assert r["num_prompts"] == {"vtab": 1, "cub": 100}[run]
    assert r["cached_size"] == {"vtab": 32, "cub": 36}[run]                # FGVC: cached 256/224 x the crop
    assert not r["images_on_gpu"] and not r["compiled"] and r["target_met"] is None and not r["full_size"]
    assert bench.reproduce.final_metrics is real_final_metrics             # the timing wrapper is removed
    printed = capsys.readouterr().out
    assert "total wall" in printed and "projected wall for 100 epochs" in printed and "target" not in printed
    saved = json.loads(out_file.read_text())["end_to_end"]
    assert saved["epoch_s"] == r["epoch_s"] and saved["test_acc"] == r["test_acc"]


# --- --segmentation -------------------------------------------------------------------------------------


def test_segmentation_tiny(tmp_path, capsys):
    out_file = tmp_path / "seg.json"
    out = bench.main(["--segmentation", "--arch", "tiny", "--img-size", "64", "--batch", "2", "--steps", "1",
                      "--warmup", "1", "--repeats", "2", "--json", str(out_file)])
    r = out["segmentation"]
    assert r["iters_per_s_min"] <= r["iters_per_s"] <= r["iters_per_s_max"] and r["iters_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(2 * r["iters_per_s"])
    assert r["projected_iters"] == 160000
    assert r["projected_s"] == pytest.approx(160000 / r["iters_per_s"])
    assert r["projected_hours"] == pytest.approx(160000 / r["iters_per_s"] / 3600)
    assert (r["batch_size"], r["crop_size"], r["num_classes"], r["num_prompts"]) == (2, 64, 150, 100)
    assert r["infer_scaled_to"] == [64, 85] and r["infer_windows"] == 2 and r["infer_s_per_image"] > 0
    assert r["projected_val_eval_s"] == pytest.approx(2000 * r["infer_s_per_image"])
    assert r["train_mode"] == r["infer_mode"] == "eager" and not r["compiled"] and not r["bf16"]
    assert r["train_peak_memory_gib"] is None                              # CPU: no GPU memory
    printed = capsys.readouterr().out
    assert f"{r['projected_hours']:.2f} h projected" in printed
    assert json.loads(out_file.read_text())["segmentation"]["projected_hours"] == r["projected_hours"]


@pytest.mark.parametrize("size", [(512, 683), (300, 300), (512, 2048), (700, 512)])
def test_window_count_matches_slide_inference(size):
    calls = []

    def model(x):
        calls.append(len(x))
        return torch.zeros(len(x), 1, *x.shape[-2:])
    bench.segmentation.slide_inference(model, torch.zeros(1, 3, *size), num_classes=1, crop=512, stride=341)
    assert bench._window_count(*size, 512, 341) == sum(calls)


def test_failed_compile_falls_back_to_eager(monkeypatch, capsys):
    def broken(_model):
        def call(*args):
            raise RuntimeError("no backend\nsecond line")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    fn, mode = bench._compiled_or_eager(lambda forward: (lambda: forward(1)), lambda x: x + 1, True,
                                        torch.device("cpu"), "training step")
    assert fn() == 2 and mode.startswith("eager (torch.compile failed on the training step: RuntimeError: no backend")
    assert "torch.compile failed" in capsys.readouterr().out
