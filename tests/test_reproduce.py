"""The harness: configs for every cell, a run that learns, exact resume, tables, and clear errors."""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures
import data
import gated_prompt as gp
import reproduce
import runtime

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "reproduce.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def args_for(tmp_path, **kw):
    a = argparse.Namespace(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"),
                           cache_dir=None, checkpoint=None, resume=False, sweep=False, seeds=1)
    vars(a).update(kw)
    return a


def tiny_demo_cfg(**kw):
    cfg = dict(reproduce.DEMO, method="gated+temp", arch_overrides=TINY, num_classes=6, epochs=4, warmup_epochs=1,
               bf16=False, compile=False)
    cfg.update(kw)
    return cfg


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", reproduce.TASKS)
@pytest.mark.parametrize("ssl", ["mae", "mocov3"])
def test_every_task_and_backbone_resolves_a_config(task, ssl):
    cfg = reproduce.resolve_config(reproduce.parse_args(["--task", task, "--ssl", ssl]))
    bs, prompts, lr, gate_init = reproduce.HPARAMS["table5"][task][ssl]
    assert (cfg["batch_size"], cfg["num_prompts"], cfg["lr"], cfg["gate_init"]) == (bs, prompts, lr, gate_init)
    assert (cfg["momentum"], cfg["weight_decay"], cfg["prompt_dropout"], cfg["seed"]) == (0.9, 0.0, 0.1, 42)
    assert (cfg["epochs"], cfg["warmup_epochs"]) == (100, 10)


