"""The command line: configs for every cell, one result per run, honest summaries, and clear errors that stop
before any slow work."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT as TINY, process_of, settings, start_forkserver, start_together, tiny_demo
from harness.data import datasets
import fixtures
import gated_prompt as gp
from harness import inputs
from harness import config
import reproduce
from harness import results
from harness import runs
from harness import runtime
from harness import classification

ROOT = Path(__file__).resolve().parents[1]
start_forkserver()   # the real processes below fork from it; its imports run meanwhile


def write_tiny_mae_checkpoint(path, patch_size=32):
    """A random 32-wide, 3-block backbone in the MAE .pth layout ({"model": timm names}) at 224 px."""
    torch.manual_seed(0)
    model = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=dict(TINY, patch_size=patch_size))
    torch.save({"model": model.backbone_state_dict()}, path)
    return path


# --- configuration ---------------------------------------------------------------------------

# Table 5 of the paper (Appendix A.2), typed in from its text: task -> (BS, # of PTs, LR, gate init.) for MAE, then
# for MoCo v3. Not read from paper_hparams.yaml, the file under test.
TABLE_5 = {
    "caltech101": ((128, 1, 0.5, 5), (128, 10, 2.5, 4)), "cifar": ((128, 1, 0.25, 5), (128, 10, 1, 15)),
    "clevr_dist": ((128, 1, 0.1, 15), (128, 5, 1, 10)), "clevr_count": ((128, 1, 0.05, 15), (128, 5, 0.5, 5)),
    "diabetic_retinopathy": ((128, 5, 0.05, 10), (128, 5, 0.5, 5)), "dmlab": ((128, 1, 0.1, 5), (128, 1, 1, 5)),
    "dsprites_ori": ((128, 1, 0.05, 5), (128, 5, 0.5, 5)), "dsprites_loc": ((128, 1, 0.1, 5), (128, 5, 0.5, 5)),
    "dtd": ((128, 1, 0.25, 1), (128, 10, 1, 5)), "eurosat": ((128, 5, 0.1, 1), (128, 10, 1, 5)),
    "kitti": ((128, 5, 0.1, 7), (128, 5, 1, 5)), "oxford_flowers102": ((128, 1, 0.25, 5), (128, 5, 1, 7)),
    "oxford_iiit_pet": ((128, 1, 0.5, 10), (64, 100, 1, 1)), "patch_camelyon": ((128, 1, 0.05, 5), (128, 1, 1, 10)),
    "resisc45": ((128, 10, 0.25, 5), (64, 100, 1, 7)), "smallnorb_azi": ((128, 1, 0.1, 20), (128, 10, 0.5, 3)),
    "smallnorb_ele": ((128, 1, 0.05, 10), (128, 5, 0.5, 4)), "sun397": ((128, 1, 0.5, 10), (128, 1, 1, 4)),
    "svhn": ((128, 1, 0.1, 10), (128, 5, 1, 10)), "cub": ((64, 100, 0.1, 5), (64, 100, 1, 5)),
    "flowers": ((64, 100, 0.1, 15), (64, 100, 1, 10)), "cars": ((64, 100, 0.25, 5), (64, 100, 0.5, 5)),
    "dogs": ((64, 100, 0.5, 15), (64, 100, 0.5, 10)), "nabirds": ((64, 100, 0.5, 5), (64, 100, 1, 5)),
    "ade20k": ((16, 100, 0.001, 10), (16, 100, 0.001, 10)),
}


def test_table_5_covers_every_task():
    assert set(TABLE_5) == set(config.TASKS)


@pytest.mark.parametrize("task", list(TABLE_5))
@pytest.mark.parametrize("ssl", ["mae", "mocov3"])
def test_every_task_and_backbone_resolves_to_table_5(task, ssl):
    [cfg] = reproduce.planned_configs(reproduce.parse_args(["--task", task, "--ssl", ssl]))
    assert (cfg.batch_size, cfg.num_prompts, cfg.lr, cfg.gate_init) == TABLE_5[task][ssl == "mocov3"]
    assert (cfg.momentum, cfg.weight_decay, cfg.prompt_dropout, cfg.seed) == (0.9, 0.0, 0.1, 42)
    if task == "ade20k":
        assert (cfg.iters, cfg.img_size, cfg.aux_blocks) == (160000, 512, (5, 9))
    else:
        assert (cfg.epochs, cfg.warmup_epochs, cfg.img_size) == (100, 10, 224)
    assert not config.deviations(cfg)


@pytest.mark.parametrize("task,ssl,row", [("cub", "mocov3", (64, 100, 1.0, 5)), ("oxford_iiit_pet", "mocov3", (64, 100, 1.0, 1)),
                                          ("smallnorb_azi", "mae", (128, 1, 0.1, 20)), ("ade20k", "mae", (16, 100, 0.001, 10))])
def test_resolved_cells_carry_the_papers_table_5_values(task, ssl, row):
    """Spot checks typed in from the paper's Table 5 (tests/test_paper_numbers.py compares every row)."""
    cfg = config.resolve(task, ssl)
    assert (cfg.batch_size, cfg.num_prompts, cfg.lr, cfg.gate_init) == row


def test_a_config_is_typed_frozen_and_checked_at_construction():
    cfg = config.resolve("cub", "mae")
    with pytest.raises(TypeError, match="lrr"):
        cfg.replace(lrr=0.1)                                       # a mistyped field name
    with pytest.raises(TypeError, match="momentun"):
        config.ClassificationConfig(**dict(cfg.identity(), momentun=0.9))
    for name, value, message in [("lr", "0.1", "--lr '0.1' is not usable: it must be a number > 0"),
                                 ("batch_size", 1.5, "--batch-size 1.5 is not usable: it must be a whole number >= 1"),
                                 ("seed", True, "--seed True is not usable: it must be a whole number >= 0"),
                                 ("gate_init", float("nan"), "--gate-init nan is not usable: it must be a finite number"),
                                 ("arch_overrides", [32], "--arch-overrides [32] is not usable")]:
        with pytest.raises(runtime.UserError, match=re.escape(message)):
            cfg.replace(**{name: value})
    with pytest.raises(runtime.UserError, match=re.escape("--aux-blocks '5, 9' is not usable: it must be a list")):
        config.resolve("ade20k", "mae").replace(aux_blocks="5, 9")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert cfg.replace(lr=0.5).lr == 0.5 and cfg.lr == 0.1
    assert config.resolve("ade20k", "mae", aux_blocks=[1, 2]).aux_blocks == (1, 2)   # YAML / JSON lists: tuples


