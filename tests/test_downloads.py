"""Tests for downloads.py, fully offline: the release files are served by a local HTTP server started here
(127.0.0.1, port 0) and reached through the mirror mechanism, exactly as a lab mirror would be."""
import collections
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import release_archives as ra  # noqa: E402
import downloads as dl  # noqa: E402
import gated_prompt as gp  # noqa: E402
import runtime  # noqa: E402

CKPT = "mae_pretrain_vit_base.pth"
COMMAND = "python reproduce.py download --ssl mae --arch vit_base"


class Server:
    """Serves {name: bytes} under /mirror/<name>; records every request; injectable faults per file:
    an HTTP status code, or "truncate" (send the full Content-Length, half the bytes, then close)."""

    def __init__(self):
        self.files, self.requests, self.faults = {}, [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.serve(body=False)

            def do_GET(self):
                self.serve(body=True)

            def serve(self, body):
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                server.requests.append((self.command, name))
                fault, methods = server.faults.get(name, (None, ()))
                if isinstance(fault, int) and self.command in methods:
                    self.send_error(fault)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                blob = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    truncate = fault == "truncate" and self.command in methods
                    self.wfile.write(blob[:len(blob) // 2] if truncate else blob)
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.mirror = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"

    def gets(self):
        return [name for method, name in self.requests if method == "GET"]


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    files = ra.build_release_files(tmp_path_factory.mktemp("release"))
    files[CKPT] = ra.tiny_checkpoint()
    return files


@pytest.fixture(scope="module")
def _server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def server(_server, release_files, monkeypatch):
    """The server with fresh counters, and the download tables pointed at the fixtures' checksums."""
    _server.files, _server.requests, _server.faults = dict(release_files), [], {}
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    patched = {}
    for name, src in dl.DATASETS.items():
        files = tuple(dl.SourceFile(f.url, md5=ra.md5(release_files[dl.url_filename(f.url)]) if f.md5 else None,
                                    approx_size=f.approx_size, unpack=f.unpack) for f in src.files)
        patched[name] = dl.DatasetSource(src.title, src.folder, files, src.inner, src.expect, src.page)
    monkeypatch.setattr(dl, "DATASETS", patched)
    blob = release_files[CKPT]
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), dl.Checkpoint(
        CKPT, dl.CHECKPOINTS[("vit_base", "mae")].url, sha256=ra.sha256(blob), size=len(blob)))
    return _server


def tiny_factory():
    return ra.tiny_model()


def fetch_ckpt(tmp_path, server, **kw):
    kw.setdefault("mirror", server.mirror)
    return dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints", download=True,
                              model_factory=tiny_factory, **kw)


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []

# --- mirrors ----------------------------------------------------------------------------------------


def test_mirror_url_keeps_file_names_strips_queries_and_reads_the_environment(monkeypatch):
    cub = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    assert dl.mirror_url(cub, None) == cub
    assert dl.mirror_url(cub, "http://proxy.lab:8080/gpt/") == "http://proxy.lab:8080/gpt/CUB_200_2011.tgz"
    assert dl.mirror_url(cub, "file:///shared/mirror") == "file:///shared/mirror/CUB_200_2011.tgz"
    ck = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"
    assert dl.mirror_url(ck, "http://m/x") == "http://m/x/linear-vit-b-300ep.pth.tar"
    monkeypatch.setenv(dl.MIRROR_ENV, "http://env-mirror/files")
    assert dl.mirror_url(cub) == "http://env-mirror/files/CUB_200_2011.tgz"
    assert dl.mirror_url(cub, "http://explicit") == "http://explicit/CUB_200_2011.tgz"  # the argument wins
    # every served file keeps a distinct name on a flat mirror
    names = [dl.url_filename(f.url) for s in dl.DATASETS.values() for f in s.files]
    names += [c.filename for c in dl.CHECKPOINTS.values()]
    assert len(names) == len(set(names)) and all(dl.url_filename(c.url) == c.filename for c in dl.CHECKPOINTS.values())


def test_checkpoint_download_through_the_environment_mirror(server, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.MIRROR_ENV, server.mirror)
    path = fetch_ckpt(tmp_path, server, mirror=None)
    assert path.read_bytes() == server.files[CKPT] and server.gets() == [CKPT]

