"""`python reproduce.py predict`: prompt packs on a folder of image files -- top-5 per image and pack, the task's
own evaluation transform, unreadable images reported and skipped, bad input one line and exit code 2."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from harness.data import datasets
import gated_prompt as gp
import reproduce
from harness import runtime

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=3, num_heads=2, patch_size=32)   # 224 px input, 7x7 patches: the real transforms
FGVC = {"kind": "fgvc", "resize": 256, "crop": 224}
VTAB = {"kind": "vtab", "resize": 224, "crop": 224}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A backbone file, three packs (two FGVC with class names, one VTAB; different methods, prompt and class
    counts) and a folder of generated images of several sizes and formats, one corrupt, one not an image."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    base = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=TINY, verbose=False).eval()
    torch.save({"model": base.backbone_state_dict()}, root / "mae.pth")
    packs = {}
    for name, method, prompts, classes, transform in (("birds", "gated+temp", 4, 6, FGVC),
                                                       ("textures", "vpt-shallow", 2, 8, VTAB),
                                                       ("dogs", "linear", 1, 3, FGVC)):
        model = gp.VisionTransformer(base.cfg, gp.prompt_config(method, num_classes=classes, num_prompts=prompts))
        gp.load_backbone(model, base.backbone_state_dict())
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.normal_(0, 1.0)
            if model.temperatures is not None:
                model.temperatures.uniform_(0.5, 2.0)   # trained temperatures lie in [0.01, 10]
        names = [f"{name}_{c}" for c in range(classes)] if transform is FGVC else None
        packs[name] = model.save_pack(root / f"{name}.pack.pt", class_names=names, ssl="mae", task=name,
                                      transform=transform, checkpoint=str(root / "mae.pth"))
    images, _ = datasets.make_synthetic_images(4, 1, 64, seed=3)
    folder = root / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, ((w, h), name) in enumerate(zip([(300, 260), (64, 48), (500, 200), (224, 224)],
                                           ["a.jpg", "b.png", "nested/c.JPEG", "nested/d.webp"])):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return root, packs


def expected_logits(pack, path, checkpoint):
    """The pack's own model on the image as the harness's data pipeline prepares it (data.py + torchvision)."""
    model = gp.load_pack(pack, checkpoint=checkpoint)
    transform = gp.read_pack(pack)["info"]["transform"]
    if transform["kind"] == "fgvc":   # VPT: Resize(256) + CenterCrop(224) on the PIL image, then ToTensor
        pil = Image.open(path).convert("RGB")
        image = TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 256, interpolation=TF.InterpolationMode.BILINEAR), 224))
    else:
        image = torch.from_numpy(datasets.decode_vtab(str(path))).permute(2, 0, 1)
    x = TF.normalize(image.float() / 255, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)[None]
    with torch.no_grad():
        return model(x)[0]


def test_predict_command_on_a_folder_prints_top5_and_writes_json(served, tmp_path):
    root, packs = served
    out = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "predict", "--pack", packs["birds"],
                          "--pack", packs["textures"], str(root / "photos"), "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr and "notes.txt" not in out.stderr
    lines = out.stdout.splitlines()
    for name in ("a.jpg", "b.png", "nested/c.JPEG", "nested/d.webp"):
        at = next(i for i, line in enumerate(lines) if line.endswith(name))
        assert lines[at + 1].startswith("  birds: 1. birds_") and lines[at + 1].count("%") == 5
        assert lines[at + 2].startswith("  textures: 1. class ") and lines[at + 2].count("%") == 5
    records = json.loads((tmp_path / "p.json").read_text())
    assert len(records) == 4 * 2 and {r["pack"] for r in records} == {"birds", "textures"}


def test_predictions_are_each_packs_own_model_on_its_task_transform(served, tmp_path):
    root, packs = served
    records = reproduce.main(["predict", "--pack", packs["birds"], "--pack", packs["textures"], "--pack",
                              packs["dogs"], "--checkpoint", str(root / "mae.pth"), "--batch-size", "4", "--device", "cpu",
                              str(root / "photos" / "a.jpg"), str(root / "photos" / "nested"),
                              "--out", str(tmp_path / "p.csv")])
    assert [(Path(r["image"]).name, r["pack"]) for r in records] == [
        (image, pack) for image in ("a.jpg", "c.JPEG", "d.webp") for pack in ("birds", "textures", "dogs")]
    for r in records:
        probs = expected_logits(packs[r["pack"]], r["image"], root / "mae.pth").softmax(-1)
        values, classes = probs.topk(min(5, len(probs)))
        assert [t["class"] for t in r["top"]] == classes.tolist()
        assert [t["probability"] for t in r["top"]] == pytest.approx(values.tolist(), abs=1e-5)
        assert [t["name"] for t in r["top"]] == ([f"{r['pack']}_{c}" for c in classes.tolist()]
                                                 if r["pack"] != "textures" else [None] * 5)
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["image", "pack", "rank", "class", "name", "probability"]
    assert len(rows) == 1 + 3 * (5 + 5 + 3)   # dogs has 3 classes: its top 3


def test_bad_input_is_one_line_before_any_work(served, tmp_path):
    root, packs = served
    photos = str(root / "photos")
    (tmp_path / "empty").mkdir()
    torch.save(torch.load(packs["dogs"], weights_only=True)["tensors"], tmp_path / "run.prompts.pt")
    cases = [
        (["--pack", str(tmp_path / "missing.pt"), photos], gp.CheckpointError, "prompt pack not found"),
        (["--pack", str(root / "mae.pth"), photos], gp.CheckpointError, "is not a prompt pack"),
        (["--pack", str(tmp_path / "run.prompts.pt"), photos], gp.CheckpointError, "tensors without a pack.s settings"),
        (["--pack", packs["dogs"]], runtime.UserError, "no images given"),
        (["--pack", packs["dogs"], str(tmp_path / "empty")], runtime.UserError, "no image files"),
        (["--pack", packs["dogs"], str(tmp_path / "nope.jpg")], runtime.UserError, "image or folder not found"),
        (["--pack", packs["dogs"], photos, "--out", "p.txt"], runtime.UserError, "give a .json or .csv file"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message) as err:
            reproduce.main(["predict", *argv])
        assert "\n" not in str(err.value)


def test_packs_without_a_backbone_or_transform_or_on_another_backbone_are_refused(served, tmp_path):
    root, packs = served
    base = gp.load_pack(packs["dogs"], checkpoint=root / "mae.pth")
    base.save_pack(tmp_path / "bare.pack.pt", transform=FGVC)            # no backbone file recorded
    base.save_pack(tmp_path / "demo.pack.pt", checkpoint=str(root / "mae.pth"), transform=None)
    torch.manual_seed(5)
    other = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=TINY, verbose=False)
    torch.save({"model": other.backbone_state_dict()}, tmp_path / "other.pth")
    photos = str(root / "photos")
    with pytest.raises(runtime.UserError, match="pass --checkpoint"):
        reproduce.main(["predict", "--pack", str(tmp_path / "bare.pack.pt"), photos])
    with pytest.raises(runtime.UserError, match="records no image transform"):
        reproduce.main(["predict", "--pack", str(tmp_path / "demo.pack.pt"), photos])
    with pytest.raises(runtime.UserError, match="another backbone.*fingerprint"):
        reproduce.main(["predict", "--pack", packs["dogs"], "--checkpoint", str(tmp_path / "other.pth"), photos])


def test_only_unreadable_images_are_reported_then_refused(served, tmp_path, capsys):
    root, packs = served
    with pytest.raises(runtime.UserError, match="none of the images could be read"):
        reproduce.main(["predict", "--pack", packs["dogs"], str(root / "photos" / "broken.jpg"),
                        str(root / "photos" / "notes.txt")])
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image(s)" in err and "broken.jpg" in err and "notes.txt" in err


def test_an_unusable_device_is_one_line_and_exit_code_2(served, capsys):
    root, packs = served
    photos = str(root / "photos")
    devices = ["tpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert reproduce.cli_main(["predict", "--pack", packs["dogs"], photos, "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}") and err.count("\n") == 1, err


@pytest.mark.parametrize("transform,shown", [({"kind": "fgvc"}, "{'kind': 'fgvc'}"), ("fgvc", "'fgvc'"),
                                             ({"kind": "fgvc", "resize": 256, "crop": "224"}, "'crop': '224'"),
                                             ({"kind": "vtab", "resize": 256, "crop": 224}, "'resize': 256")])
def test_a_malformed_transform_is_refused_naming_the_pack_and_what_is_expected(served, tmp_path, transform, shown):
    root, packs = served
    model = gp.load_pack(packs["dogs"], checkpoint=root / "mae.pth")
    path = model.save_pack(tmp_path / "odd.pack.pt", transform=transform, checkpoint=str(root / "mae.pth"))
    with pytest.raises(runtime.UserError) as err:
        reproduce.main(["predict", "--pack", path, str(root / "photos")])
    message = str(err.value)
    assert path in message and shown in message and "expected" in message and "\n" not in message


def test_a_demo_pack_is_refused_saying_its_backbone_was_random_and_not_saved(served, tmp_path):
    root, packs = served
    model = gp.load_pack(packs["dogs"], checkpoint=root / "mae.pth")
    path = model.save_pack(tmp_path / "demo.pack.pt", task="demo", transform=None, checkpoint=None)
    with pytest.raises(runtime.UserError, match="demo.*random backbone.*not saved") as err:
        reproduce.main(["predict", "--pack", path, str(root / "photos")])
    assert "\n" not in str(err.value)


# --- output, other people's names, advice -----------------------------------------------------------------

def no_predictions(monkeypatch):
    from harness import serving
    monkeypatch.setattr(serving, "predict", lambda *a, **k: pytest.fail("predicted before --out was checked"))


def test_an_out_path_that_cannot_be_written_is_refused_before_anything_is_computed(served, tmp_path, monkeypatch,
                                                                                  capsys):
    root, packs = served
    no_predictions(monkeypatch)
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file").write_text("a file")
    for out, why in ((tmp_path / "folder.csv", "is a folder"), (tmp_path / "file" / "p.csv", "cannot be written"),
                     (Path("/proc/p.json"), "cannot be written")):
        code = reproduce.cli_main(["predict", "--pack", packs["dogs"], str(root / "photos"), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --out {out}") and why in err, err
    assert (tmp_path / "file").read_text() == "a file" and list((tmp_path / "folder.csv").iterdir()) == []


# someone else's class names, and what the terminal and the CSV show of each (escaped; formulas prefixed with ')
HOSTILE = {"\x1b[2J\x1b]0;pwned\x07clear": "\\x1b[2J\\x1b]0;pwned\\x07clear",
           '=HYPERLINK("http://x","y")': '\'=HYPERLINK("http://x","y")', "+1+2": "'+1+2", "-3": "'-3",
           "@SUM(A1)": "'@SUM(A1)", "\tTAB": "\\tTAB", "ok \u202eevil": "ok \\u202eevil", "plain": "plain"}


def test_other_peoples_class_names_and_file_names_are_printed_and_written_safely(served, tmp_path, capsys,
                                                                                monkeypatch):
    """A pack's class names (someone else's) and the images' file names reach the terminal without escape or
    control characters, and the CSV without a cell a spreadsheet would run as a formula (OWASP: prefix ')."""
    root, packs = served
    base = gp.load_pack(packs["dogs"], checkpoint=root / "mae.pth")
    model = gp.VisionTransformer(base.cfg, gp.prompt_config("linear", num_classes=len(HOSTILE)))
    gp.load_backbone(model, root / "mae.pth")
    names = list(HOSTILE)
    path = model.save_pack(tmp_path / "theirs.pack.pt", class_names=names, transform=FGVC,
                           checkpoint=str(root / "mae.pth"))
    image = tmp_path / "photos" / "=cmd|x\x1b[31m.jpg"
    image.parent.mkdir()
    image.write_bytes((root / "photos" / "a.jpg").read_bytes())
    monkeypatch.chdir(image.parent)
    assert reproduce.cli_main(["predict", "--pack", path, image.name, "--out", str(tmp_path / "p.csv"),
                               "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in out), repr(out)
    rows = list(csv.reader((tmp_path / "p.csv").open(newline="")))[1:]
    assert len(rows) == 5 and all(row[4] == HOSTILE[names[int(row[3])]] for row in rows), rows
    assert all(f"{row[2]}. {row[4].removeprefix(chr(39))} " in out for row in rows), out
    assert {row[0] for row in rows} == {"'=cmd|x\\x1b[31m.jpg"}


def test_predict_takes_the_trust_pickle_it_advises(served, tmp_path, capsys):
    """A backbone file that pickles an object is refused naming --trust-pickle, which predict then accepts."""
    root, packs = served
    import argparse
    ckpt = torch.load(root / "mae.pth", weights_only=True)
    torch.save(dict(ckpt, args=argparse.ArgumentParser), tmp_path / "pickled.pth")   # a class: not a safe extra
    argv = ["predict", "--pack", packs["dogs"], "--checkpoint", str(tmp_path / "pickled.pth"),
            str(root / "photos" / "a.jpg"), "--device", "cpu"]
    assert reproduce.cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert reproduce.cli_main(argv + ["--trust-pickle"]) == 0
    trusted = capsys.readouterr().out
    assert reproduce.cli_main(argv[:3] + ["--checkpoint", str(root / "mae.pth")] + argv[5:]) == 0
    assert capsys.readouterr().out == trusted


def test_a_pack_on_another_backbone_advises_only_what_predict_takes(served, tmp_path, capsys):
    root, packs = served
    torch.manual_seed(5)
    other = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=TINY, verbose=False)
    torch.save({"model": other.backbone_state_dict()}, tmp_path / "other.pth")
    assert reproduce.cli_main(["predict", "--pack", packs["dogs"], "--checkpoint", str(tmp_path / "other.pth"),
                               str(root / "photos")]) == 2
    err = capsys.readouterr().err
    assert "strict=False" not in err and "--checkpoint" in err and str(root / "mae.pth") in err, err
