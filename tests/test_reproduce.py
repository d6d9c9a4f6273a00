"""The command line: configs for every cell, one result per run, honest summaries, and clear errors that stop
before any slow work."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import fixtures
import gated_prompt as gp
import recipes
import reproduce
import results
import runtime
import trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "reproduce.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def settings(tmp_path, **kw):
    return runtime.Settings(**dict(dict(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"),
                                        quiet=True), **kw))


def tiny_demo_cfg(**kw):
    cfg = recipes.resolve("demo", arch_overrides=TINY, num_classes=6, epochs=4, warmup_epochs=1)
    cfg.update(kw)
    return cfg


def write_tiny_mae_checkpoint(path, patch_size=32):
    """A random 32-wide, 3-block backbone in the MAE .pth layout ({"model": timm names}) at 224 px."""
    torch.manual_seed(0)
    model = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=dict(TINY, patch_size=patch_size))
    torch.save({"model": model.backbone_state_dict()}, path)
    return path


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", recipes.TASKS)
@pytest.mark.parametrize("ssl", ["mae", "mocov3"])
def test_every_task_and_backbone_resolves_to_table_5(task, ssl):
    cfg = reproduce.resolve_config(reproduce.parse_args(["--task", task, "--ssl", ssl]))
    assert (cfg["batch_size"], cfg["num_prompts"], cfg["lr"], cfg["gate_init"]) == tuple(
        recipes.HPARAMS["table5"][task][ssl])
    assert (cfg["momentum"], cfg["weight_decay"], cfg["prompt_dropout"], cfg["seed"]) == (0.9, 0.0, 0.1, 42)
    if task == "ade20k":
        assert (cfg["iters"], cfg["img_size"], cfg["aux_blocks"]) == (160000, 512, [5, 9])
    else:
        assert (cfg["epochs"], cfg["warmup_epochs"], cfg["img_size"]) == (100, 10, 224)
    assert not recipes.deviations(cfg)


@pytest.mark.parametrize("task,ssl,row", [("cub", "mocov3", (64, 100, 1.0, 5)), ("oxford_iiit_pet", "mocov3", (64, 100, 1.0, 1)),
                                          ("smallnorb_azi", "mae", (128, 1, 0.1, 20)), ("ade20k", "mae", (16, 100, 0.001, 10))])
def test_resolved_cells_carry_the_papers_table_5_values(task, ssl, row):
    """Spot checks typed in from the paper's Table 5 (tests/test_paper_numbers.py compares every row)."""
    cfg = recipes.resolve(task, ssl)
    assert (cfg["batch_size"], cfg["num_prompts"], cfg["lr"], cfg["gate_init"]) == row