# --- datasets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,folder,served", [
    ("cub", "cub", ["CUB_200_2011.tgz"]),
    ("flowers", "flowers", ["102flowers.tgz", "imagelabels.mat", "setid.mat"]),
    ("dogs", "dogs", ["images.tar", "lists.tar"]),
])
def test_fetch_dataset_downloads_unpacks_prepares_and_marks_ready(server, tmp_path, dataset, folder, served):
    data_dir = tmp_path / "data"
    root = dl.fetch_dataset(dataset, data_dir, mirror=server.mirror)
    assert root == data_dir / folder and sorted(server.gets()) == sorted(served)
    for split, n in ra.EXPECTED_SPLITS[dataset].items():
        anno = json.loads((root / f"{split}.json").read_text())
        assert len(anno) == n
        image_root = root / {"cub": "images", "flowers": "", "dogs": "Images"}[dataset]
        assert all((image_root / key).is_file() for key in anno)
    for entry in dl.DATASETS[dataset].expect:
        assert (root / entry).exists()
    marker = json.loads((root / dl.READY_MARKER).read_text())
    assert marker["dataset"] == dataset and marker["split_sizes"] == ra.EXPECTED_SPLITS[dataset]
    assert sorted(f["name"] for f in marker["files"]) == sorted(served)
    assert all(f["sha256"] == ra.sha256(server.files[f["name"]]) for f in marker["files"])
    # archives kept in downloads/, recorded in its SHA256SUMS; nothing else is left in data/
    records = dl.read_sums(data_dir / "downloads" / dl.SUMS_NAME)
    assert {n: r for n, r in records.items()} == {n: (ra.sha256(server.files[n]), len(server.files[n])) for n in served}
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(["downloads", folder])
    if dataset == "cub":  # the archive's top-level extras stay out of the dataset folder
        assert not (root / "attributes.txt").exists() and (root / "classes.txt").is_file()
    assert dl.dataset_ready(dataset, data_dir)
    # a second call: no request at all, and the ready folder is left as it is
    before, inode = len(server.requests), root.stat().st_ino
    assert dl.fetch_dataset(dataset, data_dir, mirror=server.mirror) == root
    assert len(server.requests) == before and root.stat().st_ino == inode


def test_interrupted_dataset_download_leaves_nothing_usable_and_a_rerun_succeeds(server, tmp_path):
    data_dir = tmp_path / "data"
    server.faults["CUB_200_2011.tgz"] = ("truncate", {"GET"})
    with pytest.raises(dl.DownloadError, match=r"closed early.*got \d+ of \d+ bytes"):
        dl.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert leftovers(data_dir) == ["downloads"]  # no archive, no partial, no dataset folder, no marker
    assert not dl.dataset_ready("cub", data_dir)
    server.faults.clear()
    root = dl.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert dl.dataset_ready("cub", data_dir) and len(json.loads((root / "test.json").read_text())) == 12


