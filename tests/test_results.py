"""Result files and tables: a table cell shows only runs of the paper's exact recipe, next to the paper's number."""
import os
import time
from pathlib import Path

import pytest

from harness.data import datasets
from harness import config
from harness import results
from harness import runtime


def store(results_dir, task, ssl, method, acc, seed=42, lr_source="recipe", version=None, metric="test_acc",
          **overrides):
    """A finished run in the harness's result-file format, under the name the harness gives it."""
    cfg = config.resolve(task, ssl, method, **overrides).replace(seed=seed)
    files = results.run_files(results_dir, cfg, "final")
    result = results.new_result(cfg, "final", lr_source, runtime.Settings(), {"final": {metric: acc}}, "test")
    if version is not None:
        result["recipe_version"] = version
    results.write_run(files, result)
    return files.result


def row_of(out, label):
    return next(line for line in out.splitlines() if line.startswith(label))


# --- file names -----------------------------------------------------------------------------------

def test_a_run_of_the_recipe_has_the_plain_name_and_departures_are_named():
    cfg = config.resolve("cub", "mae")
    assert results.run_name(cfg, "final") == "cub/mae/vit_base-gated+temp-p100-k1-lr0.1-s42-final"
    short = config.resolve("cub", "mae", epochs=1, warmup_epochs=0)
    assert results.run_name(short, "final") == "cub/mae/vit_base-gated+temp-p100-k1-lr0.1-s42-final-epochs1-warmup_epochs0"
    ade = config.resolve("ade20k", "mae", iters=4, insert_at=5)
    assert results.run_name(ade, "final") == "ade20k/mae/vit_base-gated+temp-p100-k5-lr0.001-s42-final-iters4"
    vpt = config.resolve("cub", "mae", "vpt-shallow", recipe="vpt")
    assert results.run_name(vpt, "final").endswith("-final-vpt")


def test_a_shortened_run_neither_replaces_nor_blocks_the_full_run(tmp_path):
    """--epochs 1 is stored under its own name: a later full-recipe run finds no file in its way."""
    short = store(tmp_path, "cub", "mae", "gated+temp", 1.0, epochs=1)
    full_cfg = config.resolve("cub", "mae")
    full = results.run_files(tmp_path, full_cfg, "final")
    assert short != full.result and results.stored_result(full, full_cfg) is None


def test_a_stale_result_is_refused_not_reused(tmp_path):
    path = store(tmp_path, "cub", "mae", "gated+temp", 70.0, version=1)
    cfg = config.resolve("cub", "mae")
    with pytest.raises(runtime.UserError, match="recipe version 1"):
        results.stored_result(results.run_files(tmp_path, cfg, "final"), cfg)
    assert path.is_file()   # never overwritten


# --- tables ---------------------------------------------------------------------------------------

def test_table_1_prints_our_cells_beside_the_papers(tmp_path, capsys):
    store(tmp_path, "cub", "mae", "gated+temp", 70.0)
    store(tmp_path, "cub", "mae", "gated+temp", 72.0, seed=43)
    results.print_table("1", tmp_path)
    out = capsys.readouterr().out
    assert "71.00±1.41 (70.56)" in row_of(out, "gated+temp") and "- (78.55)" in row_of(out, "gated+temp")
    assert "- (42.15)" in row_of(out, "vpt-shallow")


@pytest.mark.parametrize("how", [dict(epochs=1), dict(gate_init=3.0), dict(lr=0.25), dict(version=1),
                                 dict(batch_size=32), dict(prompt_dropout=0.0)])
def test_a_run_of_other_settings_never_fills_a_paper_cell(tmp_path, capsys, how):
    store(tmp_path, "cub", "mae", "gated+temp", 0.0, lr_source="command line", **how)
    results.print_table("1", tmp_path)
    out = capsys.readouterr().out
    assert "- (70.56)" in row_of(out, "gated+temp") and "0.00" not in row_of(out, "gated+temp")
    assert "1 stored run(s) of these cells use other settings" in out and "--all" in out
    results.print_table("1", tmp_path, show_all=True)
    out = capsys.readouterr().out
    assert "NOT the paper's recipe" in out
    listed = out.split("OTHER SETTINGS")[1]
    assert "0.00" in listed
    key, value = next(iter(how.items()))
    assert ("recipe version 1" if key == "version" else f"{key}={value}") in listed


def test_the_lr_picked_by_the_sweep_counts_as_the_papers_protocol(tmp_path, capsys):
    store(tmp_path, "cub", "mae", "vpt-deep", 66.0, lr=0.5, lr_source="sweep")
    results.print_table("1", tmp_path)
    assert "66.00 (68.33)" in row_of(capsys.readouterr().out, "vpt-deep")