def test_print_config_shows_overrides_and_touches_nothing(tmp_path):
    out = cli("--task", "cub", "--ssl", "mocov3", "--method", "vpt-deep", "--lr", "0.25", "--print-config",
              "--data-dir", str(tmp_path / "absent"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["lr"] == 0.25 and cfg["num_prompts"] == 10 and cfg["method"] == "vpt-deep"  # Table 1's VPT-deep
    assert list(tmp_path.iterdir()) == []


def test_print_config_without_a_task_is_the_demos_and_the_demo_honours_lr_and_epochs():
    out = cli("--print-config", "--lr", "0.2", "--epochs", "3")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["task"] == "demo" and (cfg["lr"], cfg["epochs"]) == (0.2, 3)


@pytest.mark.parametrize("argv,message", [
    (["--task", "cub", "--iters", "3"], "--iters does not apply to cub"),
    (["--task", "ade20k", "--epochs", "3"], "--epochs does not apply to ADE20K"),
    (["--task", "ade20k", "--warmup-epochs", "3"], "--warmup-epochs does not apply to ADE20K"),
    (["--num-prompts", "3"], "--num-prompts does not apply to the demo"),
    (["--task", "cub", "--recipe", "vpt"], "--recipe vpt is VPT's own recipe for its baselines"),
    (["--task", "cub", "--method", "vpt-deep", "--recipe", "vpt"], "add --sweep"),
    (["--task", "ade20k", "--sweep"], "--sweep is for classification"),
    (["--run"], "--run goes with --table"),
])
def test_flags_that_do_not_apply_are_refused_by_name(argv, message, tmp_path):
    out = cli(*argv, "--results-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "r").exists()


def test_vpt_recipe_searches_lr_per_256_images_and_weight_decay():
    cfg = recipes.resolve("cub", "mae", "vpt-shallow", recipe="vpt")
    grid = recipes.sweep_grid(cfg)
    assert cfg["prompt_dropout"] == 0.0 and len(grid) == 10 * 4
    assert {"lr": 5.0 * 64 / 256, "weight_decay": 0.001} in grid   # VPT's base lr 5.0 at batch 64
    assert recipes.sweep_grid(recipes.resolve("cub", "mae")) == [{"lr": lr} for lr in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)]


# --- one run, one result file ------------------------------------------------------------------

def test_a_run_writes_one_result_with_its_recipe_version_and_settings(tmp_path):
    cfg = tiny_demo_cfg(epochs=2)
    result = reproduce.run_one(cfg, "final", settings(tmp_path))
    files = results.run_files(tmp_path / "results", cfg, "final")
    stored = json.loads(files.result.read_text())
    assert stored["final"] == result["final"] and stored["config"] == results.identity(cfg)
    assert stored["recipe_version"] == recipes.RECIPE_VERSION and stored["lr_source"] == "recipe"
    assert stored["runtime"]["device"].startswith("cpu") and stored["runtime"]["world_size"] == 1
    assert stored["wall_seconds"] >= stored["wall_seconds_this_session"] > 0
    assert files.prompts.is_file() and not files.state.exists()
    assert set(torch.load(files.prompts)) == {"prompts", "gate_logits", "temperatures", "head.weight", "head.bias"}


def test_a_finished_run_is_reused_whatever_the_runtime_settings(tmp_path, monkeypatch):
    """Device, bf16, compile and workers are not part of a run's identity: --no-compile finds the result."""
    cfg = tiny_demo_cfg(epochs=2)
    first = reproduce.run_one(cfg, "final", settings(tmp_path))
    monkeypatch.setattr(trainer, "run_classification", lambda *a, **k: pytest.fail("trained again"))
    again = reproduce.run_one(cfg, "final", settings(tmp_path, bf16=True, compile=True, workers=4))
    assert again == first
    other = dict(cfg, gate_init=3.0)   # another recipe: another file, never the stored one
    assert results.run_files(tmp_path / "results", other, "final").result != results.run_files(
        tmp_path / "results", cfg, "final").result


def test_fgvc_run_from_the_release_folder_name_reports_final_and_best_val(tmp_path):
    """data/CUB_200_2011 (the folder the release unpacks to) is found for --task cub."""
    fixtures.write_fgvc_fixture(tmp_path / "data" / "CUB_200_2011", "cub", class_ids=(0, 1, 2), per_class=(4, 2, 2))
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cfg = recipes.resolve("cub", "mae", arch_overrides=dict(TINY, patch_size=32), num_classes=3, epochs=2,
                          warmup_epochs=1, num_prompts=4)
    result = reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
    assert set(result["final"]) >= {"test_acc", "best_val_epoch", "best_val_acc", "test_acc_at_best_val"}
    assert all("val_acc" in h for h in result["history"])
    assert list((tmp_path / "results" / "cache").glob("cub-*.pixels.npy"))  # decoded once, cached


def test_sweep_picks_the_best_val_lr_then_runs_the_seeds(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(cfg, protocol, settings, lr_source="recipe"):
        calls.append((protocol, cfg["lr"], cfg["seed"], lr_source))
        return {"final": {"val_acc": {0.05: 10, 0.1: 30, 0.25: 30}.get(cfg["lr"], 0) if protocol == "sweep" else 1,
                          "test_acc": 50.0}}
    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    monkeypatch.setattr(recipes, "sweep_grid", lambda cfg: [{"lr": 0.05}, {"lr": 0.1}, {"lr": 0.25}])
    cfg = recipes.resolve("dtd")
    (best,), _ = reproduce.run_cells([cfg], argparse.Namespace(sweep=True, seeds=2, lr=None), settings(tmp_path))
    assert best["lr"] == 0.1   # a tie goes to the smaller lr, as VPT's tuner
    assert calls == [("sweep", 0.05, 42, "sweep grid"), ("sweep", 0.1, 42, "sweep grid"),
                     ("sweep", 0.25, 42, "sweep grid"), ("final", 0.1, 42, "sweep"), ("final", 0.1, 43, "sweep")]


def test_the_summary_shows_the_papers_number_only_for_the_papers_recipe(capsys):
    def run(**kw):
        cfg = recipes.resolve("cub", "mocov3", **kw)
        return results.new_result(cfg, "final", "recipe", runtime.Settings(), {"final": {"test_acc": 80.0}}, "x")
    reproduce.print_summary(recipes.resolve("cub", "mocov3"), [run()])
    assert "(paper: 82.86)" in capsys.readouterr().out
    reproduce.print_summary(recipes.resolve("cub", "mocov3", epochs=1), [run(epochs=1)])
    out = capsys.readouterr().out
    assert "paper:" not in out and "not the paper's recipe: epochs=1" in out


# --- ADE20K through the same path ----------------------------------------------------------------

def test_ade20k_cell_trains_the_configured_model_and_writes_one_result(tmp_path, capsys):
    """--insert-at reaches the segmenter (it used to train k=1 under a -k5 name); one JSON, no state left."""
    fixtures.write_ade_fixture(tmp_path / "data", n_train=4, n_val=2, size=(64, 80))
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth", patch_size=16)   # 14x14 grid, resized to 4x4
    cfg = recipes.resolve("ade20k", "mae", iters=3, insert_at=2, arch_overrides=dict(TINY, patch_size=16),
                          img_size=64, batch_size=2, aux_blocks=[1, 2], head_channels=16)
    seen = []
    real = recipes.model_from_config
    recipes.model_from_config = lambda cfg, *a, **k: seen.append(real(cfg, *a, **k)) or seen[-1]
    try:
        result = reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
    finally:
        recipes.model_from_config = real
    assert seen[-1].pcfg.insert_at == 2 and seen[-1].cfg.pos_embed_interpolation == "bilinear"
    files = results.run_files(tmp_path / "results", cfg, "final")
    assert "-k2-lr0.001-s42-final-" in files.result.name and "-iters3" in files.result.name
    assert files.result.is_file() and not files.state.exists()
    assert [p.name for p in files.result.parent.iterdir() if p.is_dir()] == []   # no second result folder
    assert set(result["final"]) >= {"miou_ss", "miou_ms"} and len(result["selection_ratio"]) == TINY["depth"] - 1
    results.print_table("3", tmp_path / "results")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gated+temp"))
    assert "- (38.44)" in row   # 3 iterations are not Table 3's recipe


# --- bad input: one message, exit code 2, before any slow work ------------------------------------

def test_missing_dataset_names_the_paths_and_how_to_get_it(tmp_path):
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cfg = recipes.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1)
    with pytest.raises(data.DataError) as err:
        reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
    assert str(tmp_path / "data" / "vtab-1k" / "dtd") in str(err.value) and "train800val200,test}.txt" in str(err.value)
    assert "not downloaded automatically" in str(err.value) and "http" in str(err.value)


def test_missing_checkpoint_names_the_path_url_and_command(tmp_path):
    out = cli("--task", "dtd", "--ssl", "mocov3", "--results-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2
    assert "linear-vit-b-300ep.pth.tar" in out.stderr and "https://dl.fbaipublicfiles.com/moco-v3" in out.stderr
    assert "python reproduce.py download --ssl mocov3 --arch vit_base" in out.stderr


def test_corrupt_image_is_named(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    bad = next((tmp_path / "data" / "vtab-1k" / "dtd" / "images" / "train800").glob("*.jpg"))
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "tiny.pth")   # a backbone that fits the small config below
    cfg = recipes.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1)
    with pytest.raises(data.DataError, match=bad.name):
        reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))