def test_interruption_while_unpacking_or_preparing_resumes_from_the_kept_archives(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    real_prepare = dl.releases.prepare

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl.releases, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.fetch_dataset("flowers", data_dir, mirror=server.mirror)
    assert not (data_dir / "flowers").exists() and not dl.dataset_ready("flowers", data_dir)
    assert sorted(p.name for p in (data_dir / "downloads").iterdir()) == \
        ["102flowers.tgz", "SHA256SUMS", "imagelabels.mat", "setid.mat"]
    # a killed process may also leave a half-unpacked staging folder and a partial download behind
    (data_dir / ".flowers.unpacking" / "jpg").mkdir(parents=True)
    (data_dir / ".flowers.unpacking" / "jpg" / "image_99999.jpg").write_bytes(b"half a jpeg")
    (data_dir / "downloads" / "setid.mat.partial.0123abcd.partial").write_bytes(b"half")
    monkeypatch.setattr(dl.releases, "prepare", real_prepare)
    server.requests.clear()
    root = dl.fetch_dataset("flowers", data_dir, mirror=server.mirror)
    assert server.gets() == [] and dl.dataset_ready("flowers", data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["downloads", "flowers"]
    assert not list((data_dir / "downloads").glob("*.partial"))
    assert len(json.loads((root / "val.json").read_text())) == 15 and not (root / "jpg" / "image_99999.jpg").exists()


def test_archive_md5_mismatch_is_refused(server, tmp_path, monkeypatch):
    src = dl.DATASETS["flowers"]
    bad = dl.SourceFile(src.files[1].url, md5="0" * 32, unpack=False)
    monkeypatch.setitem(dl.DATASETS, "flowers", dl.DatasetSource(
        src.title, src.folder, (src.files[0], bad, src.files[2]), src.inner, src.expect, src.page))
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch_dataset("flowers", tmp_path / "data", mirror=server.mirror)
    message = str(err.value)
    assert "md5 mismatch" in message and "0" * 32 in message and ra.md5(server.files["imagelabels.mat"]) in message
    assert "imagelabels.mat" in message
    assert not (tmp_path / "data" / "downloads" / "imagelabels.mat").exists()
    assert not (tmp_path / "data" / "flowers").exists()


def test_kept_archive_changed_on_disk_is_refused_against_its_record(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setattr(dl.releases, "prepare", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        dl.fetch_dataset("dogs", data_dir, mirror=server.mirror)
    lists = data_dir / "downloads" / "lists.tar"
    blob = bytearray(lists.read_bytes())
    blob[100] ^= 1
    lists.write_bytes(bytes(blob))
    with pytest.raises(dl.DownloadError, match=r"lists\.tar: SHA-256 mismatch against the record.*rm .*lists\.tar"):
        dl.fetch_dataset("dogs", data_dir, mirror=server.mirror)


@pytest.mark.parametrize("code", [404, 500])
def test_server_errors_name_the_url(server, tmp_path, code):
    server.faults["images.tar"] = (code, {"HEAD", "GET"})
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch_dataset("dogs", tmp_path / "data", mirror=server.mirror)
    assert f"{server.mirror}/images.tar: HTTP {code}" in str(err.value)
    assert not (tmp_path / "data" / "dogs").exists()


def test_server_error_during_the_download_itself(server, tmp_path):
    server.faults[CKPT] = (500, {"GET"})  # HEAD answers, the GET fails
    with pytest.raises(dl.DownloadError, match=f"{server.mirror}/{CKPT}: HTTP 500"):
        fetch_ckpt(tmp_path, server)
    assert leftovers(tmp_path / "checkpoints") == []


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.DownloadError, match=f"cannot reach http://127.0.0.1:{port}/m/CUB_200_2011.tgz"):
        dl.fetch_dataset("cub", tmp_path / "data", mirror=f"http://127.0.0.1:{port}/m")


def test_unsafe_archive_member_is_refused(server, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    server.files["lists.tar"] = buffer.getvalue()  # dogs has no published md5: any lists.tar is accepted
    with pytest.raises(dl.DownloadError, match="lists.tar: damaged or unsafe archive"):
        dl.fetch_dataset("dogs", tmp_path / "data", mirror=server.mirror)
    assert not (tmp_path / "data" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "data" / "dogs").exists()


def test_disk_space_refusal_before_any_download(server, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(dl.DownloadError, match=r"not enough free disk space.*1\.00 kB free"):
        dl.fetch_dataset("cub", tmp_path / "data", mirror=server.mirror)
    with pytest.raises(dl.DownloadError, match="not enough free disk space"):
        fetch_ckpt(tmp_path, server)
    assert server.gets() == []
    assert not (tmp_path / "data" / "cub").exists() and not (tmp_path / "checkpoints" / CKPT).exists()


def test_existing_user_folder_is_used_or_refused_never_deleted(server, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "cub").mkdir(parents=True)
    (data_dir / "cub" / "my_notes.txt").write_text("mine")
    with pytest.raises(dl.DownloadError, match="not created by the downloader"):
        dl.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert (data_dir / "cub" / "my_notes.txt").read_text() == "mine"
    for split in ("train", "val", "test"):
        (data_dir / "cub" / f"{split}.json").write_text("{}")
    assert dl.fetch_dataset("cub", data_dir, mirror=server.mirror) == data_dir / "cub"
    assert server.requests == []


@pytest.mark.parametrize("task,expected", [
    ("cars", ["data/cars/cars_train", "devkit/cars_train_annos.mat", "prepare --dataset cars"]),
    ("nabirds", ["sign-up", "data/nabirds", "prepare --dataset nabirds"]),
    ("dtd", ["data/vtab-1k/dtd/{train800,val200,train800val200,test}.txt", "RepAdapter"]),
    ("ade20k", ["data/ADEChallengeData2016/images/{training,validation}", "ADEChallengeData2016.zip"]),
])
def test_instructions_only_datasets(tmp_path, task, expected):
    text = dl.dataset_instructions(task)
    assert all(piece in text for piece in expected), text
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch_dataset(task, "data")
    assert str(err.value) == text
    assert "CUB_200_2011.tgz" in dl.dataset_instructions("cub") and "data/downloads" in dl.dataset_instructions("cub")

# --- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_download_verifies_records_and_loads(server, tmp_path, capsys):
    path = fetch_ckpt(tmp_path, server)
    blob = server.files[CKPT]
    assert path == tmp_path / "checkpoints" / CKPT and path.read_bytes() == blob
    assert server.gets() == [CKPT]
    out = capsys.readouterr().out
    assert f"size: {dl.format_bytes(len(blob))}" in out and "free disk space" in out
    sums = tmp_path / "checkpoints" / dl.SUMS_NAME
    assert dl.read_sums(sums) == {CKPT: (ra.sha256(blob), len(blob))}
    text = sums.read_text()
    assert f"{ra.sha256(blob)}  {CKPT}\n" in text and f"# size {len(blob)} {CKPT}\n" in text
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])
    if shutil.which("sha256sum"):  # the record is a valid sha256sum -c file
        check = subprocess.run(["sha256sum", "-c", dl.SUMS_NAME], cwd=path.parent, capture_output=True, text=True)
        assert check.returncode == 0 and f"{CKPT}: OK" in check.stdout
    model = ra.tiny_model()
    gp.load_backbone(model, path)
    torch.manual_seed(0)
    assert torch.equal(model.pos_embed, ra.tiny_model().pos_embed)  # the checkpoint's values were loaded
    # later calls verify without downloading, with or without download=True
    assert fetch_ckpt(tmp_path, server) == path
    assert dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints") == path
    assert server.gets() == [CKPT]


def test_interrupted_checkpoint_download_leaves_no_file_and_a_rerun_succeeds(server, tmp_path):
    server.faults[CKPT] = ("truncate", {"GET"})
    with pytest.raises(dl.DownloadError, match=f"{server.mirror}/{CKPT}: the connection closed early"):
        fetch_ckpt(tmp_path, server)
    assert leftovers(tmp_path / "checkpoints") == []  # no file, no partial, no record
    with pytest.raises(dl.DownloadError, match="not found"):
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    # a killed earlier run's partial file (torch.hub's temporary name) is cleaned up on the rerun
    (tmp_path / "checkpoints" / f"{CKPT}.partial.deadbeef.partial").write_bytes(b"x")
    server.faults.clear()
    path = fetch_ckpt(tmp_path, server)
    assert path.read_bytes() == server.files[CKPT]
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])


def test_corrupted_checkpoint_is_refused_with_the_redownload_command(server, tmp_path):
    path = fetch_ckpt(tmp_path, server)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(dl.DownloadError) as err:
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    message = str(err.value)
    assert str(path) in message and f"SHA-256 mismatch against the record in {path.parent / dl.SUMS_NAME}" in message
    assert ra.sha256(server.files[CKPT]) in message and ra.sha256(bytes(blob)) in message  # expected vs found
    assert f"rm {path}" in message and COMMAND in message
    assert isinstance(err.value, runtime.UserError)
    path.unlink()  # the fix the message gives
    assert fetch_ckpt(tmp_path, server).read_bytes() == server.files[CKPT]


def test_missing_checkpoint_without_download_names_path_url_and_command(tmp_path, monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    with pytest.raises(dl.DownloadError) as err:
        dl.checkpoint_path("vit_base", "mocov3", tmp_path / "ck")
    message = str(err.value)
    ck = dl.CHECKPOINTS[("vit_base", "mocov3")]
    assert str(tmp_path / "ck" / ck.filename) in message and ck.url in message
    assert "python reproduce.py download --ssl mocov3 --arch vit_base" in message and "--download" in message
    assert not (tmp_path / "ck").exists()
    with pytest.raises(dl.DownloadError, match="no official mocov3 checkpoint for vit_huge"):
        dl.checkpoint_path("vit_huge", "mocov3", tmp_path / "ck")


def test_checkpoint_that_does_not_load_is_deleted_and_reported(server, tmp_path, monkeypatch):
    blob = ra.tiny_checkpoint(depth=3)  # one block too many for the model
    server.files[CKPT] = blob
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), dl.Checkpoint(CKPT, dl.CHECKPOINTS[("vit_base", "mae")].url))
    with pytest.raises(dl.DownloadError, match=r"does not load as a vit_base backbone(.|\n)*unexpected backbone keys"):
        fetch_ckpt(tmp_path, server)
    assert leftovers(tmp_path / "checkpoints") == []