def test_table_2_compares_19_task_mean_and_group_means_like_with_like(tmp_path, capsys):
    """The paper's VTAB 'mean' is the plain mean of the 19 tasks (MAE ours 49.22), its groups are group means."""
    values = {t: float(i) for i, t in enumerate(datasets.VTAB_TASKS)}
    for task, acc in values.items():
        store(tmp_path, task, "mae", "gated+temp", acc)
    results.print_table("2", tmp_path)
    out = capsys.readouterr().out
    row = row_of(out, "gated+temp [19/19]")
    natural = [values[t] for t, info in datasets.VTAB_TASKS.items() if info.group == "natural"]
    structured = [values[t] for t, info in datasets.VTAB_TASKS.items() if info.group == "structured"]
    assert f"{sum(natural) / 7:.2f} (47.61)" in row and f"{sum(structured) / 8:.2f} (36.80)" in row
    assert f"{sum(values.values()) / 19:.2f} (49.22)" in row   # 9.00: not the mean of group means (8.71)
    assert "gated+temp per task: cifar 0.00, caltech101 1.00, dtd 2.00" in out
    assert "VPT's own reported numbers" in out


def test_ade20k_tables_match_the_whole_recipe_not_just_the_prompt_count(tmp_path, capsys):
    """A 4-iteration run is not Table 3's 160k-iteration cell."""
    store(tmp_path, "ade20k", "mae", "gated+temp", 18.52, metric="miou_ss", iters=4)
    results.print_table("3", tmp_path)
    out = capsys.readouterr().out
    assert "- (38.44)" in row_of(out, "gated+temp") and "18.52" not in row_of(out, "gated+temp")
    store(tmp_path, "ade20k", "mae", "gated+temp", 38.0, metric="miou_ss")
    results.print_table("3", tmp_path)
    assert "38.00 (38.44)" in row_of(capsys.readouterr().out, "gated+temp")


@pytest.mark.parametrize("number,count", [("1", 30), ("2", 114), ("3", 6), ("4", 6), ("6", 6), ("7", 30), ("8", 12)])
def test_every_table_cell_resolves_to_the_papers_setting(number, count):
    cells = results.table_cells(number)
    assert len(cells) == count and len({tuple(sorted(c.items())) for c in cells}) == count
    configs = [config.resolve(**c) for c in cells]
    assert all(not config.deviations(c) for c in configs)
    if number == "7":   # 24 / 48 / 96 tokens in all: VPT-deep spreads them over 12 blocks
        assert {(c.method, c.num_prompts) for c in configs} == {
            ("vpt-deep", 2), ("vpt-deep", 4), ("vpt-deep", 8), ("gated+temp", 24), ("gated+temp", 48),
            ("gated+temp", 96)}
    if number == "8":
        assert {(c.arch, c.ssl, c.method, c.num_prompts) for c in configs if c.task == "cub"} == {
            ("vit_large", "mae", "vpt-shallow", 48), ("vit_large", "mae", "vpt-deep", 2),
            ("vit_large", "mae", "gated+temp", 48), ("vit_small", "mocov3", "vpt-shallow", 48),
            ("vit_small", "mocov3", "vpt-deep", 4), ("vit_small", "mocov3", "gated+temp", 48)}


def test_the_summary_number_comes_only_with_the_papers_recipe(tmp_path):
    full = store(tmp_path, "cub", "mocov3", "gated+temp", 80.0)
    short = store(tmp_path, "cub", "mocov3", "gated+temp", 1.0, epochs=1)
    runs = {Path(r["path"]): r for r in results.load_runs(tmp_path)}
    assert results.paper_value(runs[full], "test_acc") == 82.86
    assert results.paper_value(runs[short], "test_acc") is None
    assert results.how_it_differs(runs[short]) == "epochs=1"


def test_newest_lr_wins_when_a_cell_was_run_at_two_learning_rates(tmp_path, capsys):
    """Re-running a cell after a sweep replaces its number instead of averaging two learning rates."""
    old = store(tmp_path, "cub", "mae", "vpt-deep", 50.0, lr=0.1)
    past = time.time() - 100
    os.utime(old, (past, past))
    store(tmp_path, "cub", "mae", "vpt-deep", 60.0, lr=0.5, lr_source="sweep")
    results.print_table("1", tmp_path)
    assert "60.00 (68.33)" in row_of(capsys.readouterr().out, "vpt-deep")