def test_print_config_shows_overrides_and_touches_nothing(tmp_path):
    out = cli("--task", "cub", "--ssl", "mocov3", "--method", "vpt-deep", "--lr", "0.25", "--print-config",
              "--data-dir", str(tmp_path / "absent"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    for key in ("task", "ssl", "method", "batch_size", "num_prompts", "lr", "gate_init", "epochs",
                "warmup_epochs", "weight_decay", "momentum", "prompt_dropout", "seed"):
        assert key in cfg
    assert cfg["lr"] == 0.25 and cfg["num_prompts"] == 10 and cfg["method"] == "vpt-deep"  # Table 1's VPT-deep
    assert list(tmp_path.iterdir()) == []


def test_schedule_warms_up_linearly_from_zero_then_cosine_to_zero():
    f = [reproduce.lr_factor(e, 10, 100) for e in range(100)]
    assert f[0] == 0 and f[5] == 0.5 and f[10] == 1.0
    assert f[55] == pytest.approx(0.5) and f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# --- training ----------------------------------------------------------------------------------

def test_a_short_cpu_run_learns(tmp_path):
    result = reproduce.run_one(tiny_demo_cfg(epochs=5), "final", args_for(tmp_path), torch.device("cpu"))
    assert result["final"]["test_acc"] > 70  # 6 classes: chance is 16.7 %
    assert result["history"][-1]["loss"] < result["history"][1]["loss"]
    assert len(result["selection_ratio"]) == TINY["depth"] - 1 and len(result["temperatures"]) == TINY["depth"]
    stored = json.loads((tmp_path / "results" / f"{reproduce.run_name(tiny_demo_cfg(epochs=5), 'final')}.json").read_text())
    assert stored["final"] == result["final"] and stored["config"]["method"] == "gated+temp"


def test_killed_and_resumed_run_ends_with_the_same_numbers(tmp_path, monkeypatch):
    cfg = tiny_demo_cfg(epochs=4)
    full = reproduce.run_one(cfg, "final", args_for(tmp_path / "a"), torch.device("cpu"))

    real_save, saves = runtime.save_training_state, []

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed after epoch 2")
    monkeypatch.setattr(runtime, "save_training_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_one(cfg, "final", args_for(tmp_path / "b"), torch.device("cpu"))
    monkeypatch.setattr(runtime, "save_training_state", real_save)
    with pytest.raises(runtime.UserError, match="other settings"):  # the saved state belongs to this config only
        reproduce.run_one(dict(cfg, gate_init=3.0), "final", args_for(tmp_path / "b", resume=True), torch.device("cpu"))
    resumed = reproduce.run_one(cfg, "final", args_for(tmp_path / "b", resume=True), torch.device("cpu"))
    assert resumed["final"] == full["final"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = torch.load(tmp_path / "a" / "results" / f"{reproduce.run_name(cfg, 'final')}.prompts.pt")
    b = torch.load(tmp_path / "b" / "results" / f"{reproduce.run_name(cfg, 'final')}.prompts.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path):
    cfg = tiny_demo_cfg(lr=1e30, epochs=3, warmup_epochs=0)
    with pytest.raises(runtime.NonFiniteLoss, match="lower --lr"):
        reproduce.run_one(cfg, "final", args_for(tmp_path), torch.device("cpu"))


def write_tiny_mae_checkpoint(path, img_size=224):
    torch.manual_seed(0)
    model = gp.VisionTransformer(gp.vit_config("vit_base", "mae", img_size=img_size, **dict(TINY, patch_size=32)),
                                 gp.prompt_config("linear", num_classes=0))
    torch.save({"model": model.backbone_state_dict()}, path)


def test_fgvc_run_on_the_real_layout_reports_final_and_best_val(tmp_path):
    fixtures.write_fgvc_fixture(tmp_path / "data" / "cub", "cub", class_ids=(3, 7, 11), per_class=(4, 2, 2))
    write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    args = reproduce.parse_args(["--task", "cub", "--ssl", "mae", "--epochs", "2", "--warmup-epochs", "1"])
    cfg = reproduce.resolve_config(args)
    cfg.update(arch_overrides=dict(TINY, patch_size=32), num_classes=3, bf16=False, compile=False, num_prompts=4)
    run_args = args_for(tmp_path, checkpoint=str(tmp_path / "mae.pth"))
    result = reproduce.run_one(cfg, "final", run_args, torch.device("cpu"))
    final = result["final"]
    assert set(final) >= {"test_acc", "best_val_epoch", "best_val_acc", "test_acc_at_best_val"}
    assert all("val_acc" in h for h in result["history"])
    assert result["config"]["task"] == "cub" and "code_version" in result and result["device"].startswith("cpu")
    assert list((tmp_path / "results" / "cache").glob("cub-*.npy"))  # decoded once, cached


def test_sweep_picks_the_best_val_lr_then_runs_the_seeds(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(cfg, protocol, args, device):
        calls.append((protocol, cfg["lr"], cfg["seed"]))
        return {"final": {"val_acc": {0.05: 10, 0.1: 30, 0.25: 20}.get(cfg["lr"], 0) if protocol == "sweep" else 1,
                          "test_acc": 50.0}}
    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    cfg = dict(reproduce.resolve_config(reproduce.parse_args(["--task", "dtd"])), lr=1.0, lr_grid=[0.05, 0.1, 0.25])
    best, _ = reproduce.run_task(cfg, args_for(tmp_path, sweep=True, seeds=2), torch.device("cpu"))
    assert best["lr"] == 0.1
    assert calls == [("sweep", 0.05, 42), ("sweep", 0.1, 42), ("sweep", 0.25, 42), ("final", 0.1, 42), ("final", 0.1, 43)]


# --- tables --------------------------------------------------------------------------------------

def fake_result(results_dir, task, ssl, method, acc, seed=42, lr=0.1, **cfg_kw):
    """A stored run in the harness's result-file format (for the table printer)."""
    cfg = reproduce.resolve_config(reproduce.parse_args(["--task", task, "--ssl", ssl, "--method", method]))
    cfg.update(lr=lr, seed=seed, **cfg_kw)
    runtime.write_json(Path(results_dir) / f"{reproduce.run_name(cfg, 'final')}.json",
                       {"config": cfg, "protocol": "final", "final": {"test_acc": acc}})


def test_table_1_prints_our_cells_beside_the_papers(tmp_path, capsys):
    fake_result(tmp_path, "cub", "mae", "gated+temp", 70.0)
    fake_result(tmp_path, "cub", "mae", "gated+temp", 72.0, seed=43)
    fake_result(tmp_path, "cub", "mae", "vpt-shallow", 40.0, num_prompts=7)  # not the paper's setting: ignored
    reproduce.print_table("1", tmp_path)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gated+temp"))
    assert "71.00±1.41 (70.56)" in row and "- (78.55)" in row
    shallow = next(line for line in out.splitlines() if line.startswith("vpt-shallow"))
    assert "- (42.15)" in shallow


def test_table_2_reports_both_vtab_means(tmp_path, capsys):
    for i, task in enumerate(data.VTAB_TASKS):
        fake_result(tmp_path, task, "mae", "gated+temp", float(i))
    reproduce.print_table("2", tmp_path)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gated+temp"))
    groups = {}
    for i, (task, info) in enumerate(data.VTAB_TASKS.items()):
        groups.setdefault(info.group, []).append(i)
    group_means = [sum(v) / len(v) for v in groups.values()]
    assert f"{sum(group_means) / 3:.2f} (49.22)" in row and f"{sum(range(19)) / 19:.2f}" in row
    assert "gated+temp per task: cifar 0.00, caltech101 1.00, dtd 2.00" in out


# --- bad input: one message, exit code 2 ----------------------------------------------------------

def test_missing_dataset_names_the_path_and_url(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    write_tiny_mae_checkpoint(tmp_path / "checkpoints" / "mae.pth")
    out = cli("--task", "cub", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "checkpoints" / "mae.pth"),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert str(tmp_path / "data" / "cub") in out.stderr and "http" in out.stderr


def test_missing_checkpoint_names_the_path_and_url(tmp_path):
    out = cli("--task", "dtd", "--ssl", "mocov3", "--results-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2
    assert "linear-vit-b-300ep.pth.tar" in out.stderr and "https://dl.fbaipublicfiles.com/moco-v3" in out.stderr


def test_corrupt_image_is_named(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    bad = next((tmp_path / "data" / "vtab-1k" / "dtd" / "images" / "train800").glob("*.jpg"))
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    out = cli("--task", "dtd", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "mae.pth"),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and bad.name in out.stderr


def test_label_out_of_range_is_an_error(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "eurosat")
    listing = tmp_path / "data" / "vtab-1k" / "eurosat" / "train800val200.txt"
    lines = listing.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 10"  # eurosat has 10 classes: 0..9
    listing.write_text("\n".join(lines) + "\n")
    write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    out = cli("--task", "eurosat", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "mae.pth"),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "train800val200.txt:1" in out.stderr and "out of range" in out.stderr


def test_wrong_checkpoint_for_the_architecture_exits_2(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    write_tiny_mae_checkpoint(tmp_path / "tiny.pth")  # a 32-wide file for the 768-wide ViT-B
    out = cli("--task", "dtd", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "tiny.pth"),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "tiny.pth" in out.stderr and "wrong shapes" in out.stderr


def test_help_explains_the_tasks_and_methods():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("--task", "--sweep", "--seeds", "--resume", "gated+temp", "prepare", "--table", "demo"):
        assert word in out.stdout


def test_ade20k_cell_runs_setr_pup_and_lands_in_table_3(tmp_path, capsys):
    import segmentation
    fixtures.write_ade_fixture(tmp_path / "data", n_train=4, n_val=2, size=(64, 80))
    torch.manual_seed(0)
    backbone = gp.VisionTransformer(gp.vit_config("vit_base", "mae", **dict(TINY, patch_size=16)),
                                    gp.prompt_config("linear", num_classes=0))
    torch.save({"model": backbone.backbone_state_dict()}, tmp_path / "mae.pth")  # 14x14 grid, resized to 4x4
    cfg = reproduce.resolve_config(reproduce.parse_args(["--task", "ade20k", "--ssl", "mae", "--iters", "3"]))
    assert (cfg["batch_size"], cfg["num_prompts"], cfg["lr"], cfg["gate_init"], cfg["iters"]) == (16, 100, 0.001, 10, 3)
    cfg.update(arch_overrides=dict(TINY, patch_size=16), img_size=64, crop_size=64, batch_size=2, num_prompts=100,
               aux_blocks=(1, 2), num_workers=0, bf16=False)
    result = reproduce.run_one(cfg, "final", args_for(tmp_path, checkpoint=str(tmp_path / "mae.pth"),
                                                      data_dir=str(tmp_path / "data")), torch.device("cpu"))
    assert set(result["final"]) >= {"miou_ss", "miou_ms"} and len(result["selection_ratio"]) == TINY["depth"] - 1
    reproduce.print_table("3", tmp_path / "results")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gated+temp"))
    assert f"{result['final']['miou_ss']:.2f} (38.44)" in row


@pytest.mark.parametrize("number,count", [("1", 30), ("2", 114), ("3", 6), ("4", 6), ("6", 6), ("7", 30), ("8", 12)])
def test_run_table_queues_every_cell_of_the_table(number, count):
    cells = reproduce.table_cells(number)
    assert len(cells) == count and len({tuple(sorted(c.items())) for c in cells}) == count
    for c in cells:  # each resolves
        reproduce.resolve_config(argparse.Namespace(**dict(vars(reproduce.parse_args([])), **c)))


def test_a_stored_result_is_reused_only_for_the_same_settings(tmp_path):
    cfg = tiny_demo_cfg(epochs=2)
    first = reproduce.run_one(cfg, "final", args_for(tmp_path), torch.device("cpu"))
    assert reproduce.run_one(cfg, "final", args_for(tmp_path), torch.device("cpu")) == first
    with pytest.raises(runtime.UserError, match=r"other settings \(epochs\)"):
        reproduce.run_one(dict(cfg, epochs=3), "final", args_for(tmp_path), torch.device("cpu"))