def test_each_field_says_who_sets_it_and_the_flags_are_the_override_fields():
    """Typed in: the override flags each kind of run takes (the README's "Flags must apply")."""
    assert set(config.ClassificationConfig.flags()) == {
        "recipe", "arch", "batch_size", "num_prompts", "lr", "gate_init", "weight_decay", "prompt_dropout", "epochs",
        "warmup_epochs", "seed", "insert_at"}
    assert set(config.SegmentationConfig.flags()) == {
        "arch", "batch_size", "num_prompts", "lr", "gate_init", "prompt_dropout", "iters", "seed", "insert_at"}
    assert set(config.DemoConfig.flags()) == {"lr", "epochs", "warmup_epochs", "seed"}
    for cls in config.CONFIGS:
        assert {f.metadata["set_by"] for f in dataclasses.fields(cls)} <= {"choice", "flag", "code", "recipe"}
    assert set(config.ClassificationConfig.fields_set_by("code")) == {"img_size", "arch_overrides", "num_classes",
                                                                      "dataset"}
    assert set(config.OVERRIDE_TYPES) <= set(vars(reproduce.parse_args([])))   # each has its command-line flag


def test_a_runs_identity_is_what_result_files_already_store():
    """The identity a stored result and a saved training state are matched by, as result files written before the
    typed config hold it (typed in): the same keys and values, optional fields left out while unset."""
    assert config.resolve("cub", "mae").identity() == {
        "task": "cub", "ssl": "mae", "method": "gated+temp", "recipe": "paper", "arch": "vit_base", "batch_size": 64,
        "num_prompts": 100, "lr": 0.1, "gate_init": 5, "momentum": 0.9, "weight_decay": 0.0, "prompt_dropout": 0.1,
        "epochs": 100, "warmup_epochs": 10, "seed": 42, "insert_at": 1, "img_size": 224}
    ade = config.resolve("ade20k", "mocov3")
    assert ade.identity() == {
        "task": "ade20k", "ssl": "mocov3", "method": "gated+temp", "arch": "vit_base", "batch_size": 16,
        "num_prompts": 100, "lr": 0.001, "gate_init": 10, "momentum": 0.9, "weight_decay": 0.0, "prompt_dropout": 0.1,
        "iters": 160000, "seed": 42, "insert_at": 1, "img_size": 512, "aux_blocks": [5, 9], "aux_loss_weight": 0.4,
        "head_channels": 256, "head_lr_mult": 10.0, "poly_power": 0.9, "min_lr": 0.0001, "slide_stride": 341,
        "ms_ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "pos_embed_interpolation": "bilinear"}
    assert set(config.resolve("demo").identity()) >= {"arch_overrides", "num_classes", "img_size"}
    assert config.from_identity(json.loads(json.dumps(ade.identity()))) == ade
    older = {k: v for k, v in config.resolve("cub", "mae").identity().items() if k != "epochs"}
    with pytest.raises(runtime.UserError, match="lacks epochs"):
        config.from_identity(older)


def test_one_task_registry_holds_kind_classes_folders_and_transform():
    kinds = [t.kind for t in config.TASKS.values()]
    assert (kinds.count("fgvc"), kinds.count("vtab"), kinds.count("segmentation")) == (5, 19, 1)
    assert [config.TASKS[t].num_classes for t in ("cub", "nabirds", "dtd", "svhn", "ade20k")] == [200, 555, 47, 10, 150]
    assert config.TASKS["cub"].transform(224) == {"kind": "fgvc", "resize": 256, "crop": 224}   # VPT: Resize(256)
    assert config.TASKS["dtd"].transform(224) == {"kind": "vtab", "resize": 224, "crop": 224}
    assert config.TASKS["ade20k"].transform(512) is None and config.find_task("demo").transform(32) is None
    assert "CUB_200_2011" in config.TASKS["cub"].folders and config.TASKS["ade20k"].folders == ("ADEChallengeData2016",)
    assert config.resolve("dtd", "mae").head_size() == 47 and config.resolve("ade20k", "mae").head_size() == 0
    with pytest.raises(runtime.UserError, match="unknown task 'cubb'"):
        config.find_task("cubb")


def test_nothing_imports_the_command_line_and_the_harness_has_no_import_circles():
    """Read from the sources: no module imports reproduce.py; gated_prompt.py imports nothing of the harness; the
    classification harness does not import the predict command (serving.py); the import graph has no circle."""
    import ast
    files = [ROOT / "gated_prompt.py", *sorted((ROOT / "harness").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    graph = {}
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    assert not [m for m, deps in graph.items() if "reproduce" in deps]
    assert not [d for d in graph["gated_prompt"] if d.startswith(("harness", "bench"))]
    assert "harness.serving" not in graph["harness.classification"]
    local = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(m):] + [m])}"
        if m not in done:
            on_path.append(m)
            for d in sorted(local[m]):
                visit(d)
            on_path.pop()
            done.add(m)
    for m in sorted(local):
        visit(m)