def test_vtab_label_out_of_range_is_an_error(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "eurosat")
    listing = tmp_path / "data" / "vtab-1k" / "eurosat" / "train800val200.txt"
    lines = listing.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 10"  # eurosat has 10 classes: 0..9
    listing.write_text("\n".join(lines) + "\n")
    cfg = recipes.resolve("eurosat", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1)
    with pytest.raises(data.DataError, match=r"train800val200\.txt:1: label 10 out of range"):
        reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(write_tiny_mae_checkpoint(tmp_path / "t.pth"))))


def test_fgvc_class_id_out_of_range_exits_2_before_decoding(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "data" / "cub", "cub", class_ids=(0, 1, 2))
    anno = json.loads((root / "train.json").read_text())
    key = next(iter(anno))
    anno[key] = 999
    (root / "train.json").write_text(json.dumps(anno))
    cfg = recipes.resolve("cub", "mae", arch_overrides=dict(TINY, patch_size=32), num_classes=3, epochs=1)
    with pytest.raises(data.DataError) as err:
        reproduce.run_one(cfg, "final", settings(tmp_path, checkpoint=str(write_tiny_mae_checkpoint(tmp_path / "t.pth"))))
    assert "train.json" in str(err.value) and key in str(err.value) and "999" in str(err.value)
    assert not list((tmp_path / "results").rglob("*.npy"))   # nothing was decoded


