"""Test fixtures for downloads.py and releases.py: the files the real hosts serve, tiny but in the real release
formats.

  CUB_200_2011.tgz   CUB_200_2011/{images/, images.txt, image_class_labels.txt, train_test_split.txt,
                     classes.txt} (+ attributes.txt beside the folder, as in the real archive)
  102flowers.tgz     jpg/image_NNNNN.jpg;  imagelabels.mat, setid.mat served as plain files
  images.tar         Images/n<synset>-<breed>/*.jpg;  lists.tar: train_list.mat, test_list.mat, file_list.mat
  a checkpoint       MAE .pth layout {"model": state dict in timm names} of a tiny ViT

`fixture_tables(files)` gives the download tables (downloads.CHECKPOINTS, releases.DATASETS) with every pin
replaced by the fixture files' own values (same kinds, same prefix lengths): the checking logic runs as it does
on the real files. Run as a script, this
file installs those tables in a real process and then runs the CLI or a tiny training run, e.g.

    python tests/release_archives.py PINS.json reproduce download --ssl mae --arch vit_base --mirror URL \
        --and download --dataset dogs --mirror URL
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/release_archives.py PINS.json \
        tiny-run RESULTS_DIR DATA_DIR CHECKPOINT_DIR MIRROR

PINS.json: {file name: {"size": bytes, "sha256": hex, "md5": hex}} of the served files (`pins_json`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from harness import downloads as dl  # noqa: E402
from harness.data import releases as rel  # noqa: E402
import fixtures  # noqa: E402
import gated_prompt as gp  # noqa: E402

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


class Server:
    """Serves {name: bytes} under /mirror/<name>; records every request as (method, name, Range header).

    Per file: faults[name] = (HTTP status, methods) or ("truncate", methods) (the full Content-Length, half the
    bytes, then close); gates[name] = threading.Event: half the body, then wait for the event before the rest
    (halfway[name] is set when the first half is out); redirect = {names}: /mirror/<name> answers 302 to
    /s3/<name>?signature (faults then apply at /s3/, like a presigned S3 URL). HTTP Range "bytes=N-" is honoured
    (206) unless honour_range is False."""

    def __init__(self):
        self.files, self.requests, self.faults, self.gates, self.halfway = {}, [], {}, {}, {}
        self.redirect, self.honour_range = set(), True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.serve(body=False)

            def do_GET(self):
                self.serve(body=True)

            def serve(self, body):
                where, name = self.path.split("?")[0].split("/")[-2:]
                server.requests.append((self.command, name, self.headers.get("Range")))
                if where == "mirror" and name in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"/s3/{name}?X-Amz-Signature=abc")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fault, methods = server.faults.get(name, (None, ()))
                if isinstance(fault, int) and self.command in methods:
                    self.send_error(fault)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                blob, start = server.files[name], 0
                asked = self.headers.get("Range")
                if asked and server.honour_range:
                    start = int(asked.removeprefix("bytes=").removesuffix("-"))
                    if start >= len(blob):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(blob)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(blob) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not body:
                    return
                rest, half = blob[start:], (len(blob) - start) // 2
                if fault == "truncate" and self.command in methods:
                    rest = rest[:half]
                if name in server.gates:
                    self.wfile.write(rest[:half])
                    self.wfile.flush()
                    server.halfway.setdefault(name, threading.Event()).set()
                    server.gates[name].wait(timeout=120)
                    rest = rest[half:]
                self.wfile.write(rest)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # polling every 0.02 s: close() waits for the current poll (0.5 s at the default interval)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.mirror = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self):
        return [name for method, name, _ in self.requests if method == "GET"]

    def ranges(self, name):
        return [asked for method, n, asked in self.requests if method == "GET" and n == name]


def pins_json(files: dict[str, bytes]) -> dict[str, dict]:
    return {name: {"size": len(blob), "sha256": sha256(blob), "md5": md5(blob)} for name, blob in files.items()}


def _fixture_pins(pins: tuple, values: dict) -> tuple:
    """Each pin with the fixture file's value of its kind (a prefix pin stays a prefix of the same length)."""
    return tuple(dataclasses.replace(p, value=values["size"] if p.kind == "size" else values[p.kind][:len(p.value)])
                 for p in pins)


def fixture_tables(values: dict[str, dict]) -> tuple[dict, dict]:
    """(downloads.CHECKPOINTS, releases.DATASETS) with the pins of the files in `values` (pins_json) replaced."""
    checkpoints = {key: dataclasses.replace(ck, pins=_fixture_pins(ck.pins, values[ck.filename]))
                   if ck.filename in values else ck for key, ck in dl.CHECKPOINTS.items()}
    datasets = {}
    for name, src in rel.DATASETS.items():
        files = tuple(dataclasses.replace(f, pins=_fixture_pins(f.pins, values[dl.url_filename(f.url)]))
                      if dl.url_filename(f.url) in values else f for f in src.files)
        datasets[name] = dataclasses.replace(src, files=files)
    return checkpoints, datasets


def _tiny_run(results_dir, data_dir, checkpoint_dir, mirror):
    """What `reproduce.py --task cub --download` does, with a tiny ViT (under torchrun: every rank)."""
    from harness import config
    from harness import runs
    from harness import runtime
    runtime.init_distributed()
    cfg = config.resolve("cub", "mae", arch_overrides=dict(embed_dim=32, depth=2, num_heads=2), img_size=32,
                          num_classes=3, epochs=1, warmup_epochs=0, batch_size=8)
    settings = runtime.Settings(results_dir=results_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir,
                                download=True, mirror=mirror, quiet=True)
    runs.run_one(cfg, "final", settings)


def main(argv: list[str]) -> int:
    from harness import runtime
    dl.CHECKPOINTS, rel.DATASETS = fixture_tables(json.loads(Path(argv[0]).read_text()))
    dl._default_model = lambda arch, ssl: tiny_model()  # what `download` checks a checkpoint against
    try:
        if argv[1] == "tiny-run":
            _tiny_run(*argv[2:])
        else:
            assert argv[1] == "reproduce", argv
            import reproduce
            commands = " ".join(argv[2:]).split(" --and ")  # several reproduce.py commands, one after the other
            for command in commands:
                reproduce.main(command.split())
    except runtime.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return runtime.EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