def test_print_config_shows_overrides_and_touches_nothing(tmp_path, cli):
    out = cli("--task", "cub", "--ssl", "mocov3", "--method", "vpt-deep", "--lr", "0.25", "--print-config",
              "--data-dir", str(tmp_path / "absent"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert (printed["lr"], printed["num_prompts"], printed["method"]) == (0.25, 10, "vpt-deep")  # Table 1's VPT-deep
    assert list(tmp_path.iterdir()) == []


def test_print_config_without_a_task_is_the_demos_and_the_demo_honours_lr_and_epochs(cli):
    out = cli("--print-config", "--lr", "0.2", "--epochs", "3")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)   # one config per demo method
    assert [p["method"] for p in printed] == ["vpt-shallow", "gated+temp"]
    assert all(p["task"] == "demo" and (p["lr"], p["epochs"]) == (0.2, 3) for p in printed)


@pytest.mark.parametrize("argv,message", [
    (["--task", "cub", "--iters", "3"], "--iters does not apply to cub"),
    (["--task", "ade20k", "--epochs", "3"], "--epochs does not apply to ADE20K"),
    (["--task", "ade20k", "--warmup-epochs", "3"], "--warmup-epochs does not apply to ADE20K"),
    (["--num-prompts", "3"], "--num-prompts does not apply to the demo"),
    (["--task", "cub", "--recipe", "vpt"], "--recipe vpt is VPT's own recipe for its baselines"),
    (["--task", "cub", "--method", "vpt-deep", "--recipe", "vpt"], "add --sweep"),
    (["--task", "ade20k", "--sweep"], "--sweep is for classification"),
    (["--run"], "--run goes with --table"),
    (["--table", "1", "--epochs", "3"], "--epochs does not apply to printing a table (add --run to run its missing "),
    (["--table", "1", "--task", "cub"], "--task does not apply to printing a table"),   # and --run would not help
])
def test_flags_that_do_not_apply_are_refused_by_name(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # in-process (the exit status of the real command is tested elsewhere)
    code = reproduce.cli_main([*argv, "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
    if "--task" in argv and "--table" in argv:
        assert "--run" not in err


@pytest.mark.parametrize("argv,message", [
    (["--task", "cubb"], "reproduce.py: error: argument --task: invalid choice: 'cubb'"),
    (["--epochs", "three"], "reproduce.py: error: argument --epochs: invalid int value: 'three'"),
    (["predict", "photo.jpg"], "reproduce.py predict: error: the following arguments are required: --pack"),
    (["figure", "eleven"], "reproduce.py figure: error: argument number: invalid int value: 'eleven'"),
    (["prepare", "--dataset", "imagenet"], "reproduce.py prepare: error: argument --dataset: invalid choice"),
    (["download", "--ssl", "simclr"], "reproduce.py download: error: argument --ssl: invalid choice: 'simclr'"),
])
def test_a_mistyped_argument_is_one_line_naming_it_and_where_the_usage_is(argv, message, cli):
    out = cli(*argv)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(message) and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.strip().endswith(f"(see {message.split(': error')[0]} --help)")


def test_the_demo_writes_under_results_demo_afresh_each_time(tmp_path):
    """results/demo/<ssl>/<run> (the demo task's own folder, not results/demo/demo/...); a second demo replaces
    the first one's files, nothing outside results/demo is touched."""
    from harness import results
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.txt").write_text("mine")
    cfg = tiny_demo(epochs=1, warmup_epochs=0)
    for _ in range(2):
        finished, folder = runs.run_demo([cfg], settings(tmp_path))
        assert Path(folder) == tmp_path / "results" / "demo" and len(finished) == 1
    files = results.run_files(tmp_path / "results", cfg, "final")
    assert files.result.is_file() and files.result.relative_to(tmp_path / "results").parts[:2] == ("demo", cfg.ssl)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["demo", "kept.txt"]


def test_vpt_recipe_searches_lr_per_256_images_and_weight_decay():
    """KMnP/vpt: tune_fgvc.py's prompt grid has 9 base lrs (no 0.05), tune_vtab.py's 10 (with 0.05); 4 weight
    decays; lr per 256 images."""
    cfg = config.resolve("cub", "mae", "vpt-shallow", recipe="vpt")
    grid = config.sweep_grid(cfg)
    assert cfg.prompt_dropout == 0.0 and len(grid) == 9 * 4
    assert {"lr": 5.0 * 64 / 256, "weight_decay": 0.001} in grid   # VPT's base lr 5.0 at batch 64
    assert {p["lr"] for p in grid} == {b * 64 / 256 for b in (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0)}
    vtab = config.sweep_grid(config.resolve("dtd", "mae", "vpt-deep", recipe="vpt"))
    assert len(vtab) == 10 * 4 and {"lr": 0.05 * 128 / 256, "weight_decay": 0.0} in vtab   # dtd: batch 128
    assert {p["weight_decay"] for p in vtab} == {0.0, 0.0001, 0.001, 0.01}
    assert config.sweep_grid(config.resolve("cub", "mae")) == [{"lr": lr} for lr in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)]


def test_vpt_recipe_decays_every_trainable_tensor_but_the_heads_bias():
    model = gp.build_model("vit_base", "mae", "vpt-deep", num_classes=3, vit_overrides=TINY, img_size=32, num_prompts=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(classification.decay_groups(model, 0.1), lr=1.0, weight_decay=0.1)
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    opt.step()   # zero gradient: a decayed tensor becomes p - lr * wd * p = 0.9 p
    after = dict(model.named_parameters())
    assert torch.equal(after["head.bias"], before["head.bias"])
    for name in set(before) - {"head.bias"}:
        assert torch.allclose(after[name], 0.9 * before[name]), name
    assert set(before) >= {"prompts", "deep_prompts", "head.weight"}


def test_seeds_5_under_vpts_recipe_are_vpts_final_run_seeds(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(runs, "run_one", lambda cfg, protocol, settings, source: seen.append(cfg.seed) or
                        {"final": {"test_acc": 1.0}})
    cfg = config.resolve("cub", "mae", "vpt-shallow", recipe="vpt", lr=0.5, weight_decay=0.001)
    runs.run_cells([cfg], settings(tmp_path), seeds=5, lr_source="command line")
    assert seen == [42, 44, 82, 100, 800]
    seen.clear()
    runs.run_cells([config.resolve("cub", "mae")], settings(tmp_path), seeds=3)
    assert seen == [42, 43, 44]


# --- one run, one result file ------------------------------------------------------------------

def test_a_run_writes_one_result_with_its_recipe_version_and_settings(tmp_path):
    cfg = tiny_demo(epochs=2)
    result = runs.run_one(cfg, "final", settings(tmp_path))
    files = results.run_files(tmp_path / "results", cfg, "final")
    stored = json.loads(files.result.read_text())
    assert stored["final"] == result["final"] and stored["config"] == cfg.identity()
    assert stored["recipe_version"] == config.RECIPE_VERSION and stored["lr_source"] == "recipe"
    assert stored["runtime"]["device"].startswith("cpu") and stored["runtime"]["world_size"] == 1
    assert stored["wall_seconds"] >= stored["wall_seconds_this_session"] > 0
    assert files.prompts.is_file() and not files.state.exists()
    assert set(torch.load(files.prompts)) == {"prompts", "gate_logits", "temperatures", "head.weight", "head.bias"}


def test_a_finished_run_is_reused_whatever_the_runtime_settings(tmp_path, monkeypatch):
    """Device, bf16, compile and workers are not part of a run's identity: --no-compile finds the result."""
    cfg = tiny_demo(epochs=2)
    first = runs.run_one(cfg, "final", settings(tmp_path))
    monkeypatch.setattr(classification, "run_classification", lambda *a, **k: pytest.fail("trained again"))
    again = runs.run_one(cfg, "final", settings(tmp_path, bf16=True, compile=True, workers=4))
    assert again == first
    other = cfg.replace(gate_init=3.0)   # another recipe: another file, never the stored one
    assert results.run_files(tmp_path / "results", other, "final").result != results.run_files(
        tmp_path / "results", cfg, "final").result


def test_fgvc_run_from_the_release_folder_name_reports_final_and_best_val(tmp_path, monkeypatch):
    """data/CUB_200_2011 (the folder the release unpacks to) is found for --task cub. The run's backbone file is
    looked up once and its files are its result, prompts and pack, nothing else."""
    fixtures.write_fgvc_fixture(tmp_path / "data" / "CUB_200_2011", "cub", class_ids=(0, 1, 2), per_class=(4, 2, 2))
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cfg = config.resolve("cub", "mae", arch_overrides=dict(TINY, patch_size=32), num_classes=3, epochs=2,
                         warmup_epochs=1, num_prompts=4)
    lookups, real = [], inputs.checkpoint_for
    monkeypatch.setattr(inputs, "checkpoint_for", lambda *a: lookups.append(a) or real(*a))
    result = runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
    assert set(result["final"]) >= {"test_acc", "best_val_epoch", "best_val_acc", "test_acc_at_best_val"}
    assert all("val_acc" in h for h in result["history"])
    assert list((tmp_path / "results" / "cache").glob("cub-*.pixels.npy"))  # decoded once, cached
    files = results.run_files(tmp_path / "results", cfg, "final")
    assert len(lookups) == 1 and sorted(p.name for p in files.result.parent.iterdir()) == sorted(
        p.name for p in (files.result, files.prompts, files.pack))


def test_sweep_picks_the_best_val_lr_then_runs_the_seeds(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(cfg, protocol, settings, lr_source="recipe"):
        calls.append((protocol, cfg.lr, cfg.seed, lr_source))
        return {"final": {"val_acc": {0.05: 10, 0.1: 30, 0.25: 30}.get(cfg.lr, 0) if protocol == "sweep" else 1,
                          "test_acc": 50.0}}
    monkeypatch.setattr(runs, "run_one", fake_run_one)
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.05}, {"lr": 0.1}, {"lr": 0.25}])
    cfg = config.resolve("dtd")
    (best,), _ = runs.run_cells([cfg], settings(tmp_path, runs_per_batch=1), sweep=True, seeds=2)   # run_one
    assert best.lr == 0.1   # a tie goes to the smaller lr, as VPT's tuner
    assert calls == [("sweep", 0.05, 42, "sweep grid"), ("sweep", 0.1, 42, "sweep grid"),
                     ("sweep", 0.25, 42, "sweep grid"), ("final", 0.1, 42, "sweep"), ("final", 0.1, 43, "sweep")]


def test_the_summary_shows_the_papers_number_only_for_the_papers_recipe(capsys):
    def run(**kw):
        cfg = config.resolve("cub", "mocov3", **kw)
        return results.new_result(cfg, "final", "recipe", runtime.Settings(), {"final": {"test_acc": 80.0}}, "x")
    reproduce.print_summary(config.resolve("cub", "mocov3"), [run()])
    assert "(paper: 82.86)" in capsys.readouterr().out
    reproduce.print_summary(config.resolve("cub", "mocov3", epochs=1), [run(epochs=1)])
    out = capsys.readouterr().out
    assert "paper:" not in out and "not the paper's recipe: epochs=1" in out


# --- ADE20K through the same path ----------------------------------------------------------------

def test_ade20k_cell_trains_the_configured_model_and_writes_one_result(tmp_path, capsys, monkeypatch):
    """--insert-at reaches the segmenter (the model trained is the one the result's -k2 name says); one JSON, no
    state left."""
    fixtures.write_ade_fixture(tmp_path / "data", n_train=4, n_val=1, size=(64, 80))
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth", patch_size=16)   # 14x14 grid, resized to 4x4
    cfg = config.resolve("ade20k", "mae", iters=3, insert_at=2, arch_overrides=dict(TINY, patch_size=16),
                          img_size=64, batch_size=2, aux_blocks=[1, 2], head_channels=16)
    seen = []
    real = config.model_from_config
    monkeypatch.setattr(config, "model_from_config", lambda cfg, *a, **k: seen.append(real(cfg, *a, **k)) or seen[-1])
    result = runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
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
    cfg = config.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1, warmup_epochs=0)
    with pytest.raises(datasets.DataError) as err:
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))
    assert str(tmp_path / "data" / "vtab-1k" / "dtd") in str(err.value) and "train800val200,test}.txt" in str(err.value)
    assert "not downloaded automatically" in str(err.value) and "http" in str(err.value)