def test_wrong_checkpoint_for_the_architecture_exits_2_before_decoding(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "tiny.pth")  # a 32-wide file for the 768-wide ViT-B
    out = cli("--task", "dtd", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(ckpt),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "tiny.pth" in out.stderr and "wrong shapes" in out.stderr
    assert "decoding" not in out.stderr and not list(tmp_path.rglob("*.npy"))


def test_a_text_file_given_as_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "ckpt.pth").write_text("not weights\n")
    out = cli("--task", "dtd", "--checkpoint", str(tmp_path / "ckpt.pth"), "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "ckpt.pth is not a checkpoint file: it is text" in out.stderr


def test_prepare_finds_the_release_folder_and_names_real_flags(tmp_path):
    pytest.importorskip("scipy")
    fixtures.write_release_fixture(tmp_path / "data" / "CUB_200_2011", "cub")
    out = cli("prepare", "--dataset", "cub", "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "CUB_200_2011" / "train.json").is_file()
    again = cli("prepare", "--dataset", "cub", "--data-dir", str(tmp_path / "data"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_help_explains_the_tasks_methods_and_subcommands():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("--task", "--sweep", "--seeds", "--resume", "gated+temp", "prepare", "download", "--table",
                 "--all", "demo", "--download", "--recipe"):
        assert word in out.stdout


@pytest.mark.parametrize("number", ["1", "2", "3", "4", "6", "7", "8"])
def test_table_run_queues_the_cells_the_table_prints(number, monkeypatch, tmp_path):
    queued = []
    monkeypatch.setattr(reproduce, "run_cells", lambda cfgs, args, settings: queued.extend(cfgs))
    args = reproduce.parse_args(["--table", number, "--run"])
    reproduce.run_table(number, args, settings(tmp_path))
    assert [recipes.resolve(**c) for c in results.table_cells(number)] == queued
