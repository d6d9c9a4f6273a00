"""Test fixtures for downloads.py: the files the real hosts serve, tiny but in the real release formats.

  CUB_200_2011.tgz   CUB_200_2011/{images/, images.txt, image_class_labels.txt, train_test_split.txt,
                     classes.txt} (+ attributes.txt beside the folder, as in the real archive)
  102flowers.tgz     jpg/image_NNNNN.jpg;  imagelabels.mat, setid.mat served as plain files
  images.tar         Images/n<synset>-<breed>/*.jpg;  lists.tar: train_list.mat, test_list.mat, file_list.mat
  a checkpoint       MAE .pth layout {"model": state dict in timm names} of a tiny ViT
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import torch

import fixtures
import gated_prompt as gp

# What `prepare` makes of write_release_fixture(num_classes=3, train_per_class=10, test_per_class=4):
# CUB / Dogs hold out round(30 * vpt_val / (vpt_train + vpt_val)) = 3 of the 30 official training images;
# Flowers uses its own trnid / valid / tstid (5 / 5 / 4 per class).
EXPECTED_SPLITS = {"cub": {"train": 27, "val": 3, "test": 12},
                   "flowers": {"train": 15, "val": 15, "test": 12},
                   "dogs": {"train": 27, "val": 3, "test": 12}}


def _tar_bytes(root: Path, members: list[str], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name in members:
            tar.add(root / name, arcname=name)
    return buffer.getvalue()


def build_release_files(workdir: str | Path) -> dict[str, bytes]:
    """{file name as served: bytes} for the three automatic datasets."""
    import scipy.io
    workdir = Path(workdir)
    files = {}

    cub_top = workdir / "cub"
    cub = fixtures.write_release_fixture(cub_top / "CUB_200_2011", "cub")
    cids = sorted({int(line.split()[1]) for line in (cub / "image_class_labels.txt").read_text().splitlines()})
    (cub / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in cids))
    (cub_top / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    files["CUB_200_2011.tgz"] = _tar_bytes(cub_top, ["CUB_200_2011", "attributes.txt"], "w:gz")

    flowers = fixtures.write_release_fixture(workdir / "flowers", "flowers")
    files["102flowers.tgz"] = _tar_bytes(flowers, ["jpg"], "w:gz")
    for name in ("imagelabels.mat", "setid.mat"):
        files[name] = (flowers / name).read_bytes()

    dogs = fixtures.write_release_fixture(workdir / "dogs", "dogs")
    lists = [scipy.io.loadmat(dogs / name, squeeze_me=True) for name in ("train_list.mat", "test_list.mat")]
    all_files = [str(f) for m in lists for f in np.atleast_1d(m["file_list"])]
    scipy.io.savemat(dogs / "file_list.mat", {
        "file_list": fixtures._cell_column(all_files),
        "annotation_list": fixtures._cell_column([f.removesuffix(".jpg") for f in all_files]),
        "labels": np.concatenate([np.atleast_1d(m["labels"]) for m in lists]).astype(np.float64).reshape(-1, 1)})
    files["images.tar"] = _tar_bytes(dogs, ["Images"], "w")
    files["lists.tar"] = _tar_bytes(dogs, ["file_list.mat", "test_list.mat", "train_list.mat"], "w")
    return files


def tiny_model(depth: int = 2) -> gp.VisionTransformer:
    """A 32-wide ViT of `depth` blocks at 32 px (4 patches) with MAE pooling and no head."""
    return gp.VisionTransformer(gp.vit_config("vit_base", "mae", embed_dim=32, depth=depth, num_heads=2, img_size=32),
                                gp.prompt_config("linear", num_classes=0))


def tiny_checkpoint(depth: int = 2, seed: int = 0) -> bytes:
    """A tiny backbone saved like mae_pretrain_vit_base.pth: {"model": state dict in timm names}."""
    torch.manual_seed(seed)
    model = tiny_model(depth)
    buffer = io.BytesIO()
    torch.save({"model": {k: v.clone() for k, v in model.backbone_state_dict().items()}}, buffer)
    return buffer.getvalue()


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