def test_missing_checkpoint_names_the_path_url_and_command(tmp_path, cli):
    out = cli("--task", "dtd", "--ssl", "mocov3", "--results-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2
    assert "linear-vit-b-300ep.pth.tar" in out.stderr and "https://dl.fbaipublicfiles.com/moco-v3" in out.stderr
    assert "python reproduce.py download --ssl mocov3 --arch vit_base" in out.stderr


def test_corrupt_image_is_named(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    bad = next((tmp_path / "data" / "vtab-1k" / "dtd" / "images" / "train800").glob("*.jpg"))
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "tiny.pth")   # a backbone that fits the small config below
    cfg = config.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1, warmup_epochs=0)
    with pytest.raises(datasets.DataError, match=bad.name):
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))


def test_vtab_label_out_of_range_is_an_error(tmp_path):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "eurosat")
    listing = tmp_path / "data" / "vtab-1k" / "eurosat" / "train800val200.txt"
    lines = listing.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 10"  # eurosat has 10 classes: 0..9
    listing.write_text("\n".join(lines) + "\n")
    cfg = config.resolve("eurosat", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1, warmup_epochs=0)
    with pytest.raises(datasets.DataError, match=r"train800val200\.txt:1: label 10 out of range"):
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(write_tiny_mae_checkpoint(tmp_path / "t.pth"))))


def test_fgvc_class_id_out_of_range_exits_2_before_decoding(tmp_path):
    root = fixtures.write_fgvc_fixture(tmp_path / "data" / "cub", "cub", class_ids=(0, 1, 2))
    anno = json.loads((root / "train.json").read_text())
    key = next(iter(anno))
    anno[key] = 999
    (root / "train.json").write_text(json.dumps(anno))
    cfg = config.resolve("cub", "mae", arch_overrides=dict(TINY, patch_size=32), num_classes=3, epochs=1, warmup_epochs=0)
    with pytest.raises(datasets.DataError) as err:
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(write_tiny_mae_checkpoint(tmp_path / "t.pth"))))
    assert "train.json" in str(err.value) and key in str(err.value) and "999" in str(err.value)
    assert not list((tmp_path / "results").rglob("*.npy"))   # nothing was decoded