def test_published_checksum_mismatch_is_reported(server, tmp_path, monkeypatch, release_files):
    blob = release_files[CKPT]
    published = dl.Checkpoint(CKPT, dl.CHECKPOINTS[("vit_base", "mae")].url, sha256="ab" * 32, size=len(blob))
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), published)
    with pytest.raises(dl.DownloadError) as err:
        fetch_ckpt(tmp_path, server)
    assert "SHA-256 mismatch against the published checksum" in str(err.value)
    assert "ab" * 32 in str(err.value) and ra.sha256(blob) in str(err.value)
    assert leftovers(tmp_path / "checkpoints") == []
    # a file put in place by hand is checked against the published value before its first use
    (tmp_path / "checkpoints" / CKPT).write_bytes(blob)
    with pytest.raises(dl.DownloadError, match="published checksum"):
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints" / dl.SUMS_NAME).exists()


def test_hand_placed_checkpoint_is_recorded_on_first_use(server, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / CKPT).write_bytes(server.files[CKPT])
    path = dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    assert dl.read_sums(path.parent / dl.SUMS_NAME)[CKPT][0] == ra.sha256(server.files[CKPT])
    assert server.requests == []


def test_real_tables_and_describe():
    mae = dl.CHECKPOINTS[("vit_base", "mae")]
    assert (mae.size, mae.sha256) == (343_249_461, "aec5f0b68e5f3193a00b07bc65a37440db549c15b36b8bea242606cc40c4bc5d")
    assert set(dl.CHECKPOINTS) == {("vit_base", "mae"), ("vit_large", "mae"), ("vit_huge", "mae"),
                                   ("vit_base", "mocov3"), ("vit_small", "mocov3")}
    assert dl.DATASETS["cub"].files[0].md5 == "97eceeb196236b17998738112f37df78"
    assert dl.estimated_checkpoint_bytes("vit_base") == pytest.approx(mae.size, rel=0.001)
    rows = dl.describe()
    automatic = {r["name"] for r in rows if r["automatic"]}
    assert {"cub", "flowers", "dogs", "mae vit_base", "mocov3 vit_base"} <= automatic
    assert {r["name"] for r in rows if not r["automatic"]} == {"cars", "nabirds", "vtab-1k", "ade20k"}
    assert "343.25 MB" in dl.describe_table()


