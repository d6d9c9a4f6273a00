"""Tests of analysis.py and dip.py: the figure functions end to end, PSNR / SSIM, insertion at block k, DIP.

The run JSONs written below are FIXTURES OF THE RESULT-FILE FORMAT (made-up numbers) used to check the
plotting and tabulation code; they are not results of the method. Expected token and attention values come from
timm's VisionTransformer loaded with the same weights, PSNR / SSIM values from numpy written out by hand."""
import csv
import json
import math
import os
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_VIT
from harness.figures import analysis
from harness.figures import dip
import gated_prompt as gp
from harness import config
from harness import results
from harness.data import datasets
from harness.runtime import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_model(method="linear", seed=0, **prompt_overrides):
    torch.manual_seed(seed)
    cfg = gp.vit_config("vit_base", "mae", embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8)
    overrides = dict(num_classes=5, **prompt_overrides)
    if method != "linear":
        overrides.setdefault("num_prompts", 3)
    return gp.VisionTransformer(cfg, gp.prompt_config(method, **overrides)).eval()


def tiny_image(seed=0, size=32):
    """A smooth synthetic RGB image in [0,1] (gradients + a blob), [3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05)
    img = torch.stack([xx, yy, blob]) * 0.8 + 0.1 * torch.rand(3, size, size, generator=g)
    return img.clamp(0, 1)


def timm_reference(model):
    """timm's VisionTransformer with `model`'s backbone weights: the frozen backbone computed by other code."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    c = model.cfg
    ref = timm_vit.VisionTransformer(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                                     num_heads=c.num_heads, qkv_bias=True, num_classes=0,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    ref.load_state_dict(model.backbone_state_dict())
    return ref.eval()


@torch.no_grad()
def timm_tokens(ref, x, block):
    """CLS + patch tokens after block `block` (1-based; 0 = the embedded input) of timm's ViT."""
    x = ref._pos_embed(ref.patch_embed(x))
    for blk in ref.blocks[:block]:
        x = blk(x)
    return x


@torch.no_grad()
def timm_cls_attention(ref, x, block):
    """Block `block`'s softmax attention of CLS to each patch, head-averaged, written out from timm's weights."""
    blk, tokens = ref.blocks[block - 1], timm_tokens(ref, x, block - 1)
    B, N, D = tokens.shape
    H = blk.attn.num_heads
    q, k, _ = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)
    return attn[0, :, 0, 1:].mean(0)


def assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 2000
    with Image.open(path) as im:
        assert min(im.size) > 100


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

# -----------------------------------------------------------------------------
# FILE-FORMAT FIXTURES: fake run JSONs in the harness's layout


