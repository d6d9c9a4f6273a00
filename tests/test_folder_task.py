"""`reproduce.py --task folder --data-dir PATH`: a user's own image folder trained with the FGVC recipe (CUB's
Table 5 row, a stated default), every override flag, classes read from the folders; the result, the learned gates
and a prompt pack with the class names written; `reproduce.py predict` serves the pack. Every bad layout exits 2 in
one line, before the backbone is read. The command line runs in this process (conftest's `cli`); the backbone is a
tiny timm ViT saved in MAE's file layout, built for 224 px inputs so the real FGVC transforms run."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import settings
from harness import config
from harness import inputs
from harness import runtime
from harness.data import datasets
import gated_prompt as gp

timm = pytest.importorskip("timm")

CLASSES = ["owl", "Zebra", "cat"]           # sorted by code point: Zebra, cat, owl
TINY_ARCH = (32, 32, 3, 2)                  # patch 32 (7x7 patches at 224 px), width 32, 3 blocks, 2 heads
FAST = ("--epochs", "2", "--warmup-epochs", "1", "--device", "cpu")


def write_folder(root, splits=("train", "val", "test"), per_split=(3, 1, 2), classes=CLASSES, seed=0):
    """root/<split>/<class>/000.jpg, 001.jpg, ...: generated images, one colour pattern per class, 48x36."""
    for s, (split, count) in enumerate(zip(splits, per_split)):
        images, labels = datasets.make_synthetic_images(len(classes), count, 32, seed=seed + s)
        for n, (image, label) in enumerate(zip(images, labels.tolist())):
            path = Path(root) / split / classes[label] / f"{n % count:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).resize((48, 36)).save(path, quality=95)
    return Path(root)


@pytest.fixture
def tiny_backbone(tmp_path, monkeypatch):
    """ViT-B's entry of the architecture table made tiny, and a random timm ViT of that size saved as MAE saves
    mae_pretrain_vit_base.pth ({"model": timm names})."""
    monkeypatch.setitem(gp.ARCHS, "vit_base", TINY_ARCH)
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=32, embed_dim=32, depth=3,
                                                           num_heads=2, num_classes=0)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": ref.state_dict()}, path)
    return path


def reference_probabilities(pack, checkpoint, image_path):
    """The pack's model on one image prepared with torchvision as VPT's FGVC evaluation: Resize(256), CenterCrop(224),
    ImageNet normalisation."""
    model = gp.load_pack(pack, checkpoint=checkpoint).eval()
    image = TF.center_crop(TF.resize(Image.open(image_path).convert("RGB"), 256), 224)
    x = TF.normalize(TF.to_tensor(image), datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)[None]
    with torch.no_grad():
        return model(x)[0].softmax(-1)


def test_train_pack_predict_end_to_end_with_the_folders_class_names(tmp_path, tiny_backbone, cli):
    data = write_folder(tmp_path / "my photos")
    results_dir = tmp_path / "my results"
    argv = ("--task", "folder", "--data-dir", data, "--checkpoint", tiny_backbone, "--results-dir", results_dir) + FAST
    out = cli(*argv)
    assert out.returncode == 0, out.stderr
    assert f"image-folder dataset {data}: 3 classes from the class folders of {data / 'train'} (Zebra, cat, owl); " \
           "train 9, val 3, test 6 images" in out.stdout
    assert ("note: outside the paper: Table 5 has no row for your own images (--task folder): the FGVC recipe with "
            "cub's row (batch 64, 100 prompts, lr 0.1, gate init 5); no paper number to compare with") in out.stdout
    summary = [line for line in out.stdout.splitlines() if line.startswith("folder / mae / gated+temp: test_acc")]
    assert len(summary) == 1 and "(outside the paper: Table 5 has no row for your own images" in summary[0] \
        and "not the paper's recipe: epochs=2, warmup_epochs=1" in summary[0]

    [result_file] = results_dir.rglob("*-final*.json")
    result = json.loads(result_file.read_text())
    identity = config.folder_fields(inputs.folder_dataset(data))
    assert result_file.relative_to(results_dir).parts[:3] == ("folder", identity["dataset"], "mae")
    assert identity["dataset"].startswith("my_photos-") and len(identity["dataset"]) == len("my_photos-") + 8
    assert {k: result["config"][k] for k in ("task", "dataset", "num_classes", "table5_cell", "lr", "batch_size",
                                             "num_prompts", "gate_init", "epochs")} == {
        "task": "folder", "dataset": identity["dataset"], "num_classes": 3, "table5_cell": "cub/mae", "lr": 0.1,
        "batch_size": 64, "num_prompts": 100, "gate_init": 5, "epochs": 2}
    assert set(result["final"]) >= {"test_acc", "best_val_acc", "test_acc_at_best_val"}
    # the learned gates (Eq. 6), one per block 1..L-1, near sigmoid(-gate init 5) = 0.0067 after 2 short epochs
    assert result["gates"] == pytest.approx([0.0067, 0.0067], abs=2e-3) and len(result["temperatures"]) == 3

    pack_file = result_file.with_name(result_file.name.replace(".json", ".pack.pt"))
    assert out.stdout.splitlines()[-2:] == [f"prompt pack: {pack_file}", "  serve it: python reproduce.py predict "
                                            f"--pack '{pack_file}' IMAGES_OR_FOLDERS"]   # quoted: "my results"
    pack = gp.read_pack(pack_file)
    assert pack["class_names"] == ["Zebra", "cat", "owl"] and pack["ssl"] == "mae"
    assert pack["info"]["transform"] == {"kind": "fgvc", "resize": 256, "crop": 224}

    new = tmp_path / "new images"
    new.mkdir()
    images, _ = datasets.make_synthetic_images(3, 1, 64, seed=9)
    for i, (w, h) in enumerate([(300, 260), (64, 48), (500, 200)]):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((w, h)).save(new / f"img{i}.png")
    served = cli("predict", "--pack", pack_file, new, "--out", tmp_path / "p.json", "--device", "cpu")
    assert served.returncode == 0, served.stderr
    records = json.loads((tmp_path / "p.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["img0.png", "img1.png", "img2.png"]
    for record in records:
        reference = reference_probabilities(pack_file, tiny_backbone, record["image"])
        assert [t["rank"] for t in record["top"]] == [1, 2, 3]   # top-5 of 3 classes
        assert [t["name"] for t in record["top"]] == [["Zebra", "cat", "owl"][i]
                                                      for i in reference.argsort(descending=True).tolist()]
        assert [t["probability"] for t in record["top"]] == pytest.approx(
            sorted(reference.tolist(), reverse=True), abs=2e-3)
    assert served.stdout.splitlines()[1].startswith(f"  {pack_file.name[:-len('.pack.pt')]}: 1. ")

    again = cli(*argv)   # the same command twice: the stored result is reused, nothing retrained
    assert again.returncode == 0 and "exists; reusing it" in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("folder / mae")] == summary


def test_without_a_test_folder_the_final_number_is_on_val_and_says_so(tmp_path, tiny_backbone, cli):
    data = write_folder(tmp_path / "no_test", splits=("train", "val"), per_split=(2, 1))
    out = cli("--task", "folder", "--data-dir", data, "--checkpoint", tiny_backbone, "--results-dir",
              tmp_path / "r", "--method", "linear", "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert f"no test/ folder: the final accuracy is measured on val ({data / 'val'})" in out.stdout
    [result_file] = (tmp_path / "r").rglob("*-final*.json")
    assert set(json.loads(result_file.read_text())["final"]) == {"val_acc"}
    assert any(line.startswith("folder / mae / linear: val_acc") for line in out.stdout.splitlines())


def test_every_override_flag_applies_to_the_folder_task(tmp_path, cli):
    data = write_folder(tmp_path / "d", per_split=(1, 1, 1))
    out = cli("--task", "folder", "--data-dir", data, "--print-config", "--ssl", "mocov3", "--method", "vpt-deep",
              "--arch", "vit_small", "--lr", "0.3", "--batch-size", "8", "--num-prompts", "5", "--gate-init", "2",
              "--weight-decay", "0.01", "--prompt-dropout", "0", "--epochs", "3", "--warmup-epochs", "1", "--seed", "7",
              "--insert-at", "2")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert {k: shown[k] for k in ("ssl", "method", "arch", "lr", "batch_size", "num_prompts", "gate_init",
                                  "weight_decay", "prompt_dropout", "epochs", "warmup_epochs", "seed", "insert_at",
                                  "num_classes", "table5_cell")} == {
        "ssl": "mocov3", "method": "vpt-deep", "arch": "vit_small", "lr": 0.3, "batch_size": 8, "num_prompts": 5,
        "gate_init": 2, "weight_decay": 0.01, "prompt_dropout": 0, "epochs": 3, "warmup_epochs": 1, "seed": 7,
        "insert_at": 2, "num_classes": 3, "table5_cell": "cub/mocov3"}
    assert "image-folder dataset" in out.stderr   # the JSON on stdout stays parseable
    vpt = cli("--task", "folder", "--data-dir", data, "--print-config", "--method", "vpt-shallow", "--recipe", "vpt",
              "--sweep")
    assert vpt.returncode == 0 and "--sweep first runs 36 grid point(s)" in vpt.stderr   # VPT's FGVC grid 9 x 4
    iters = cli("--task", "folder", "--data-dir", data, "--iters", "5")
    assert iters.returncode == 2 and iters.stderr.startswith("error: --iters does not apply to folder")


def test_the_folders_identity_follows_its_images_not_its_place(tmp_path):
    first = write_folder(tmp_path / "a", per_split=(1, 1, 1))
    fields = config.folder_fields(inputs.folder_dataset(first))
    assert fields["num_classes"] == 3 and fields["dataset"].startswith("a-")
    moved = tmp_path / "elsewhere" / "a"
    shutil.copytree(first, moved)
    assert config.folder_fields(inputs.folder_dataset(moved)) == fields      # a copy is the same run
    shutil.copy(next((first / "train" / "cat").iterdir()), first / "train" / "cat" / "copy.jpg")
    changed = config.folder_fields(inputs.folder_dataset(first))
    assert changed["dataset"] != fields["dataset"] and changed["dataset"].startswith("a-")   # another run
    cfg = config.resolve("folder", "mae", **fields)
    with pytest.raises(runtime.UserError, match="not the one this run was configured with"):
        inputs.splits_of(cfg, settings(tmp_path, data_dir=str(first)), "final")
    with pytest.raises(runtime.UserError, match="--task folder takes its classes"):
        config.resolve("folder", "mae")
    with pytest.raises(runtime.UserError, match="only that task takes a dataset"):
        config.resolve("cub", "mae", **fields)


def bad(case, root):
    """Write the dataset of a bad-layout case under root; return (the --data-dir, text the message must hold)."""
    data = root / "data"
    if case == "missing folder":
        return data, f"{data}: image-folder dataset not found"
    if case != "one class":
        write_folder(data, per_split=(1, 1, 1))
    if case == "no train folder":
        shutil.rmtree(data / "train")
        return data, f"{data}: no train/ folder and no train.csv"
    if case == "no val folder":
        shutil.rmtree(data / "val")
        return data, f"{data}: no val/ folder"
    if case == "no class folders":
        shutil.rmtree(data / "train")
        (data / "train").mkdir()
        return data, f"{data / 'train'}: no class folders"
    if case == "empty class":
        (data / "train" / "dog").mkdir()
        return data, f"{data / 'train' / 'dog'}: empty class folder"
    if case == "val class not in train":
        shutil.copytree(data / "val" / "cat", data / "val" / "lynx")
        return data, f"{data / 'val' / 'lynx'}: class 'lynx' has no folder in {data / 'train'}"
    if case == "unreadable image":
        (data / "test" / "owl" / "notes.jpg").write_text("not an image")
        return data, f"{data / 'test' / 'owl' / 'notes.jpg'}: not a readable image"
    if case == "one class":
        write_folder(data, per_split=(1, 1, 0), classes=["cat"])
        return data, f"{data / 'train'}: one class (cat); a classifier needs two or more"
    if case == "csv row without a file":
        (data / "train.csv").write_text("train/cat/000.jpg,cat\ntrain/cat/gone.jpg,cat\n")
        (data / "val.csv").write_text("val/owl/000.jpg,owl\n")
        return data, f"{data / 'train.csv'}:2: image file {data / 'train/cat/gone.jpg'} not found"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing folder", "no train folder", "no val folder", "no class folders",
                                  "empty class", "val class not in train", "unreadable image", "one class",
                                  "csv row without a file"])
def test_every_bad_layout_exits_2_in_one_line_naming_the_path_before_the_backbone(case, tmp_path, cli,
                                                                                   monkeypatch):
    def too_late(*args):
        pytest.fail("reached the backbone before refusing the dataset")
    monkeypatch.setattr(inputs, "checkpoint_for", too_late)
    data, message = bad(case, tmp_path)
    out = cli("--task", "folder", "--data-dir", data, "--results-dir", tmp_path / "r")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert not (tmp_path / "r").exists()


def test_the_folder_task_needs_its_data_dir(cli, tmp_path):
    out = cli("--task", "folder", "--results-dir", tmp_path / "r")
    assert out.returncode == 2 and out.stderr == (
        "error: --task folder trains on your own images: add --data-dir PATH, the folder holding train/<class>/ and "
        "val/<class>/ (or train.csv and val.csv)\n")