def test_wrong_checkpoint_for_the_architecture_exits_2_before_decoding(tmp_path, cli):
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "tiny.pth")  # a 32-wide file for the 768-wide ViT-B
    out = cli("--task", "dtd", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(ckpt),
              "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "tiny.pth" in out.stderr and "wrong shapes" in out.stderr
    assert "decoding" not in out.stderr and not list(tmp_path.rglob("*.npy"))


def test_a_text_file_given_as_checkpoint_is_named_as_such(tmp_path, cli):
    (tmp_path / "ckpt.pth").write_text("not weights\n")
    out = cli("--task", "dtd", "--checkpoint", str(tmp_path / "ckpt.pth"), "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "ckpt.pth is not a checkpoint file: it is text" in out.stderr


def test_a_folder_given_as_checkpoint_is_one_line_naming_what_it_holds(tmp_path, cli):
    """A folder (not a Hugging Face model folder) was a 22-line IsADirectoryError traceback."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "notes.txt").write_text("x")
    out = cli("--task", "dtd", "--checkpoint", str(tmp_path / "weights"), "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "is a folder" in out.stderr and "notes.txt" in out.stderr


def test_prepare_finds_the_release_folder_and_names_real_flags(tmp_path, cli):
    pytest.importorskip("scipy")
    fixtures.write_release_fixture(tmp_path / "data" / "CUB_200_2011", "cub")
    out = cli("prepare", "--dataset", "cub", "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "CUB_200_2011" / "train.json").is_file()
    again = cli("prepare", "--dataset", "cub", "--data-dir", str(tmp_path / "data"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_help_explains_the_tasks_methods_and_subcommands(cli):
    out = cli("--help")
    assert out.returncode == 0
    for word in ("--task", "--sweep", "--seeds", "--resume", "gated+temp", "prepare", "download", "--table",
                 "--all", "demo", "--download", "--recipe"):
        assert word in out.stdout


# --- --table N --run: which cells, with which settings (expectations typed in from the paper) ---------------

TABLE_CELL_COUNTS = {"1": 2 * 3 * 5, "2": 2 * 3 * 19, "3": 2 * 3, "4": 3 * 2, "6": 2 * 3, "7": 3 * 2 * 5,
                     "8": 2 * 3 * 2}   # backbones x rows x columns


@pytest.mark.parametrize("number", ["1", "2", "3", "4", "6", "7", "8"])
def test_table_run_queues_every_cell_of_the_table(number, monkeypatch, tmp_path):
    queued = []
    monkeypatch.setattr(runs, "run_cells", lambda cfgs, settings, *args: queued.extend(cfgs))
    runs.run_table(reproduce.planned_configs(reproduce.parse_args(["--table", number, "--run"])), settings(tmp_path),
                   number)
    assert len(queued) == TABLE_CELL_COUNTS[number]
    assert len({results.run_name(c, "final") for c in queued}) == len(queued)


def test_table_4_cells_carry_table_5_and_100_prompts():
    """Table 4: MAE, 100 prompts, CUB and Flowers; batch 64 and Table 5's lr / gate init (CUB 0.1 / 5,
    Flowers 0.1 / 15), 100 epochs with 10 warm-up."""
    cfgs = reproduce.planned_configs(reproduce.parse_args(["--table", "4", "--run"]))
    got = [(c.task, c.method, c.ssl, c.num_prompts, c.batch_size, c.lr, c.gate_init,
            c.epochs, c.warmup_epochs) for c in cfgs]
    assert sorted(got) == sorted([
        ("cub", "vpt-shallow", "mae", 100, 64, 0.1, 5, 100, 10), ("flowers", "vpt-shallow", "mae", 100, 64, 0.1, 15, 100, 10),
        ("cub", "gated-hard", "mae", 100, 64, 0.1, 5, 100, 10), ("flowers", "gated-hard", "mae", 100, 64, 0.1, 15, 100, 10),
        ("cub", "gated+temp", "mae", 100, 64, 0.1, 5, 100, 10), ("flowers", "gated+temp", "mae", 100, 64, 0.1, 15, 100, 10)])


def test_table_run_applies_the_command_lines_overrides_to_every_cell(monkeypatch, tmp_path):
    """`--table 4 --run --epochs 1 --lr 0.5` runs every cell at 1 epoch and lr 0.5 (not Table 5's 100 epochs and
    lr), with the lr recorded as the command line's."""
    seen = []
    monkeypatch.setattr(runs, "run_one", lambda cfg, protocol, settings, source: seen.append(
        (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.num_prompts, source)))
    monkeypatch.setattr(results, "print_table", lambda *a, **k: None)
    monkeypatch.setattr(runs, "input_rows", lambda *a: [])   # the inputs table: tests/test_cluster.py
    reproduce.main(["--table", "4", "--run", "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.5",
                    "--results-dir", str(tmp_path / "r")])
    assert seen == [(1, 0, 0.5, 100, "command line")] * 6


def test_table_print_config_is_a_dry_run_of_every_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = reproduce.cli_main(["--table", "4", "--run", "--print-config", "--epochs", "2", "--warmup-epochs", "1",
                               "--results-dir", str(tmp_path / "r")])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 6 and {p["epochs"] for p in printed} == {2} and {p["task"] for p in printed} == {"cub", "flowers"}
    assert list(tmp_path.iterdir()) == []


# --- every flag applies or is refused, in every mode ----------------------------------------------

# flag -> (value, the config key it sets, the value expected there); typed in, not derived
CONFIG_FLAGS = {"--lr": ("0.3", "lr", 0.3), "--num-prompts": ("7", "num_prompts", 7),
                "--gate-init": ("3", "gate_init", 3.0), "--batch-size": ("16", "batch_size", 16),
                "--epochs": ("20", "epochs", 20), "--warmup-epochs": ("2", "warmup_epochs", 2),
                "--insert-at": ("4", "insert_at", 4), "--seed": ("7", "seed", 7),
                "--prompt-dropout": ("0.2", "prompt_dropout", 0.2), "--weight-decay": ("0.01", "weight_decay", 0.01),
                "--iters": ("9", "iters", 9), "--arch": ("vit_small", "arch", "vit_small"),
                "--recipe": ("paper", "recipe", "paper"), "--method": ("gated", "method", "gated"),
                "--ssl": ("mocov3", "ssl", "mocov3")}
# flags that change how a run goes, not its config: flag -> (argv, Settings field or args field, expected value)
RUN_FLAGS = {"--seeds": (["--seeds", "3"], "seeds", 3), "--sweep": (["--sweep"], "sweep", True),
             "--resume": (["--resume"], "resume", True), "--checkpoint": (["--checkpoint", "x.pth"], "checkpoint", "x.pth"),
             "--workers": (["--workers", "2"], "workers", 2), "--data-dir": (["--data-dir", "d"], "data_dir", "d"),
             "--cache-dir": (["--cache-dir", "c"], "cache_dir", "c"), "--download": (["--download"], "download", True),
             "--mirror": (["--mirror", "http://m"], "mirror", "http://m"), "--device": (["--device", "cpu"], "device", torch.device("cpu")),
             "--fp32": (["--fp32"], "bf16", False), "--no-compile": (["--no-compile"], "compile", False),
             "--results-dir": (["--results-dir", "rr"], "results_dir", "rr"), "--all": (["--all"], "all", True)}
MODES = {"one cell": ["--task", "flowers"], "--table 4 --run": ["--table", "4", "--run"], "demo": ["--demo"]}
# what each mode refuses (exit 2 naming the flag), hand-written from the README's "Flags must apply"
REFUSED = {"one cell": {"--iters", "--all"},
           "--table 4 --run": {"--method", "--ssl", "--iters"},
           "demo": {"--num-prompts", "--gate-init", "--batch-size", "--insert-at", "--prompt-dropout", "--weight-decay",
                    "--iters", "--arch", "--recipe", "--ssl", "--seeds", "--sweep", "--resume", "--checkpoint",
                    "--workers", "--data-dir", "--cache-dir", "--download", "--mirror", "--all"}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("flag", list(CONFIG_FLAGS) + list(RUN_FLAGS))
def test_each_flag_applies_or_is_refused_by_name(flag, mode):
    argv = MODES[mode] + (["--" + "epochs", "20"] if flag == "--warmup-epochs" else []) + (
        ["--" + "method", "vpt-deep"] if flag == "--recipe" and mode != "--table 4 --run" else []) + (
        ["--sweep"] if flag == "--recipe" and mode == "one cell" else [])
    argv += [flag, CONFIG_FLAGS[flag][0]] if flag in CONFIG_FLAGS else RUN_FLAGS[flag][0]
    if flag in REFUSED[mode]:
        with pytest.raises(runtime.UserError, match=f"{flag} does not apply"):
            args = reproduce.parse_args(argv)
            reproduce.check_flags(args)
            reproduce.planned_configs(args)
        return
    args = reproduce.parse_args(argv)
    reproduce.check_flags(args)
    cfgs = reproduce.planned_configs(args)
    assert cfgs
    if flag in CONFIG_FLAGS:
        _, key, want = CONFIG_FLAGS[flag]
        assert all(getattr(c, key) == want for c in cfgs), [getattr(c, key) for c in cfgs]
    else:
        _, field, want = RUN_FLAGS[flag]
        where = reproduce.settings_from(args) if hasattr(runtime.Settings(), field) else args
        assert getattr(where, field) == want


def test_a_refused_demo_command_keeps_the_previous_demo_results(tmp_path, capsys):
    demo = tmp_path / "results" / "demo"
    demo.mkdir(parents=True)
    (demo / "kept.json").write_text("{}")
    assert reproduce.cli_main(["--demo", "--ssl", "mocov3", "--results-dir", str(tmp_path / "results")]) == 2
    assert "--ssl does not apply to the demo" in capsys.readouterr().err
    assert (demo / "kept.json").is_file()


# --- bad values stop before any work ---------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0 is not usable"),
    (["--num-prompts", "0"], "--num-prompts 0 is not usable"),
    (["--insert-at", "13"], "--insert-at 13 is not usable: it must be a block in 1..12"),
    (["--prompt-dropout", "2"], "--prompt-dropout 2.0 is not usable"),
    (["--seeds", "0"], "--seeds 0 is not usable"),
    (["--epochs", "-1"], "--epochs -1 is not usable"),
    (["--epochs", "5"], "--epochs 5 is at or below the warm-up (10 epochs)"),
    (["--workers", "0"], "--workers 0 is not usable"),
    (["--device", "gpu"], "--device gpu is not a device"),
    (["--lr", "0"], "--lr 0.0 is not usable"),
] + ([(["--device", "cuda"], "no CUDA GPU is visible")] if not torch.cuda.is_available() else []))
def test_bad_values_exit_2_with_one_line_before_loading_anything(argv, message, tmp_path, monkeypatch, capsys):
    """Nothing may be looked up, loaded or decoded before the message."""
    def too_late(*a, **k):
        pytest.fail("reached the checkpoint or the data before refusing")
    monkeypatch.setattr(inputs, "checkpoint_for", too_late)
    monkeypatch.setattr(datasets, "load_splits", too_late)
    code = reproduce.cli_main(["--task", "cub", *argv, "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_the_command_line_exits_2_on_a_bad_device(tmp_path, cli):
    out = cli("--task", "cub", "--device", "gpu", "--results-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "error: --device gpu is not a device: use cuda, cuda:N or cpu"


# --- a run's identity: the backbone file ------------------------------------------------------------

def tiny_cell(ssl="mae", **kw):
    return config.resolve("dtd", ssl, **dict(dict(arch_overrides=dict(TINY, patch_size=32), epochs=2,
                                                      warmup_epochs=1, num_prompts=4), **kw))


def store_finished(tmp_path, cfg, ckpt):
    """A finished result of cfg trained on ckpt, as run_one writes it."""
    s = settings(tmp_path, checkpoint=str(ckpt))
    backbone = results.backbone_identity(ckpt, tmp_path / "results" / "cache")
    files = results.run_files(s.results_dir, cfg, "final")
    results.write_run(files, results.new_result(cfg, "final", "recipe", s, {"final": {"test_acc": 50.0}}, "x",
                                                   backbone))
    return files


def test_a_result_records_the_backbones_sha256_and_format_and_is_reused_only_for_that_file(tmp_path, monkeypatch):
    import hashlib
    ckpt = write_tiny_mae_checkpoint(tmp_path / "a.pth")
    cfg = tiny_cell()
    files = store_finished(tmp_path, cfg, ckpt)
    stored = json.loads(files.result.read_text())
    assert stored["backbone"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert stored["backbone"]["format"] == "timm / MAE" and stored["backbone"]["ssl"] == "mae"
    monkeypatch.setattr(classification, "run_classification", lambda *a, **k: pytest.fail("trained again"))
    assert runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(ckpt)))["final"]["test_acc"] == 50.0
    other = tmp_path / "b.pth"
    torch.save({"model": {k: v + 1 for k, v in torch.load(ckpt)["model"].items()}}, other)
    with pytest.raises(runtime.UserError, match="was trained on .*a.pth.*this run's backbone is .*b.pth"):
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(other)))
    with pytest.raises(gp.CheckpointError, match="checkpoint not found"):
        runs.run_one(cfg, "final", settings(tmp_path, checkpoint=str(tmp_path / "does-not-exist.pth")))