def test_download_errors_are_user_errors():
    assert issubclass(dl.DownloadError, runtime.UserError)
    assert os.path.basename(dl.__file__) == "downloads.py"


# --- the whole path through the harness -------------------------------------------------------------

def test_one_command_from_nothing_to_a_trained_epoch(server, tmp_path):
    """What `reproduce.py --task cub --download` does: the checkpoint is fetched and checked against the run's
    own architecture, CUB is fetched, unpacked and split, and an epoch trains on it."""
    import recipes
    import reproduce
    cfg = recipes.resolve("cub", "mae", arch_overrides=dict(embed_dim=32, depth=2, num_heads=2), img_size=32,
                          num_classes=3, epochs=1, warmup_epochs=0, batch_size=8)
    settings = runtime.Settings(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"),
                                checkpoint_dir=str(tmp_path / "checkpoints"), download=True, mirror=server.mirror,
                                quiet=True)
    result = reproduce.run_one(cfg, "final", settings)
    assert len(result["history"]) == 1 and 0 <= result["final"]["test_acc"] <= 100
    assert result["history"][0]["images_per_second"] > 0
    assert dl.dataset_ready("cub", tmp_path / "data") and (tmp_path / "checkpoints" / dl.SUMS_NAME).is_file()
    assert sorted(set(server.gets())) == ["CUB_200_2011.tgz", CKPT]
    server.requests.clear()
    assert reproduce.run_one(cfg, "final", settings) == result and server.gets() == []   # nothing fetched again


def test_a_server_error_exits_2_with_the_url(server, tmp_path):
    server.faults[CKPT] = (500, ("GET", "HEAD"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "reproduce.py"), "download", "--ssl", "mae", "--arch", "vit_base",
                          "--mirror", server.mirror], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"{server.mirror}/{CKPT}" in out.stderr and "500" in out.stderr
    assert leftovers(tmp_path / "checkpoints") in ([], [dl.SUMS_NAME])