def write_format_fixture_run(results_dir, name, test_acc=None, selection_ratio=None, protocol="final", age=0,
                             task="cub", ssl="mae", method="vpt-shallow", recipe_version=config.RECIPE_VERSION,
                             lr_source=None, **overrides):
    """One fake run JSON in the harness's layout: the config config.resolve gives with `overrides` (e.g.
    insert_at=6, epochs=1), its deviations, and lr_source "recipe" unless an lr is given ("command line").
    `age` seconds makes the file older (lr choice by mtime)."""
    cfg = config.resolve(task, ssl, method, **overrides)
    run = {"config": cfg.identity(), "protocol": protocol, "recipe_version": recipe_version,
           "lr_source": lr_source or ("command line" if "lr" in overrides else "recipe"),
           "deviations": json.loads(json.dumps(config.deviations(cfg))), "gates": [], "selection_ratio": selection_ratio,
           "temperatures": None, "history": [{"epoch": 1}], "extra_key_the_harness_might_add": {"x": 1}}
    if test_acc is not None:
        run["final"] = {"test_acc": test_acc, "val_acc": None}
    path = os.path.join(results_dir, cfg.task, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(run, f)
    if age:
        now = os.path.getmtime(path)
        os.utime(path, (now - age, now - age))
    return path


def unrendered(monkeypatch):
    """For the tests that read only a figure's JSON / CSV: save_figure (matplotlib's layout and rendering, ~0.25 s a
    figure) becomes a stand-in that writes no PNG. The figures are still drawn; the PNGs are checked by the tests
    that assert_png them."""
    def stand_in(fig, path, *args, **kwargs):
        return path
    monkeypatch.setattr(analysis, "save_figure", stand_in)
    monkeypatch.setattr(dip, "save_figure", stand_in)


def test_load_runs_filters_and_skips_foreign_files(tmp_path):
    """The figures read run files with results.load_runs."""
    write_format_fixture_run(tmp_path, "a", 50.0, ssl="mae")
    write_format_fixture_run(tmp_path, "b", 60.0, ssl="mocov3")
    (tmp_path / "summary.json").write_text(json.dumps([1, 2, 3]))     # not a run
    (tmp_path / "broken.json").write_text("{ half written")
    assert len(results.load_runs(tmp_path)) == 2
    assert [r["config"]["ssl"] for r in results.load_runs(tmp_path, ssl="mocov3")] == ["mocov3"]
    assert len(results.load_runs(tmp_path, ssl=["mae", "mocov3"])) == 2
    write_format_fixture_run(tmp_path, "sweep", 99.0, protocol="sweep")
    assert len(results.load_runs(tmp_path)) == 2                       # lr-sweep runs are not final results
    assert len(results.load_runs(tmp_path, protocol=None)) == 3
    with pytest.raises(UserError):
        results.load_runs(tmp_path / "missing")


def test_figure_point_uses_the_newest_lr(tmp_path, monkeypatch):
    """A point re-run at another lr (both picked by the lr sweep) shows the newest file's lr only, seeds averaged."""
    unrendered(monkeypatch)
    write_format_fixture_run(tmp_path, "old-lr-s1", 10.0, lr=0.5, seed=1, age=100, lr_source="sweep")
    write_format_fixture_run(tmp_path, "old-lr-s2", 12.0, lr=0.5, seed=2, age=100, lr_source="sweep")
    write_format_fixture_run(tmp_path, "new-lr-s1", 50.0, lr=0.1, seed=1, age=10, lr_source="sweep")
    write_format_fixture_run(tmp_path, "new-lr-s2", 54.0, lr=0.1, seed=2, lr_source="sweep")
    paths = analysis.figure_insertion(tmp_path, tmp_path / "out")
    (series,) = json.loads(open(paths["json"]).read())["series"]
    assert (series["lr"], series["n"], series["mean"]) == ([0.1], [2], [52.0])
    assert len(series["runs"][0]) == 2 and all("new-lr" in path for path in series["runs"][0])


def test_figure_insertion(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    for k in (1, 6, 12):
        write_format_fixture_run(results, f"mae-k{k}-s1", 40.0 + k, insert_at=k, seed=1)
        write_format_fixture_run(results, f"mae-k{k}-s2", 42.0 + k, insert_at=k, seed=2)
        write_format_fixture_run(results, f"moco-k{k}", 70.0 - k, insert_at=k, ssl="mocov3")
        write_format_fixture_run(results, f"kitti-k{k}", 30.0 + 2 * k, insert_at=k, task="kitti")
    write_format_fixture_run(results, "unfinished", None, insert_at=3)                  # no "final": skipped
    write_format_fixture_run(results, "sweep", 0.0, insert_at=6, protocol="sweep")       # not a final run
    write_format_fixture_run(results, "other-method", 99.0, insert_at=3, method="gated")  # filtered out
    paths = analysis.figure_insertion(results, out)
    assert_png(paths["png"])
    rows = read_csv(paths["csv"])
    assert len(rows) == 9
    mae_cub = {int(r["insert_at"]): r for r in rows if (r["task"], r["ssl"]) == ("cub", "mae")}
    assert sorted(mae_cub) == [1, 6, 12]
    assert float(mae_cub[6]["test_acc_mean"]) == pytest.approx(47.0)          # mean of 46 and 48
    assert float(mae_cub[6]["test_acc_std"]) == pytest.approx(math.sqrt(2), abs=1e-4)   # sample std (CSV: 4 decimals)
    assert mae_cub[6]["n_runs"] == "2"
    data = json.loads(open(paths["json"]).read())
    kitti = next(s for s in data["series"] if s["task"] == "kitti")
    assert kitti["insert_at"] == [1, 6, 12] and kitti["mean"] == [32.0, 42.0, 54.0]
    with pytest.raises(UserError):
        analysis.figure_insertion(results, out, task="nonexistent")
    # the same through the command line (python reproduce.py figure 1 ...)
    assert analysis.main(["1", "--results-dir", str(results), "--out-dir", str(tmp_path / "cli"),
                          "--filter", "ssl=mae", "--filter", "lr=0.1"]) == 0
    cli_rows = read_csv(tmp_path / "cli" / "figure1_insertion.csv")
    assert {r["ssl"] for r in cli_rows} == {"mae"} and len(cli_rows) == 6


def test_figure_selection_ratio(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    r1 = [0.0] * 9 + [0.2, 0.8]
    r2 = [0.0] * 9 + [0.4, 0.6]
    cars = [0.3] + [0.0] * 9 + [0.7]
    write_format_fixture_run(results, "nab-1", 80.0, selection_ratio=r1, task="nabirds", method="gated+temp", seed=1)
    write_format_fixture_run(results, "nab-2", 80.0, selection_ratio=r2, task="nabirds", method="gated+temp", seed=2)
    write_format_fixture_run(results, "cars", 70.0, selection_ratio=cars, task="cars", method="gated+temp")
    write_format_fixture_run(results, "ade", None, selection_ratio=[1 / 11] * 11, task="ade20k", method="gated+temp")
    write_format_fixture_run(results, "vpt", 60.0, task="cars")   # no selection ratio: skipped
    paths = analysis.figure_selection_ratio(results, out)
    assert_png(paths["png"])
    data = json.loads(open(paths["json"]).read())
    panels = {(p["task"], p["ssl"]): p for p in data["panels"]}
    assert set(panels) == {("nabirds", "mae"), ("cars", "mae"), ("ade20k", "mae")}
    nab = panels[("nabirds", "mae")]
    assert nab["blocks"] == list(range(1, 12)) and nab["n"] == 2
    assert nab["mean"][-2:] == pytest.approx([0.3, 0.7])
    assert panels[("cars", "mae")]["mean"] == pytest.approx(cars)
    rows = read_csv(paths["csv"])
    assert len(rows) == 3 * 11
    assert float(next(r for r in rows if r["task"] == "cars" and r["block"] == "1")["ratio_mean"]) == pytest.approx(0.3)


def test_figure_prompt_count_and_table7(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    for per_block, acc in zip((1, 2, 4, 8), (57.0, 60.0, 64.0, 67.0)):    # VPT-deep: 12, 24, 48, 96 tokens
        write_format_fixture_run(results, f"deep-cars-{per_block}", acc, task="cars", method="vpt-deep",
                                 num_prompts=per_block)
        write_format_fixture_run(results, f"deep-cub-{per_block}", acc + 2, task="cub", method="vpt-deep",
                                 num_prompts=per_block)
    for total, acc in zip((12, 24, 48, 96), (62.0, 66.0, 70.0, 72.0)):
        write_format_fixture_run(results, f"ours-cars-{total}", acc, task="cars", method="gated+temp",
                                 num_prompts=total)
    write_format_fixture_run(results, "ours-cub-24", 65.0, task="cub", method="gated+temp", num_prompts=24)
    write_format_fixture_run(results, "shallow", 42.0, task="cars", method="vpt-shallow")   # not in Figure 7
    paths = analysis.figure_prompt_count(results, out)
    assert_png(paths["png"])
    rows = read_csv(paths["csv"])
    table = {(int(r["prompt_tokens"]), r["method"]): r for r in rows}
    assert set(table) == {(n, m) for n in (12, 24, 48, 96) for m in ("vpt-deep", "gated+temp")}
    assert float(table[(48, "vpt-deep")]["cars"]) == 64.0 and float(table[(48, "vpt-deep")]["cub"]) == 66.0
    assert float(table[(48, "vpt-deep")]["AVG"]) == pytest.approx(65.0)
    assert float(table[(24, "gated+temp")]["AVG"]) == pytest.approx(65.5)
    assert table[(12, "gated+temp")]["cub"] == "" and table[(12, "gated+temp")]["AVG"] == ""   # no cub run
    data = json.loads(open(paths["json"]).read())
    deep_cars = next(s for s in data["series"] if (s["task"], s["method"]) == ("cars", "vpt-deep"))
    assert deep_cars["prompt_tokens"] == [12, 24, 48, 96]


def drawn_figure(monkeypatch):
    """Keeps the matplotlib Figure each figure function saves, to read its legends and titles."""
    figures = []
    save = analysis.save_figure

    def keep_and_save(fig, path, *args, **kwargs):
        figures.append(fig)
        return save(fig, path, *args, **kwargs)
    monkeypatch.setattr(analysis, "save_figure", keep_and_save)
    return figures


def legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def write_runs_of_other_settings(results):
    """Per figure, one paper-recipe run and two runs of the same point that are not: shortened (epochs=1) and
    stale (written by an older recipe version)."""
    ratio = [0.0] * 9 + [0.2, 0.8]
    for tag, extra in (("paper", {}), ("short", {"epochs": 1}), ("stale", {"recipe_version": 1})):
        acc = {"paper": 45.0, "short": 5.0, "stale": 25.0}[tag]
        write_format_fixture_run(results, f"fig1-{tag}", acc, insert_at=6, **extra)
        write_format_fixture_run(results, f"fig4-{tag}", None, selection_ratio=ratio if tag == "paper" else ratio[::-1],
                                 task="nabirds", method="gated+temp", **extra)
        write_format_fixture_run(results, f"fig7-{tag}", acc, task="cars", method="vpt-deep", num_prompts=2, **extra)


OTHER_SETTINGS = {"epochs=1", f"stale: recipe version 1, now {config.RECIPE_VERSION}"}


def test_figures_show_only_the_paper_recipe_by_default(tmp_path, monkeypatch):
    unrendered(monkeypatch)
    results_dir = tmp_path / "results"
    write_runs_of_other_settings(results_dir)
    fig1 = json.loads(open(analysis.figure_insertion(results_dir, tmp_path / "f1")["json"]).read())
    assert [(s["setting"], s["mean"]) for s in fig1["series"]] == [("paper recipe", [45.0])]   # not averaged in
    assert {r["setting"] for r in fig1["other_settings_not_shown"]} == OTHER_SETTINGS
    fig4 = json.loads(open(analysis.figure_selection_ratio(results_dir, tmp_path / "f4")["json"]).read())
    assert [(p["task"], p["setting"]) for p in fig4["panels"]] == [("nabirds", "paper recipe")]
    assert fig4["panels"][0]["mean"][-2:] == pytest.approx([0.2, 0.8])
    paths = analysis.figure_prompt_count(results_dir, tmp_path / "f7")
    fig7 = json.loads(open(paths["json"]).read())
    assert [(s["setting"], s["mean"]) for s in fig7["series"]] == [("paper recipe", [45.0])]
    assert [(r["setting"], r["cars"]) for r in read_csv(paths["csv"])] == [("paper recipe", "45.0")]


def test_figures_mark_other_settings_when_asked(tmp_path, monkeypatch):
    """Each other setting its own series, panel or row, named in the drawn figures' legends and titles."""
    unrendered(monkeypatch)
    results_dir = tmp_path / "results"
    write_runs_of_other_settings(results_dir)
    figures = drawn_figure(monkeypatch)
    paths = analysis.figure_insertion(results_dir, tmp_path / "f1", include_other_settings=True)
    series = json.loads(open(paths["json"]).read())["series"]
    assert [(s["setting"], s["mean"]) for s in series][0] == ("paper recipe", [45.0])    # each its own series
    assert {(s["setting"], s["mean"][0]) for s in series[1:]} == {
        ("epochs=1", 5.0), (f"stale: recipe version 1, now {config.RECIPE_VERSION}", 25.0)}
    assert {r["setting"] for r in read_csv(paths["csv"])} == {"paper recipe"} | OTHER_SETTINGS
    assert sorted(legend_texts(figures[-1])) == sorted(["mae"] + [f"mae (other settings: {s})" for s in OTHER_SETTINGS])

    paths = analysis.figure_selection_ratio(results_dir, tmp_path / "f4", include_other_settings=True)
    panels = json.loads(open(paths["json"]).read())["panels"]
    assert [p["setting"] for p in panels][0] == "paper recipe" and {p["setting"] for p in panels[1:]} == OTHER_SETTINGS
    assert panels[0]["mean"][-2:] == pytest.approx([0.2, 0.8]) and panels[0]["n"] == 1
    titles = [ax.get_title() for ax in figures[-1].axes if ax.get_visible()]
    assert sum("other settings: epochs=1" in t for t in titles) == 1 and "other settings" not in titles[0]
    assert {r["setting"] for r in read_csv(paths["csv"])} == {"paper recipe"} | OTHER_SETTINGS

    paths = analysis.figure_prompt_count(results_dir, tmp_path / "f7", include_other_settings=True)
    table = {r["setting"]: r["cars"] for r in read_csv(paths["csv"])}
    assert table == {"paper recipe": "45.0", "epochs=1": "5.0",
                     f"stale: recipe version 1, now {config.RECIPE_VERSION}": "25.0"}
    assert "vpt-deep (other settings: epochs=1)" in legend_texts(figures[-1])
    # the command line's --all
    assert analysis.main(["7", "--results-dir", str(results_dir), "--out-dir", str(tmp_path / "cli"), "--all"]) == 0
    assert len(read_csv(tmp_path / "cli" / "table7_prompt_count.csv")) == 3


def test_figures_without_a_paper_run_point_to_all(tmp_path, capsys):
    results_dir = tmp_path / "results"
    write_format_fixture_run(results_dir, "short", 5.0, insert_at=6, epochs=1)
    write_format_fixture_run(results_dir, "short-ratio", 5.0, task="nabirds", method="gated+temp", epochs=1,
                             selection_ratio=[0.0] * 10 + [1.0])
    write_format_fixture_run(results_dir, "short-deep", 5.0, task="cars", method="vpt-deep", num_prompts=2, epochs=1)
    for figure in (analysis.figure_insertion, analysis.figure_selection_ratio, analysis.figure_prompt_count):
        with pytest.raises(UserError, match=r"paper's exact recipe.*epochs=1.*--all"):
            figure(results_dir, tmp_path / "out")
    # a paper run beside them: drawn, and the command line says what it left out
    write_format_fixture_run(results_dir, "paper", 45.0, insert_at=6)
    assert analysis.main(["1", "--results-dir", str(results_dir), "--out-dir", str(tmp_path / "cli")]) == 0
    assert "1 run(s) are not of the paper's exact recipe" in capsys.readouterr().out


def test_figure1_uses_section_a2_learning_rates(tmp_path, monkeypatch):
    """Figure 1's KITTI runs with MoCo v3 are at lr 0.1 (Section A.2), not Table 5's 1.0; VPT-shallow only."""
    unrendered(monkeypatch)
    results_dir = tmp_path / "results"
    assert config.resolve("kitti", "mocov3", "vpt-shallow").lr == 1.0
    write_format_fixture_run(results_dir, "table5-lr", 20.0, task="kitti", ssl="mocov3", insert_at=3)
    write_format_fixture_run(results_dir, "figure1-lr", 30.0, task="kitti", ssl="mocov3", insert_at=3, lr=0.1)
    write_format_fixture_run(results_dir, "gated", 99.0, task="kitti", ssl="mocov3", method="gated", insert_at=3)
    paths = analysis.figure_insertion(results_dir, tmp_path / "out")
    data = json.loads(open(paths["json"]).read())
    assert [(s["setting"], s["lr"], s["mean"]) for s in data["series"]] == [("paper recipe", [0.1], [30.0])]
    assert [r["setting"] for r in data["other_settings_not_shown"]] == ["lr=1.0 (recipe)"]


def test_total_prompt_tokens():
    assert analysis.total_prompt_tokens({"method": "vpt-deep", "num_prompts": 10, "arch": "vit_base"}) == 120
    assert analysis.total_prompt_tokens({"method": "vpt-deep", "num_prompts": 2, "arch": "vit_large"}) == 48
    assert analysis.total_prompt_tokens({"method": "vpt-deep", "num_prompts": 1, "insert_at": 5}) == 8
    assert analysis.total_prompt_tokens({"method": "gated+temp", "num_prompts": 24}) == 24


def test_missing_matplotlib_message(tmp_path, monkeypatch):
    write_format_fixture_run(tmp_path, "a", 50.0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import fails
    with pytest.raises(UserError, match="pip install matplotlib"):
        analysis.figure_insertion(tmp_path, tmp_path / "out")

# -----------------------------------------------------------------------------
# Figure 5: attention maps


def test_figure_attention(tmp_path):
    gated = tiny_model("gated")
    with_temp = tiny_model("gated+temp")
    with_temp.load_state_dict(gated.backbone_state_dict(), strict=False)
    with torch.no_grad():
        with_temp.temperatures.fill_(0.5)
    frozen = analysis.backbone_twin(gated)
    image = tiny_image()
    paths = analysis.figure_attention([("MAE", frozen), ("GATE", gated), ("GATE+LT", with_temp)], image, tmp_path,
                                      blocks=(1, 2, 4))
    assert_png(paths["png"])
    data = json.loads(open(paths["json"]).read())
    assert data["blocks"] == [1, 2, 4] and list(data["models"]) == ["MAE", "GATE", "GATE+LT"]
    # the frozen backbone's map is the CLS row of its attention (over the 4x4 patches), head-averaged: timm's
    # weights with the softmax written out
    x = datasets.imagenet_normalize(image[None], max_value=1.0)
    expected = timm_cls_attention(timm_reference(gated), x, 2).reshape(4, 4)
    assert torch.allclose(torch.tensor(data["models"]["MAE"]["2"]), expected, atol=1e-6)
    # without prompts CLS attention over CLS + patches sums to 1; so the patches get < 1
    assert 0 < np.sum(data["models"]["MAE"]["4"]) < 1
    # prompts and temperatures change the maps
    assert not np.allclose(data["models"]["MAE"]["4"], data["models"]["GATE"]["4"])
    assert not np.allclose(data["models"]["GATE"]["1"], data["models"]["GATE+LT"]["1"])
    with pytest.raises(UserError):
        analysis.figure_attention([("x", gated)], image, tmp_path, blocks=(5,))

# -----------------------------------------------------------------------------
# PSNR / SSIM


def numpy_psnr(a, b):
    """10 log10(1 / MSE) for images in [0,1], written out in numpy."""
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def test_psnr_known_values():
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8
    assert float(dip.psnr(a + 0.1, a)) == pytest.approx(20.0, abs=1e-9)   # MSE 0.01 -> 20 dB
    assert float(dip.psnr(a, a + 0.01)) == pytest.approx(40.0, abs=1e-6)
    assert math.isinf(float(dip.psnr(a, a)))
    batch = dip.psnr(torch.stack([a, a]), torch.stack([a + 0.1, a + 0.01]))
    assert batch.shape == (2,) and batch.tolist() == pytest.approx([20.0, 40.0], abs=1e-6)
    b = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))     # float32, as reconstructions are
    assert float(dip.psnr(b, a.float())) == pytest.approx(numpy_psnr(b.numpy(), a.numpy()), abs=1e-6)


def test_ssim_identical_and_constant_images():
    a = tiny_image()
    assert float(dip.ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    # two constant images: variances and covariance are 0, so SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
    # = (0.42 + 0.0001) / (0.58 + 0.0001) = 0.7242...
    value = dip.ssim(torch.full((3, 20, 20), 0.3, dtype=torch.float64), torch.full((3, 20, 20), 0.7, dtype=torch.float64))
    assert float(value) == pytest.approx(0.4201 / 0.5801, abs=1e-9)


def naive_ssim(a, b):
    """SSIM written out window by window in numpy (independent of dip.ssim's convolutions)."""
    k, sigma, c1, c2 = 11, 1.5, 0.01 ** 2, 0.03 ** 2
    r = np.arange(k) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    per_channel = []
    for x, y in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
        values = []
        for i in range(x.shape[0] - k + 1):
            for j in range(x.shape[1] - k + 1):
                px, py = x[i:i + k, j:j + k], y[i:i + k, j:j + k]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_ssim_matches_windowwise_definition():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 16, 18, generator=g, dtype=torch.float64)
    b = (0.6 * a + 0.4 * torch.rand(3, 16, 18, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(dip.ssim(a, b)) == pytest.approx(naive_ssim(a.numpy(), b.numpy()), abs=1e-10)


def test_ssim_drops_with_noise():
    g = torch.Generator().manual_seed(2)
    a = tiny_image(size=48)
    light = (a + 0.03 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    heavy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    s_light, s_heavy = float(dip.ssim(light, a)), float(dip.ssim(heavy, a))
    assert 1.0 > s_light > s_heavy > -1.0
    assert float(dip.psnr(light, a)) > float(dip.psnr(heavy, a))
    with pytest.raises(ValueError):
        dip.ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))   # smaller than the 11x11 window

# -----------------------------------------------------------------------------
# Figure 1's premise: with insert_at = k, blocks before k never see prompts


@pytest.mark.parametrize("method", ["vpt-shallow", "gated"])
@pytest.mark.parametrize("k", [2, 3])
def test_blocks_before_insertion_see_no_prompts(method, k):
    prompted = tiny_model(method, insert_at=k, num_prompts=4, gate_init=0.0)
    ref = timm_reference(prompted)   # the prompt-free backbone, computed by timm
    x = datasets.imagenet_normalize(torch.stack([tiny_image(0), tiny_image(1)]), max_value=1.0)
    blocks = tuple(range(1, 5))
    with torch.no_grad():
        _, ours = prompted.forward_intermediates(x, blocks=blocks)
    for l in blocks:
        plain = timm_tokens(ref, x, l)
        if l < k:
            assert ours[l].shape == plain.shape             # CLS + patches only
            assert torch.allclose(ours[l], plain, atol=1e-5)
        else:
            assert ours[l].shape[1] == plain.shape[1] + 4   # CLS, 4 prompts, patches
            cls_and_patches = torch.cat([ours[l][:, :1], ours[l][:, 5:]], dim=1)
            assert not torch.allclose(cls_and_patches, plain, atol=1e-4)


def test_backbone_tokens_is_the_prompt_free_forward():
    prompted = tiny_model("gated+temp")
    ref = timm_reference(prompted)
    x = datasets.imagenet_normalize(tiny_image()[None], max_value=1.0)
    with torch.no_grad():
        for block in (2, 4):
            assert torch.allclose(dip.backbone_tokens(prompted, x, block), timm_tokens(ref, x, block), atol=1e-5)


def test_backbone_twin_is_the_frozen_backbone_without_prompts():
    prompted = tiny_model("gated+temp")
    twin = analysis.backbone_twin(prompted)
    assert twin.num_prompts == 0 and isinstance(twin.head, torch.nn.Identity)
    x = datasets.imagenet_normalize(tiny_image()[None], max_value=1.0)
    with torch.no_grad():
        _, tokens = twin.forward_intermediates(x, blocks=(4,))
    assert torch.allclose(tokens[4], timm_tokens(timm_reference(prompted), x, 4), atol=1e-5)

# -----------------------------------------------------------------------------
# Deep Image Prior (Figures 2 and 9)

SMALL_GENERATOR = dict(widths=(16, 16), noise_channels=8, progress=False)


def test_dip_reduces_feature_loss():
    model = tiny_model("linear")
    image = tiny_image()
    rng_before = torch.get_rng_state()
    recon, losses = dip.dip_reconstruct(model, image, block=2, steps=40, lr=0.01, seed=0, return_losses=True,
                                        **SMALL_GENERATOR)
    assert torch.equal(torch.get_rng_state(), rng_before)   # seeded locally
    assert recon.shape == image.shape and 0 <= recon.min() and recon.max() <= 1
    assert len(losses) == 41
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for p in model.parameters())   # the backbone is untouched


def test_figure_dip(tmp_path):
    models = [("supervised", tiny_model("linear", seed=0)), ("MAE", tiny_model("gated", seed=1))]
    images = [tiny_image(0), tiny_image(1)]
    paths = dip.figure_dip(models, images, blocks=(1, 4), out_dir=tmp_path, steps=3, lr=0.01, seed=0,
                           **SMALL_GENERATOR)
    assert_png(paths["png"])
    assert_png(paths["scores_png"])
    data = json.loads(open(paths["json"]).read())
    assert data["blocks"] == [1, 4] and data["num_images"] == 2
    rows = read_csv(paths["csv"])
    assert len(rows) == 2 * 2 * 2
    # the reconstruction is deterministic given the seed
    again = [dip.dip_reconstruct(models[1][1], images[1], 4, steps=3, lr=0.01, seed=0, **SMALL_GENERATOR)
             for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_figure_dip_stores_the_scores_of_each_reconstruction(tmp_path, monkeypatch):
    """With a stand-in reconstruction that differs per backbone, block and image, every stored PSNR / SSIM is the
    one numpy gives for that reconstruction against that image, and Figure 9's means are their means."""
    unrendered(monkeypatch)
    models = [("supervised", tiny_model("linear", seed=0)), ("MAE", tiny_model("gated", seed=1))]
    images = [tiny_image(0), tiny_image(1)]

    def stand_in(model, image, block, **_):
        return (0.5 * image + 0.05 * block + (0.1 if model is models[1][1] else 0.0)).clamp(0, 1)
    monkeypatch.setattr(dip, "dip_reconstruct", stand_in)
    paths = dip.figure_dip(models, images, blocks=(1, 4), out_dir=tmp_path, steps=3, **SMALL_GENERATOR)
    rows = {(r["model"], int(r["block"]), int(r["image"])): r for r in read_csv(paths["csv"])}
    expected = {(label, b, i): numpy_psnr(stand_in(model, images[i], b).numpy(), images[i].numpy())
                for label, model in models for b in (1, 4) for i in (0, 1)}
    assert {key: float(r["psnr_db"]) for key, r in rows.items()} == pytest.approx(expected, abs=1e-3)
    for label, model in models:   # SSIM of one image per backbone against the window-by-window numpy definition
        recon = stand_in(model, images[1], 4).numpy()
        assert float(rows[(label, 4, 1)]["ssim"]) == pytest.approx(naive_ssim(recon, images[1].numpy()), abs=1e-5)
    summary = json.loads(open(paths["json"]).read())["summary"]
    assert summary["MAE"]["psnr_mean"][1] == pytest.approx(np.mean([expected[("MAE", 4, i)] for i in (0, 1)]))


# -----------------------------------------------------------------------------
# Command line for the model-based figures (tiny models saved the way the harness saves them)

TINY_ARCH = dict(TINY_VIT, depth=4)   # img_size is its own config key


def save_tiny_run(tmp_path, method, backbone_state, seed, task="cub", **overrides):
    """A tiny trained-looking run: run JSON (FILE-FORMAT FIXTURE: the config config.resolve gives for a tiny run of
    `task`, CUB unless told) + <name>.prompts.pt beside it."""
    model = tiny_model(method, seed=seed, gate_init=1.0)
    model.load_state_dict(backbone_state, strict=False)
    cfg = config.resolve(task, "mae", method, **{"arch_overrides": TINY_ARCH, "img_size": 32, "num_prompts": 3,
                                                 "gate_init": 1.0, "lr": 0.1, **overrides})
    path = tmp_path / f"{method}.json"
    path.write_text(json.dumps({"config": cfg.identity(), "protocol": "final", "final": {"test_acc": 1.0}}))
    torch.save(model.prompt_state_dict(), tmp_path / f"{method}.prompts.pt")
    return str(path), model


def test_figure5_from_stored_runs(tmp_path):
    backbone = tiny_model("linear", seed=7)
    checkpoint = tmp_path / "backbone.pth"
    torch.save({"model": backbone.backbone_state_dict()}, checkpoint)   # MAE-style file
    run_path, trained = save_tiny_run(tmp_path, "gated+temp", backbone.backbone_state_dict(), seed=3)
    rebuilt, run = analysis.model_from_run(run_path, checkpoint)
    x = datasets.imagenet_normalize(tiny_image()[None], max_value=1.0)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), trained.eval()(x), atol=1e-6)
    Image.fromarray((tiny_image().permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "img.png")
    gated_path, _ = save_tiny_run(tmp_path, "gated", backbone.backbone_state_dict(), seed=4)
    out = tmp_path / "fig5"
    assert analysis.main(["5", "--image", str(tmp_path / "img.png"), "--checkpoint", str(checkpoint),
                          "--run", gated_path, "--run", run_path, "--blocks", "1", "4", "--out-dir", str(out)]) == 0
    assert_png(out / "figure5_attention.png")
    data = json.loads((out / "figure5_attention.json").read_text())
    assert list(data["models"]) == ["mae (frozen)", "gated", "gated+temp"]
    os.remove(tmp_path / "gated.prompts.pt")
    with pytest.raises(UserError, match="prompts"):
        analysis.model_from_run(gated_path, checkpoint)


def test_figure2_command_line(tmp_path):
    checkpoint = tmp_path / "backbone.pth"
    torch.save(tiny_model("linear", seed=7).backbone_state_dict(), checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray((tiny_image(i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "fig2"
    assert analysis.main(["2", "--image", str(images), "--max-images", "1", "--backbone", f"MAE={checkpoint}",
                          "--arch-overrides", json.dumps(TINY_ARCH), "--img-size", "32", "--blocks", "2",
                          "--steps", "2", "--out-dir", str(out)]) == 0
    assert_png(out / "figure2_dip_reconstructions.png")
    rows = read_csv(out / "figure9_dip_scores.csv")
    assert [(r["model"], r["block"], r["image"]) for r in rows] == [("MAE", "2", "0")]


def tiny_checkpoint(tmp_path, seed=7):
    backbone = tiny_model("linear", seed=seed)
    checkpoint = tmp_path / "backbone.pth"
    torch.save({"model": backbone.backbone_state_dict()}, checkpoint)   # MAE-style file
    return checkpoint, backbone


def resized_grid(pos_embed, size, mode):
    """The stored 4x4 position grid resized to size x size by torch's interpolate (CLS position kept)."""
    grid = pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(size, size), mode=mode, align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, size * size, -1)], dim=1)


def test_model_from_run_is_the_model_its_config_builds(tmp_path):
    """The figure's model is the one its stored config describes: here an ADE20K run's 48-pixel input whose 4x4
    stored position grid is resized bilinearly (the config's pos_embed_interpolation), as training resized it."""
    checkpoint, backbone = tiny_checkpoint(tmp_path)
    run_path, trained = save_tiny_run(tmp_path, "gated+temp", backbone.backbone_state_dict(), seed=3, img_size=48,
                                      task="ade20k")
    rebuilt, run = analysis.model_from_run(run_path, checkpoint)
    c = rebuilt.cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size, c.pool, c.pos_embed_interpolation) == (
        32, 4, 2, 8, 48, "mean", "bilinear")
    assert (rebuilt.num_prompts, rebuilt.head.out_features, rebuilt.pcfg.gate_init) == (3, 5, 1.0)
    stored = backbone.pos_embed.detach()
    assert torch.equal(rebuilt.pos_embed, stored)   # the file's own grid, resized per input:
    x48 = datasets.imagenet_normalize(tiny_image(size=48)[None], max_value=1.0)
    with torch.no_grad():
        positions = rebuilt.embed(x48)[:, 1:] - rebuilt.patch_embed(x48)
    assert torch.allclose(positions, resized_grid(stored, 6, "bilinear")[:, 1:], atol=1e-6)
    assert not torch.allclose(positions, resized_grid(stored, 6, "bicubic")[:, 1:], atol=1e-4)
    # the same model written out with gated_prompt: the file's backbone and the run's trained prompts
    expected = gp.VisionTransformer(c, gp.prompt_config("gated+temp", num_classes=5, num_prompts=3, gate_init=1.0))
    gp.load_backbone(expected, torch.load(checkpoint, weights_only=True))
    expected.load_prompt_state_dict(trained.prompt_state_dict())
    x = datasets.imagenet_normalize(tiny_image(size=48)[None], max_value=1.0)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected.eval()(x))


def test_model_from_run_refuses_prompts_of_another_model(tmp_path):
    checkpoint, backbone = tiny_checkpoint(tmp_path)
    run_path, _ = save_tiny_run(tmp_path, "gated+temp", backbone.backbone_state_dict(), seed=3, num_prompts=4)
    misfit = r"gated\+temp.prompts.pt does not fit the model of .*gated\+temp.json.*prompts"
    with pytest.raises(UserError, match=misfit):
        analysis.model_from_run(run_path, checkpoint)          # 3 prompts stored, the config says 4
    gated_path, _ = save_tiny_run(tmp_path, "gated", backbone.backbone_state_dict(), seed=4)
    os.replace(tmp_path / "gated+temp.prompts.pt", tmp_path / "gated.prompts.pt")
    with pytest.raises(UserError, match=r"gated.prompts.pt does not fit .*unexpected \['temperatures'\]"):
        analysis.model_from_run(gated_path, checkpoint)         # a gated+temp file for a gated run


def test_backbone_from_file_is_the_linear_model_of_the_file(tmp_path, monkeypatch):
    checkpoint, backbone = tiny_checkpoint(tmp_path)
    configs = []
    build = config.model_from_config
    monkeypatch.setattr(config, "model_from_config", lambda cfg, *a, **k: configs.append(cfg) or build(cfg, *a, **k))
    model = analysis.backbone_from_file(checkpoint, img_size=32, ssl="mocov3", **TINY_ARCH)
    c = model.cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size, c.pool) == (32, 4, 2, 8, 32, "cls")
    assert isinstance(model.head, torch.nn.Identity) and model.num_prompts == 0
    # a whole run config (the keys of any resolved classification run + the small model's arch_overrides), for a
    # linear probe without prompts
    (cfg,) = configs
    assert set(cfg.identity()) == set(config.resolve("dtd", "mae", "gated").identity()) | {"arch_overrides"}
    assert (cfg.method, cfg.ssl, cfg.num_prompts, cfg.arch_overrides) == ("linear", "mocov3", 0, TINY_ARCH)
    x = datasets.imagenet_normalize(tiny_image()[None], max_value=1.0)
    with torch.no_grad():
        for block in (1, 4):
            assert torch.equal(dip.backbone_tokens(model, x, block), dip.backbone_tokens(backbone, x, block))