def test_the_backbone_hash_is_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os
    ckpt = write_tiny_mae_checkpoint(tmp_path / "a.pth")
    first = results.backbone_identity(ckpt, tmp_path / "cache")
    assert (tmp_path / "cache" / "backbones.json").is_file()
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("hashed again"))
    assert results.backbone_identity(ckpt, tmp_path / "cache") == first
    monkeypatch.undo()
    os.utime(ckpt, ns=(1, 1))    # a replaced file (new mtime) is hashed again
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert results.backbone_identity(ckpt, tmp_path / "cache")["sha256"] == first["sha256"] and calls


def test_a_file_whose_layout_contradicts_ssl_exits_2_naming_both(tmp_path, monkeypatch, capsys):
    mae = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    monkeypatch.setattr(classification, "run_classification", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(runtime.UserError, match=r"mae.pth is a MAE checkpoint.*--ssl mocov3"):
        runs.run_one(tiny_cell(ssl="mocov3"), "final", settings(tmp_path, checkpoint=str(mae)))
    moco = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in torch.load(mae)["model"].items()}, "epoch": 300}, moco)
    with pytest.raises(runtime.UserError, match=r"moco.pth.tar is a MoCo v3 checkpoint.*--ssl mae"):
        runs.run_one(tiny_cell(), "final", settings(tmp_path, checkpoint=str(moco)))


