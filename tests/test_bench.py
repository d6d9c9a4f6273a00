"""bench.py: the analytic FLOP count against hand counts, and the CLI end to end on a CPU."""
import json
import os
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
