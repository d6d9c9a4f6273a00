"""Every backbone gated_prompt.py builds, from the command line: `reproduce.py --task cub --ssl dino` (dinov2,
dinov3, supervised) runs the paper's recipe with Table 5's MAE values where the paper has none, says so in one line,
in the result and beside the printed number; tables list such runs as sections of their own without a paper number;
`download` knows the official DINO / DINOv2 / DeiT files (and their published checksums) and says where a DINOv3 file
must be put. Backbone files are tiny timm models saved in each release's layout; the command line runs in this
process (conftest's `cli`) with ViT-B's entry of the architecture table made tiny."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import settings
import fixtures
import gated_prompt as gp
import reproduce
from harness import config
from harness import downloads
from harness import results

timm = pytest.importorskip("timm")

PAPER_SSL = ("mae", "mocov3")
OUTSIDE = [s for s in gp.SSL if s not in PAPER_SSL]   # dino, dinov2, supervised (and dinov3 where gated_prompt has it)
# Table 5's MAE column (Appendix A.2), typed in from the paper: (batch size, prompts, lr, gate init)
MAE_COLUMN = {"cub": (64, 100, 0.1, 5), "flowers": (64, 100, 0.1, 15), "dtd": (128, 1, 0.25, 1),
              "ade20k": (16, 100, 0.001, 10)}
FAST = ("--epochs", "2", "--warmup-epochs", "1", "--num-prompts", "4", "--device", "cpu")


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**dict(dict(embed_dim=32, depth=2, num_heads=2), **kw))


def write_dino(path):      # dino_vitbase16_pretrain.pth: the teacher backbone's state dict, timm names
    torch.save(tiny_vit(img_size=224, patch_size=16, num_classes=0).state_dict(), path)


def write_dinov2(path):    # dinov2_vitb14_pretrain.pth: timm names, LayerScale, a 1 + 37x37 position table, mask_token
    sd = tiny_vit(img_size=518, patch_size=14, init_values=1e-5, num_classes=0).state_dict()
    torch.save(dict(sd, mask_token=torch.zeros(1, 32)), path)


def write_deit(path):      # deit_base_patch16_224-b5f2ef4d.pth: {"model": state dict with the ImageNet head}
    torch.save({"model": tiny_vit(img_size=224, patch_size=16, num_classes=1000).state_dict()}, path)


def write_dinov3(path):    # timm's vit_base_patch16_dinov3 state dict (storage tokens as reg_token, RoPE)
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_dinov3", pretrained=False, num_classes=0, global_pool="token",
                            embed_dim=32, depth=2, num_heads=2)
    torch.save(ref.state_dict(), path)


WRITERS = {"dino": write_dino, "dinov2": write_dinov2, "supervised": write_deit, "dinov3": write_dinov3}


@pytest.fixture
def tiny_vit_base(monkeypatch):
    monkeypatch.setitem(gp.ARCHS, "vit_base", (16, 32, 2, 2))


def test_the_ssl_choices_are_gated_prompts_own_list():
    assert list(gp.SSL)[:2] == ["mae", "mocov3"] and {"dino", "dinov2", "supervised"} <= set(OUTSIDE)
    for ssl in gp.SSL:
        assert reproduce.parse_args(["--task", "cub", "--ssl", ssl]).ssl == ssl
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--task", "cub", "--ssl", "dinov9"])


@pytest.mark.parametrize("ssl", OUTSIDE)
def test_a_backbone_outside_the_paper_runs_table_5s_mae_values_and_records_it(ssl, cli):
    for task, row in MAE_COLUMN.items():
        out = cli("--task", task, "--ssl", ssl, "--print-config")
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert (shown["batch_size"], shown["num_prompts"], shown["lr"], shown["gate_init"]) == row
        assert shown["ssl"] == ssl and shown["table5_cell"] == f"{task}/mae"
    cfg = config.resolve("cub", ssl)
    assert config.outside_paper(cfg) == (f"Table 5 has no {ssl} column: its mae column (batch 64, 100 prompts, "
                                         "lr 0.1, gate init 5)")
    assert config.deviations(cfg) == {} and config.recipe_of(cfg) == cfg


def test_the_papers_backbones_keep_their_own_cells_and_identities():
    for ssl in PAPER_SSL:
        cfg = config.resolve("cub", ssl)
        assert "table5_cell" not in cfg.identity() and config.outside_paper(cfg) is None


@pytest.mark.parametrize("ssl", OUTSIDE)
def test_cub_on_each_backbone_trains_and_prints_a_row_marked_outside_the_paper(ssl, tmp_path, tiny_vit_base, cli):
    if ssl not in WRITERS:
        pytest.skip(f"no fixture writer for {ssl}")
    fixtures.write_fgvc_fixture(tmp_path / "data" / "cub", "cub")
    checkpoint = tmp_path / f"{ssl}.pth"
    WRITERS[ssl](checkpoint)
    out = cli("--task", "cub", "--ssl", ssl, "--checkpoint", checkpoint, "--data-dir", tmp_path / "data",
              "--results-dir", tmp_path / "results", *FAST)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"note: outside the paper: Table 5 has no {ssl} column: its mae column (batch 64, 100 prompts, lr 0.1, " \
           "gate init 5); no paper number to compare with" in lines
    [row] = [line for line in lines if line.startswith(f"cub / {ssl} / gated+temp: test_acc ")]
    assert "(paper:" not in row and f"(outside the paper: Table 5 has no {ssl} column" in row
    [result_file] = (tmp_path / "results" / "cub" / ssl).glob("*-final*.json")
    stored = json.loads(result_file.read_text())
    assert stored["config"]["table5_cell"] == "cub/mae" and stored["config"]["ssl"] == ssl
    assert stored["gates"] is not None and results.paper_value(stored, "test_acc") is None


def store(results_dir, cfg, test_acc):
    """A finished result of cfg as run_one writes it."""
    files = results.run_files(results_dir, cfg, "final")
    s = settings(Path(results_dir).parent, results_dir=str(results_dir))
    results.write_run(files, results.new_result(cfg, "final", "recipe", s, {"final": {"test_acc": test_acc}}, "x"))


def test_tables_list_other_backbones_apart_never_in_a_paper_cell(tmp_path, capsys):
    store(tmp_path / "r", config.resolve("cub", "mae"), 55.5)
    store(tmp_path / "r", config.resolve("cub", "dino"), 81.25)
    store(tmp_path / "r", config.resolve("flowers", "dino"), 91.75)
    store(tmp_path / "r", config.resolve("cub", "dino", epochs=3), 12.5)   # not the recipe: listed with --all only
    results.print_table("1", str(tmp_path / "r"))
    text = capsys.readouterr().out
    paper_part, _, dino_part = text.partition("Table 1 - FGVC, dino, ViT-B/16, top-1 test accuracy (%) -- dino: "
                                              "NOT IN THE PAPER")
    assert dino_part and "81.25" not in paper_part and "91.75" not in paper_part
    gated = [line for line in paper_part.splitlines() if line.startswith("gated+temp")]
    assert len(gated) == 2 and "55.50 (70.56)" in gated[0] and "- (82.86)" in gated[1]   # mae, then mocov3
    [dino_row] = [line for line in dino_part.splitlines() if line.startswith("gated+temp")]
    assert dino_row.split()[1:4] == ["81.25", "91.75", "-"] and "(" not in dino_row
    assert "note: dino is not a backbone of the paper: each cell runs Table 5's mae values for its task" in dino_part
    assert "cells: ours (no paper number)" in dino_part and "12.50" not in text
    results.print_table("4", str(tmp_path / "r"))   # MAE's gate ablation: no section per backbone
    assert "dino" not in capsys.readouterr().out


def test_the_summary_note_says_outside_the_paper_and_how_a_run_differs(tmp_path):
    store(tmp_path / "r", config.resolve("cub", "dinov2", epochs=3), 10.0)
    store(tmp_path / "r", config.resolve("cub", "mae"), 20.0)
    by_ssl = {r["config"]["ssl"]: r for r in results.load_runs(str(tmp_path / "r"))}
    assert results.summary_note(by_ssl["dinov2"]) == (
        "   (outside the paper: Table 5 has no dinov2 column: its mae column (batch 64, 100 prompts, lr 0.1, gate "
        "init 5); not the paper's recipe: epochs=3)")
    assert results.summary_note(by_ssl["mae"]) == "" and results.paper_value(by_ssl["mae"], "test_acc") == 70.56


def test_the_download_table_knows_the_official_files_and_their_published_checksums():
    """Typed in from the sources: DINO's README and hubconf.py, DINOv2's README and hub/backbones.py (no checksum
    published: recorded at the first download), DINOv3's hub/backbones.py and DeiT's models.py (file names ending in
    torch.hub's SHA-256 prefix)."""
    def entry(arch, ssl):
        ck = downloads.CHECKPOINTS[(arch, ssl)]
        return ck.url, {p.kind: p.value for p in ck.pins}, ck.licence
    base = "https://dl.fbaipublicfiles.com/"
    assert entry("vit_small", "dino") == (base + "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", {},
                                          None)
    assert entry("vit_base", "dino") == (base + "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", {}, None)
    for size in "sbl":
        assert entry(f"vit_{dict(s='small', b='base', l='large')[size]}", "dinov2") == (
            base + f"dinov2/dinov2_vit{size}14/dinov2_vit{size}14_pretrain.pth", {}, None)
    licence = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
    for arch, name, prefix in (("vit_small", "vits16", "08c60483"), ("vit_base", "vitb16", "73cec8be"),
                               ("vit_large", "vitl16", "8aa4cbdd")):
        assert entry(arch, "dinov3") == (
            base + f"dinov3/dinov3_{name}/dinov3_{name}_pretrain_lvd1689m-{prefix}.pth", {"sha256": prefix}, licence)
    assert entry("vit_small", "supervised") == (base + "deit/deit_small_patch16_224-cd65a155.pth",
                                                {"sha256": "cd65a155"}, None)
    assert entry("vit_base", "supervised") == (base + "deit/deit_base_patch16_224-b5f2ef4d.pth",
                                               {"sha256": "b5f2ef4d"}, None)


def test_a_dinov3_file_is_never_fetched_the_error_says_where_to_get_and_put_it(tmp_path, monkeypatch, cli):
    monkeypatch.delenv(downloads.MIRROR_ENV, raising=False)
    target = tmp_path / "checkpoints" / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    message = ("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth is behind Meta's licence: accept it at "
               "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/, download the file with the URL "
               f"Meta e-mails you (wget), and put it at {target} (or pass --checkpoint FILE)")
    for fetch in (True, False):
        with pytest.raises(downloads.DownloadError) as e:
            downloads.checkpoint_path("vit_base", "dinov3", tmp_path / "checkpoints", download=fetch)
        assert str(e.value) == message
    if "dinov3" in gp.SSL:
        out = cli("download", "--ssl", "dinov3", "--checkpoint-dir", tmp_path / "checkpoints")
        assert out.returncode == 2 and out.stderr == f"error: {message}\n"
        run = cli("--task", "cub", "--ssl", "dinov3", "--results-dir", tmp_path / "r", cwd=tmp_path)
        assert run.returncode == 2 and run.stderr == f"error: {message}\n".replace(str(tmp_path) + "/", "")
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_dino_downloads_from_a_mirror_are_checked_by_loading_and_recorded(tmp_path, monkeypatch, cli):
    monkeypatch.setitem(gp.ARCHS, "vit_small", (16, 32, 2, 2))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_dino(mirror / "dino_deitsmall16_pretrain.pth")
    out = cli("download", "--ssl", "dino", "--arch", "vit_small", "--mirror", mirror.as_uri(), "--checkpoint-dir",
              tmp_path / "checkpoints")
    assert out.returncode == 0, out.stderr
    sha = hashlib.sha256((mirror / "dino_deitsmall16_pretrain.pth").read_bytes()).hexdigest()
    assert f"{sha}  dino_deitsmall16_pretrain.pth" in (tmp_path / "checkpoints" / "SHA256SUMS").read_text()
    assert out.stdout.strip().endswith(str(tmp_path / "checkpoints" / "dino_deitsmall16_pretrain.pth"))


def test_a_deit_file_not_matching_its_published_sha256_prefix_is_refused(tmp_path, monkeypatch, cli):
    monkeypatch.setitem(gp.ARCHS, "vit_base", (16, 32, 2, 2))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_deit(mirror / "deit_base_patch16_224-b5f2ef4d.pth")   # not the official bytes
    out = cli("download", "--ssl", "supervised", "--mirror", mirror.as_uri(), "--checkpoint-dir",
              tmp_path / "checkpoints")
    assert out.returncode == 2 and "SHA-256 prefix mismatch against the SHA-256 prefix in the official file name, " \
                                   "which DeiT's loader checks" in out.stderr and "expected b5f2ef4d" in out.stderr
    assert not (tmp_path / "checkpoints" / "deit_base_patch16_224-b5f2ef4d.pth").exists()