def test_a_non_finite_weight_in_the_backbone_is_refused_at_load(tmp_path):
    ckpt = write_tiny_mae_checkpoint(tmp_path / "nan.pth")
    sd = torch.load(ckpt)
    sd["model"]["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(sd, ckpt)
    with pytest.raises(runtime.UserError, match=r"nan.pth: 1 backbone tensor\(s\) hold NaN or inf"):
        runs.run_one(tiny_cell(), "final", settings(tmp_path, checkpoint=str(ckpt)))


def test_table_run_with_one_checkpoint_for_both_backbones_is_refused(tmp_path, capsys):
    code = reproduce.cli_main(["--table", "1", "--run", "--checkpoint", str(tmp_path / "x.pth"),
                               "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Table 1 needs 2 (mae vit_base, mocov3 vit_base)" in err and not (tmp_path / "r").exists()


# --- the harness's own files, read defensively ----------------------------------------------------

def test_a_truncated_or_edited_result_file_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    cfg = tiny_demo(epochs=2)
    files = results.run_files(tmp_path / "results", cfg, "final")
    files.result.parent.mkdir(parents=True)
    files.result.write_text('{"config": {"task": "demo", "ssl"')
    with pytest.raises(results.BadResultFile, match=re.escape(files.result.name) + " is not a readable result file.*delete it"):
        runs.run_one(cfg, "final", settings(tmp_path))
    result = results.new_result(cfg, "final", "recipe", runtime.Settings(), {"final": {"test_acc": "high"}}, "x")
    files.result.write_text(json.dumps(result))
    with pytest.raises(results.BadResultFile, match="final test_acc is 'high', not a number"):
        runs.run_one(cfg, "final", settings(tmp_path))


def test_a_truncated_training_state_exits_2_naming_it(tmp_path):
    model = gp.build_model("vit_base", "mae", "gated+temp", num_classes=3, vit_overrides=TINY, img_size=32,
                           num_prompts=2)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    state = tmp_path / "run.state.pt"
    runtime.save_training_state(state, runtime.training_state(model, opt, sched, 0), [], {}, 0.0)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(runtime.UserError, match=r"run.state.pt is not a readable training state.*delete it"):
        runtime.load_training_state(state, model, opt, sched)


def test_the_table_lists_unreadable_and_implausible_files_under_it(tmp_path, capsys):
    good = results.new_result(config.resolve("cub", "mae"), "final", "recipe", runtime.Settings(),
                              {"final": {"test_acc": 70.0}}, "x")
    results.write_run(results.run_files(tmp_path, config.resolve("cub", "mae"), "final"), good)
    edited = config.resolve("flowers", "mae")
    results.write_run(results.run_files(tmp_path, edited, "final"),
                      dict(good, config=edited.identity(), final={"test_acc": 1e9}))
    (tmp_path / "cars" / "mae").mkdir(parents=True)
    (tmp_path / "cars" / "mae" / "cut.json").write_text('{"config": ')
    results.print_table("1", tmp_path)
    out = capsys.readouterr().out
    assert "1000000000.00" not in out and "70.00" in out
    assert "NOT SHOWN - 2 file(s)" in out and "cut.json: unreadable" in out
    assert "flowers" in out.split("NOT SHOWN")[1] and "not a percentage in [0, 100]" in out


# --- nothing half-written, nothing left behind ------------------------------------------------------

def test_prompts_are_written_atomically_and_before_the_result(tmp_path, monkeypatch):
    cfg = tiny_demo(epochs=2)
    files = results.run_files(tmp_path, cfg, "final")
    real_save = torch.save

    def killed_midway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        results.write_run(files, {"final": {}}, {"prompts": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", real_save)
    assert list(files.result.parent.iterdir()) == []   # no half file, no result without its prompts


def test_the_pack_is_written_before_the_result(tmp_path, monkeypatch):
    """results.write_run writes a run's every output: a kill while the pack is written leaves the prompts and no
    result (the cell runs again), never a result without its pack."""
    cfg = tiny_demo()
    files = results.run_files(tmp_path, cfg, "final")
    model = config.model_from_config(cfg, cfg.head_size(), verbose=False)

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gp.VisionTransformer, "save_pack", killed)
    with pytest.raises(KeyboardInterrupt):
        results.write_run(files, {"final": {}}, model.prompt_state_dict(), (model, {}))
    assert files.prompts.is_file() and not files.result.exists()


def test_files_respect_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        runtime.UMASK = 0o022
        runtime.write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
        runtime.UMASK = old
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_a_run_removes_temporaries_of_killed_runs_and_checks_the_folder_first(tmp_path, capsys, monkeypatch):
    """Before the first run of a command (here the demo, its training stubbed: the cleanup comes before it)."""
    import os
    import socket
    monkeypatch.setattr(classification, "run_classification", lambda *a: (
        {"final": {"test_acc": 50.0}, "history": [{"images_per_second": 1.0, "seconds": 1.0}], "selection_ratio": None}, None))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    left = tmp_path / "r" / "cub" / "mae" / f".tmp-{proc.pid}@{socket.gethostname()}-abc123"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a result")
    live = left.with_name(f".tmp-{os.getpid()}@{socket.gethostname()}-abc123")
    live.write_bytes(b"being written")
    assert reproduce.cli_main(["--demo", "--method", "linear", "--epochs", "2", "--results-dir",
                               str(tmp_path / "r")]) == 0
    assert not left.exists() and live.exists()
    if os.geteuid() != 0:   # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert reproduce.cli_main(["--task", "cub", "--results-dir", str(tmp_path / "ro")]) == 2
        assert "cannot write to" in capsys.readouterr().err


def test_cpu_evaluation_is_not_padded_to_the_compiled_batch():
    cfg = tiny_demo()
    images, labels = datasets.make_synthetic_images(3, 2, 40, seed=0)
    split = datasets.ImageSplit.from_dense("demo", "test", images, labels)
    _, eager = classification.make_loaders(cfg, split, {"test": split}, torch.device("cpu"), compile=False)
    _, compiled = classification.make_loaders(cfg, split, {"test": split}, torch.device("cpu"), compile=True)
    assert [len(x) for x, _ in eager["test"]] == [6]
    assert [len(x) for x, _ in compiled["test"]] == [256]


# --- two processes, one cell -----------------------------------------------------------------------

def queue_worker(go, results_dir):
    """One machine of a SLURM array running --table N --run (see process_of): it says it is ready (creates
    go.ready-PID), waits for the file `go`, then runs the queue of four tiny cells."""
    jobs = [(config.resolve("demo", arch_overrides=TINY, num_classes=3, epochs=1, warmup_epochs=0, seed=s), "final",
             "recipe") for s in range(4)]
    Path(f"{go}.ready-{os.getpid()}").touch()
    while not os.path.exists(go):
        time.sleep(0.01)
    runs.run_queue(jobs, runtime.Settings(results_dir=results_dir, quiet=True))


def test_two_processes_on_one_results_folder_train_each_cell_once(tmp_path):
    """Two real processes (as two machines of a SLURM array running --table N --run) take the same queue of four
    cells at the same moment: each cell is trained by exactly one of them, and every result is complete."""
    go, logs = tmp_path / "go", [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [process_of(queue_worker, str(go), str(tmp_path / "results"), out=log) for log in logs]
    outs, _ = start_together(procs, go, logs)
    assert all(p.exitcode == 0 for p in procs), outs
    wrote = [line for out in outs for line in out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 4 and len(set(wrote)) == 4, outs        # each cell trained once
    # both took part, or one claimed every cell for its batch and the other found them held or finished
    assert all(o.count("wrote ") > 0 for o in outs) or any(
        msg in "".join(outs) for msg in ("is training this cell; skipping it", "exists; reusing it"))
    finished = list((tmp_path / "results").rglob("*.json"))
    assert len(finished) == 4 and not list((tmp_path / "results").rglob("*.claim"))
    for path in finished:
        assert json.loads(path.read_text())["final"]["test_acc"] >= 0
        assert path.with_name(path.name[:-5] + ".prompts.pt").is_file()


def test_a_dead_processes_claim_is_taken_over_and_another_hosts_is_respected(tmp_path):
    files = results.run_files(tmp_path, tiny_demo(), "final")
    files.claim.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    import socket
    files.claim.write_text(json.dumps({"holder": "x", "pid": proc.pid, "host": socket.gethostname(), "started": "t"}))
    assert results.claim_cell(files) is None                      # dead holder on this host: taken over
    assert json.loads(files.claim.read_text())["pid"] == __import__("os").getpid()
    results.release_cell(files)
    assert not files.claim.exists()
    files.claim.write_text(json.dumps({"holder": "u@node7", "pid": 1, "host": "node7", "started": "t"}))
    assert results.claim_cell(files)["holder"] == "u@node7"        # another host's claim: respected


# --- messages that tell the truth; sweeps survive a diverging lr ------------------------------------

def fake_training(tmp_path, monkeypatch, raise_what, save_state=True):
    """run_classification that saves an epoch's state (as train() does) and then raises."""
    def run(cfg, protocol, settings, state_path, checkpoint=None):
        if save_state:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_bytes(b"state of epoch 2")
        raise raise_what
    monkeypatch.setattr(classification, "run_classification", run)


def test_after_a_nan_the_advice_says_what_resume_and_a_lower_lr_really_do(tmp_path, monkeypatch, capsys):
    fake_training(tmp_path, monkeypatch, runtime.NonFiniteLoss(float("nan"), "epoch 3", True))
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cell = ["--task", "dtd", "--checkpoint", str(ckpt), "--results-dir", str(tmp_path / "r")]
    code = reproduce.cli_main(cell)
    err = capsys.readouterr().err
    assert code == 3 and "loss became nan at epoch 3" in err
    assert "-lr0.25-s42-final.state.pt" in err   # the kept state, named (dtd / MAE: Table 5 lr 0.25)
    assert "same settings" in err and "a lower --lr is another run" in err and "starts from scratch" in err
    assert "lower --lr and pass --resume" not in err
    assert reproduce.cli_main(["--demo", "--method", "gated+temp", "--results-dir", str(tmp_path / "d")]) == 3
    assert "The demo always starts afresh" in capsys.readouterr().err   # the demo refuses --resume


def test_ctrl_c_prints_one_line_naming_the_state_and_the_resume_command(tmp_path, monkeypatch, capsys):
    fake_training(tmp_path, monkeypatch, KeyboardInterrupt())
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    cell = ["--task", "dtd", "--checkpoint", str(ckpt), "--results-dir", str(tmp_path / "r")]
    code = reproduce.cli_main(cell)
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "-lr0.25-s42-final.state.pt" in err and err.endswith("python reproduce.py " + " ".join(cell) + " --resume")
    assert list((tmp_path / "r").rglob("*.claim")) == []   # the claim goes with the process
    assert reproduce.cli_main(["--demo", "--method", "gated+temp", "--results-dir", str(tmp_path / "d")]) == 130
    assert "the demo always starts afresh" in capsys.readouterr().err


def test_a_diverging_sweep_point_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    trained = []

    def run(cfg, protocol, settings, state_path, checkpoint=None):
        trained.append((protocol, cfg.lr))
        if cfg.lr == 5.0:
            raise runtime.NonFiniteLoss(float("nan"), "epoch 2", True)
        return {"final": {"val200_acc" if protocol == "sweep" else "test_acc": 10 * cfg.lr}, "history": []}, None
    monkeypatch.setattr(classification, "run_classification", run)
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.5}, {"lr": 1.0}, {"lr": 5.0}])
    alone = settings(tmp_path, checkpoint=str(ckpt), runs_per_batch=1)   # through run_classification, faked
    (best,), _ = runs.run_cells([tiny_cell()], alone, sweep=True)
    out = capsys.readouterr().out
    assert best.lr == 1.0 and "lr 5: failed (diverged)" in out and "-> lr 1" in out
    failed = results.run_files(tmp_path / "results", tiny_cell().replace(lr=5.0), "sweep").result
    assert "nan at epoch 2" in json.loads(failed.read_text())["failed"]
    runs.run_cells([tiny_cell()], alone, sweep=True)
    assert trained.count(("sweep", 5.0)) == 1   # the failure is remembered, not retried


class WritesAMarker:
    """Unpickling this runs code: it creates the file `path` (what a hostile checkpoint could do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_pickles_code_is_refused_naming_trust_pickle_and_runs_only_with_it(tmp_path, monkeypatch, cli):
    ckpt = write_tiny_mae_checkpoint(tmp_path / "odd.pth")
    sd = torch.load(ckpt)
    marker = tmp_path / "payload-ran"
    sd["extra"] = WritesAMarker(str(marker))
    torch.save(sd, ckpt)
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    argv = ["--task", "dtd", "--data-dir", str(tmp_path / "data"), "--checkpoint", str(ckpt), "--epochs", "11",
            "--results-dir", str(tmp_path / "r")]
    out = cli(*argv)
    assert out.returncode == 2 and "odd.pth" in out.stderr and "--trust-pickle" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not marker.exists()
    # with the opt-in the file is unpickled (the payload runs) and the run goes on to the backbone's shape check
    out = cli(*argv, "--trust-pickle")
    assert marker.exists() and out.returncode == 2 and "wrong shapes" in out.stderr, out.stderr


def test_a_dry_run_of_a_table_says_what_sweep_and_seeds_add(capsys):
    assert reproduce.cli_main(["--table", "4", "--run", "--print-config", "--seeds", "2", "--sweep"]) == 0
    out = capsys.readouterr()
    cells = json.loads(out.out)
    plan = [line for line in out.err.splitlines() if line.startswith("plan: ")]
    # Table 4: 6 cells; each gets a sweep line (the paper's grid: 7 lrs) and a seeds line (42, 43)
    assert len(cells) == 6 and len(plan) == 12
    assert sum("--sweep first runs 7 grid point(s)" in line for line in plan) == 6
    assert sum(line.endswith("final run(s) at seed(s) 42, 43") for line in plan) == 6


def test_several_refused_flags_are_named_in_one_sentence(capsys):
    code = reproduce.cli_main(["--table", "1", "--seeds", "0", "--data-dir", "x"])
    assert code == 2 and "--data-dir, --seeds do not apply to printing a table" in capsys.readouterr().err


def test_no_batching_trains_every_run_alone_as_the_official_code():
    """--no-batching reaches the runs as one run per batch; without it the queue batches (None: as many as fit)."""
    import reproduce
    args = reproduce.parse_args(["--task", "dtd", "--device", "cpu", "--no-batching"])
    assert reproduce.settings_from(args).runs_per_batch == 1
    assert reproduce.settings_from(reproduce.parse_args(["--task", "dtd", "--device", "cpu"])).runs_per_batch is None


def test_the_demos_img_per_s_is_every_epochs_images_over_their_seconds(capsys):
    """Epochs of 100 img/s for 1 s and 300 img/s for 3 s: 1,000 images in 4 s = 250 img/s (not the last epoch's
    300, which one slow or fast epoch would decide)."""
    cfg = tiny_demo()
    history = [{"images_per_second": 100.0, "seconds": 1.0}, {"images_per_second": 300.0, "seconds": 3.0}]
    reproduce.print_demo([cfg], [{"final": {"test_acc": 50.0}, "history": history, "selection_ratio": None}], "r")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(cfg.method))
    assert row.split() == [cfg.method, "50.00", "250"]


def test_a_mistyped_subcommand_is_named_with_the_closest_one(cli):
    out = cli("predit", "photos/")
    assert out.returncode == 2 and out.stderr.startswith("error: unknown command 'predit': did you mean 'predict'?")
    assert len(out.stderr.strip().splitlines()) == 1
    assert cli("cub").stderr.startswith("error: unknown command 'cub' (commands: prepare, figure, download, predict")
