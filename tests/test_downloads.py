"""Tests for downloads.py and the dataset fetching of releases.py, fully offline: the release files are served by
a local HTTP server started here (127.0.0.1, port 0) and reached through the mirror mechanism, exactly as a lab
mirror would be."""
import collections
import dataclasses
import errno
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import process_of, start_forkserver, wait_until
import release_archives as ra
import reproduce
from harness import downloads as dl
from harness.data import releases as rel
import gated_prompt as gp
from harness import runtime

CKPT = "mae_pretrain_vit_base.pth"
COMMAND = "python reproduce.py download --ssl mae --arch vit_base"
start_forkserver()   # the real processes below fork from it; its imports run meanwhile


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    files = ra.build_release_files(tmp_path_factory.mktemp("release"))
    files[CKPT] = ra.tiny_checkpoint()
    return files


@pytest.fixture(scope="module")
def _server():
    s = ra.Server()
    yield s
    s.close()


@pytest.fixture
def server(_server, release_files, monkeypatch):
    """The server with fresh counters, and the download tables' pins replaced by the fixture files' values."""
    _server.files, _server.requests, _server.faults = dict(release_files), [], {}
    _server.gates, _server.halfway, _server.redirect, _server.honour_range = {}, {}, set(), True
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    checkpoints, datasets = ra.fixture_tables(ra.pins_json(release_files))
    monkeypatch.setattr(dl, "CHECKPOINTS", checkpoints)
    monkeypatch.setattr(rel, "DATASETS", datasets)
    return _server


def unpin(monkeypatch, dataset, *names):
    """Drop the pins of some files of a dataset (what an unpinned download meets)."""
    src = rel.DATASETS[dataset]
    files = tuple(dataclasses.replace(f, pins=()) if dl.url_filename(f.url) in names else f for f in src.files)
    monkeypatch.setitem(rel.DATASETS, dataset, dataclasses.replace(src, files=files))


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
    names = [dl.url_filename(f.url) for s in rel.DATASETS.values() for f in s.files]
    names += [c.filename for c in dl.CHECKPOINTS.values()]
    assert len(names) == len(set(names)) and all(dl.url_filename(c.url) == c.filename for c in dl.CHECKPOINTS.values())


@pytest.mark.parametrize("mirror", ["junk", "ftp://host/files", "http://", "https:///no-host", "file:", ":8080/x",
                                    "http://host:port/files"])
@pytest.mark.parametrize("how", ["environment", "flag"])
def test_a_mirror_that_is_not_a_base_url_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, mirror, how):
    import reproduce
    argv = ["download", "--ssl", "mae", "--arch", "vit_base", "--checkpoint-dir", str(tmp_path / "ck")]
    if how == "environment":
        monkeypatch.setenv(dl.MIRROR_ENV, mirror)
    else:
        monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
        argv += ["--mirror", mirror]
    for command in (argv, ["download", "--dataset", "cub", "--data-dir", str(tmp_path / "data")]
                    + argv[-2 if how == "flag" else len(argv):]):
        assert reproduce.cli_main(command) == 2
        err = capsys.readouterr().err.strip()
        name = dl.MIRROR_ENV if how == "environment" else "--mirror"
        assert len(err.splitlines()) == 1 and f"{name} {mirror!r} is not a base URL" in err, err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--data-dir"])
def test_a_download_folder_that_is_a_file_or_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, flag):
    import reproduce
    (tmp_path / "notes.txt").write_text("a file")
    what = ["--dataset", "cub"] if flag == "--data-dir" else []
    for folder in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "below"):
        assert reproduce.cli_main(["download", *what, flag, str(folder), "--mirror", "http://127.0.0.1:9"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{tmp_path / 'notes.txt'} is a file, not a folder" in err, err
    assert reproduce.cli_main(["download", *what, flag, "/proc/no-such", "--mirror", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} /proc/no-such: cannot write in /proc" in err, err
    assert (tmp_path / "notes.txt").read_text() == "a file"


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
    root = rel.fetch_dataset(dataset, data_dir, mirror=server.mirror)
    assert root == data_dir / folder and sorted(server.gets()) == sorted(served)
    for split, n in ra.EXPECTED_SPLITS[dataset].items():
        anno = json.loads((root / f"{split}.json").read_text())
        assert len(anno) == n
        image_root = root / {"cub": "images", "flowers": "", "dogs": "Images"}[dataset]
        assert all((image_root / key).is_file() for key in anno)
    for entry in rel.DATASETS[dataset].expect:
        assert (root / entry).exists()
    marker = json.loads((root / rel.READY_MARKER).read_text())
    assert marker["dataset"] == dataset and marker["split_sizes"] == ra.EXPECTED_SPLITS[dataset]
    assert sorted(f["name"] for f in marker["files"]) == sorted(served)
    assert all(f["sha256"] == ra.sha256(server.files[f["name"]]) for f in marker["files"])
    # archives kept in downloads/, recorded in its SHA256SUMS; nothing else is left in data/
    records = dl.read_sums(data_dir / "downloads" / dl.SUMS_NAME)
    assert {n: r for n, r in records.items()} == {n: (ra.sha256(server.files[n]), len(server.files[n])) for n in served}
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(["downloads", folder])
    if dataset == "cub":  # the archive's top-level extras stay out of the dataset folder
        assert not (root / "attributes.txt").exists() and (root / "classes.txt").is_file()
    assert rel.dataset_ready(dataset, data_dir)
    # a second call: no request at all, and the ready folder is left as it is
    before, inode = len(server.requests), root.stat().st_ino
    assert rel.fetch_dataset(dataset, data_dir, mirror=server.mirror) == root
    assert len(server.requests) == before and root.stat().st_ino == inode


def test_interrupted_dataset_download_resumes_with_http_range(server, tmp_path):
    data_dir = tmp_path / "data"
    blob = server.files["CUB_200_2011.tgz"]
    server.faults["CUB_200_2011.tgz"] = ("truncate", {"GET"})
    with pytest.raises(dl.DownloadError, match=r"closed early.*got \d+ of \d+ bytes.*kept.*resume"):
        rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    # no archive, no dataset folder, no marker, no record; the bytes received are kept for the rerun
    assert leftovers(data_dir) == ["downloads", "downloads/CUB_200_2011.tgz.partial"]
    assert (data_dir / "downloads" / "CUB_200_2011.tgz.partial").read_bytes() == blob[:len(blob) // 2]
    assert not rel.dataset_ready("cub", data_dir)
    server.faults.clear()
    root = rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert server.ranges("CUB_200_2011.tgz") == [None, f"bytes={len(blob) // 2}-"]
    assert (data_dir / "downloads" / "CUB_200_2011.tgz").read_bytes() == blob
    assert rel.dataset_ready("cub", data_dir) and len(json.loads((root / "test.json").read_text())) == 12


def test_a_host_that_ignores_range_is_downloaded_again_from_byte_0(server, tmp_path, capsys):
    data_dir = tmp_path / "data"
    blob = server.files["CUB_200_2011.tgz"]
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "CUB_200_2011.tgz.partial").write_bytes(blob[:1000])
    server.honour_range = False
    rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert server.ranges("CUB_200_2011.tgz") == ["bytes=1000-"]  # asked, answered 200 with the whole file
    assert (data_dir / "downloads" / "CUB_200_2011.tgz").read_bytes() == blob
    assert "does not resume downloads; starting again from byte 0" in capsys.readouterr().out


def test_a_complete_kept_partial_is_checked_without_downloading_again(server, tmp_path):
    """Killed after the last byte, before the check: the host answers the Range request with 416 and the
    file's size, and the kept bytes are checked and used."""
    blob = server.files[CKPT]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"{CKPT}.partial").write_bytes(blob)
    assert fetch_ckpt(tmp_path, server).read_bytes() == blob
    assert server.ranges(CKPT) == [f"bytes={len(blob)}-"]
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])


def download_command(tmp_path, server, *more):
    """The arguments of release_archives.main for `reproduce.py download` of the checkpoint (then `more`) from the
    server, with the tables' pins replaced by the fixture files' values."""
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps(ra.pins_json(server.files)))
    return [str(pins), "reproduce", "download", "--ssl", "mae", "--arch", "vit_base", "--mirror", server.mirror,
            *more]


def test_a_killed_download_process_is_resumed_by_the_next_one(server, tmp_path):
    """A real process killed (SIGKILL) mid-download: its lock dies with it, the partial file stays, and the next
    command asks for the rest (HTTP Range) and gets a file that verifies."""
    blob = server.files[CKPT]
    server.gates[CKPT], server.halfway[CKPT] = threading.Event(), threading.Event()
    command = download_command(tmp_path, server)
    first = process_of(ra.main, command, out=tmp_path / "first.log", cwd=tmp_path)
    try:
        assert server.halfway[CKPT].wait(timeout=120), "the first process never started its download"
        deadline = time.monotonic() + 30
        partial = tmp_path / "checkpoints" / f"{CKPT}.partial"
        while (not partial.is_file() or partial.stat().st_size < len(blob) // 2) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        first.kill()
        first.join()
        server.gates[CKPT].set()
    assert partial.stat().st_size == len(blob) // 2
    del server.gates[CKPT]
    second = process_of(ra.main, command, out=tmp_path / "second.log", cwd=tmp_path)
    second.join(300)
    assert second.exitcode == 0, (tmp_path / "second.log").read_text()
    assert server.ranges(CKPT) == [None, f"bytes={len(blob) // 2}-"]
    assert (tmp_path / "checkpoints" / CKPT).read_bytes() == blob
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])


def test_two_download_commands_at_once_share_one_download(server, tmp_path):
    """Two real `reproduce.py download` processes for the same checkpoint, then the same dataset: the second
    waits for the first's lock, says so, and uses its files; each file is fetched once, nothing is clobbered."""
    for name in (CKPT, "images.tar"):
        server.gates[name], server.halfway[name] = threading.Event(), threading.Event()
    command = download_command(tmp_path, server, "--and", "download", "--dataset", "dogs", "--mirror", server.mirror)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []
    try:
        procs.append(process_of(ra.main, command, out=logs[0], cwd=tmp_path))
        assert server.halfway[CKPT].wait(timeout=120), "the first process never started its download"
        procs.append(process_of(ra.main, command, out=logs[1], cwd=tmp_path))
        second_says = logs[1].read_text
        wait_until(lambda: f"is downloading checkpoints/{CKPT}" in second_says(), 120, second_says)
        server.gates[CKPT].set()  # the first finishes the checkpoint and starts the dataset
        assert server.halfway["images.tar"].wait(timeout=120)
        wait_until(lambda: "is fetching Stanford Dogs" in second_says(), 120, second_says)
        server.gates["images.tar"].set()
        for proc in procs:
            proc.join(300)
    finally:
        for name in server.gates:
            server.gates[name].set()
        for proc in procs:
            proc.kill()
    text = [log.read_text() for log in logs]
    assert [proc.exitcode for proc in procs] == [0, 0], text
    assert sorted(server.gets()) == sorted([CKPT, "images.tar", "lists.tar"]), text  # each file fetched once
    assert f"is downloading checkpoints/{CKPT} (lock checkpoints/{CKPT}.lock)" in text[1]
    assert "is fetching Stanford Dogs into data/dogs (lock data/dogs.lock)" in text[1]
    assert "using its result" in text[1] and "is ready" in text[1]
    assert (tmp_path / "checkpoints" / CKPT).read_bytes() == server.files[CKPT]
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])
    assert rel.dataset_ready("dogs", tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dogs", "downloads"]  # no lock, no staging


def test_interruption_while_unpacking_or_preparing_resumes_from_the_kept_archives(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    real_prepare = rel.prepare

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rel, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rel.fetch_dataset("flowers", data_dir, mirror=server.mirror)
    assert not (data_dir / "flowers").exists() and not rel.dataset_ready("flowers", data_dir)
    assert sorted(p.name for p in (data_dir / "downloads").iterdir()) == \
        ["102flowers.tgz", "imagelabels.mat", "setid.mat"]  # kept; recorded only once they prepared
    # a killed process may also leave a half-unpacked staging folder and a partial download behind
    (data_dir / ".flowers.unpacking" / "jpg").mkdir(parents=True)
    (data_dir / ".flowers.unpacking" / "jpg" / "image_99999.jpg").write_bytes(b"half a jpeg")
    (data_dir / "downloads" / "setid.mat.partial").write_bytes(b"half")
    monkeypatch.setattr(rel, "prepare", real_prepare)
    server.requests.clear()
    root = rel.fetch_dataset("flowers", data_dir, mirror=server.mirror)
    assert server.gets() == [] and rel.dataset_ready("flowers", data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["downloads", "flowers"]
    assert not list((data_dir / "downloads").glob("*.partial"))
    assert len(json.loads((root / "val.json").read_text())) == 15 and not (root / "jpg" / "image_99999.jpg").exists()


def test_archive_md5_mismatch_is_refused(server, tmp_path, monkeypatch):
    src = rel.DATASETS["flowers"]
    bad = dataclasses.replace(src.files[1], pins=(dl.Pin("md5", "0" * 32, rel.TORCHVISION_FLOWERS),))
    monkeypatch.setitem(rel.DATASETS, "flowers", dataclasses.replace(src, files=(src.files[0], bad, src.files[2])))
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset("flowers", tmp_path / "data", mirror=server.mirror)
    message = str(err.value)
    assert f"md5 mismatch against {rel.TORCHVISION_FLOWERS}" in message and "0" * 32 in message
    assert ra.md5(server.files["imagelabels.mat"]) in message and "imagelabels.mat" in message
    assert not (tmp_path / "data" / "downloads" / "imagelabels.mat").exists()
    assert not (tmp_path / "data" / "flowers").exists()


def test_kept_archive_changed_on_disk_is_refused_against_its_pin(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setattr(rel, "prepare", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        rel.fetch_dataset("dogs", data_dir, mirror=server.mirror)
    lists = data_dir / "downloads" / "lists.tar"
    blob = bytearray(lists.read_bytes())
    blob[100] ^= 1
    lists.write_bytes(bytes(blob))
    with pytest.raises(dl.DownloadError, match=r"lists\.tar: SHA-256 mismatch against the size / SHA-256 published "
                                               r"in TensorFlow Datasets' url_checksums for stanford_dogs.*rm .*lists\.tar"):
        rel.fetch_dataset("dogs", data_dir, mirror=server.mirror)


def test_unpinned_truncated_first_copy_is_not_recorded_and_a_correct_one_is_accepted(server, tmp_path, monkeypatch):
    """A bad first download of a file no checksum vouches for (a mirror serving a cut-off tar as a whole file):
    it fails to unpack, is deleted with no record left, and the correct file downloaded next is accepted."""
    data_dir = tmp_path / "data"
    unpin(monkeypatch, "dogs", "images.tar", "lists.tar")
    good = server.files["images.tar"]
    server.files["images.tar"] = good[:len(good) // 2 // 512 * 512]  # cut at a block edge: still a tar header
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset("dogs", data_dir, mirror=server.mirror)
    message = str(err.value)
    assert "images.tar" in message and "deleted: run the same command again" in message
    assert ".dogs.unpacking" not in message
    assert not (data_dir / "downloads" / "images.tar").exists() and not (data_dir / "downloads" / "lists.tar").exists()
    assert dl.read_sums(data_dir / "downloads" / dl.SUMS_NAME) == {}
    server.files["images.tar"] = good
    root = rel.fetch_dataset("dogs", data_dir, mirror=server.mirror)
    assert rel.dataset_ready("dogs", data_dir) and root == data_dir / "dogs"
    assert dl.read_sums(data_dir / "downloads" / dl.SUMS_NAME)["images.tar"] == (ra.sha256(good), len(good))


def test_full_disk_while_unpacking_is_reported_as_a_full_disk(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    real_extract = tarfile.TarFile.extract

    def no_space(self, member, path="", **kw):
        if member.isfile():  # what a full disk raises, naming the file it was writing
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / member.name))
        return real_extract(self, member, path, **kw)

    monkeypatch.setattr(tarfile.TarFile, "extract", no_space)
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    message = str(err.value)
    size = len(server.files["CUB_200_2011.tgz"])
    assert message.startswith("the disk is full: unpacking CUB_200_2011.tgz into " + str(data_dir))
    assert f"needs about {dl.format_bytes(size)}" in message and "kept" in message
    assert "damaged" not in message and ".cub.unpacking" not in message
    assert (data_dir / "downloads" / "CUB_200_2011.tgz").is_file()  # the archive is fine: kept
    monkeypatch.setattr(tarfile.TarFile, "extract", real_extract)
    server.requests.clear()
    rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert server.gets() == [] and rel.dataset_ready("cub", data_dir)


def test_release_file_errors_name_no_path_inside_the_deleted_staging_folder(server, tmp_path, monkeypatch, release_files):
    buffer = io.BytesIO()  # a CUB archive whose images.txt lists an image no other table knows
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(release_files["CUB_200_2011.tgz"]))) as src, \
            tarfile.open(fileobj=buffer, mode="w:gz") as dst:
        for member in src:
            body = src.extractfile(member) if member.isfile() else None
            if member.name == "CUB_200_2011/images.txt":
                text = body.read() + b"9999 001.Bird_1/missing.jpg\n"
                member.size, body = len(text), io.BytesIO(text)
            dst.addfile(member, body)
    server.files["CUB_200_2011.tgz"] = buffer.getvalue()
    unpin(monkeypatch, "cub", "CUB_200_2011.tgz")
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset("cub", tmp_path / "data", mirror=server.mirror)
    message = str(err.value)
    assert "do not give split files" in message and "image id 9999 of [CUB_200_2011.tgz]/images.txt" in message
    assert ".cub.unpacking" not in message


@pytest.mark.parametrize("redirect", [False, True])
def test_a_host_refusing_head_still_downloads(server, tmp_path, capsys, redirect):
    """CUB's host redirects to a presigned S3 URL, which answers HEAD with 403 (Python >= 3.13 keeps HEAD across
    the redirect): the size is then unknown, the approximate size serves the disk check, and the GET decides."""
    server.faults["CUB_200_2011.tgz"] = (403, {"HEAD"})
    if redirect:
        server.redirect.add("CUB_200_2011.tgz")
    root = rel.fetch_dataset("cub", tmp_path / "data", mirror=server.mirror)
    assert rel.dataset_ready("cub", tmp_path / "data") and root == tmp_path / "data" / "cub"
    assert "CUB_200_2011.tgz: 1.15 GB (approximate)" in capsys.readouterr().out or sys.version_info < (3, 13)
    server.faults[CKPT] = (403, {"HEAD"})
    assert fetch_ckpt(tmp_path, server).read_bytes() == server.files[CKPT]


@pytest.mark.parametrize("code", [404, 500])
def test_server_errors_name_the_url(server, tmp_path, code):
    server.faults["images.tar"] = (code, {"HEAD", "GET"})
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset("dogs", tmp_path / "data", mirror=server.mirror)
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
        rel.fetch_dataset("cub", tmp_path / "data", mirror=f"http://127.0.0.1:{port}/m")


def test_unsafe_archive_member_is_refused(server, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    server.files["lists.tar"] = buffer.getvalue()
    unpin(monkeypatch, "dogs", "lists.tar")  # what a pin would refuse before unpacking
    with pytest.raises(dl.DownloadError, match="lists.tar: damaged or unsafe archive"):
        rel.fetch_dataset("dogs", tmp_path / "data", mirror=server.mirror)
    assert not (tmp_path / "data" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "data" / "dogs").exists()


def test_disk_space_refusal_before_any_download(server, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(dl.DownloadError, match=r"not enough free disk space.*1\.00 kB free"):
        rel.fetch_dataset("cub", tmp_path / "data", mirror=server.mirror)
    with pytest.raises(dl.DownloadError, match="not enough free disk space"):
        fetch_ckpt(tmp_path, server)
    assert server.gets() == []
    assert not (tmp_path / "data" / "cub").exists() and not (tmp_path / "checkpoints" / CKPT).exists()


def test_existing_user_folder_is_used_or_refused_never_deleted(server, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "cub").mkdir(parents=True)
    (data_dir / "cub" / "my_notes.txt").write_text("mine")
    with pytest.raises(dl.DownloadError, match="not created by the downloader"):
        rel.fetch_dataset("cub", data_dir, mirror=server.mirror)
    assert (data_dir / "cub" / "my_notes.txt").read_text() == "mine"
    for split in ("train", "val", "test"):
        (data_dir / "cub" / f"{split}.json").write_text("{}")
    assert rel.fetch_dataset("cub", data_dir, mirror=server.mirror) == data_dir / "cub"
    assert server.requests == []


@pytest.mark.parametrize("task,expected", [
    ("cars", ["data/cars/cars_train", "devkit/cars_train_annos.mat", "prepare --dataset cars"]),
    ("nabirds", ["sign-up", "data/nabirds", "prepare --dataset nabirds"]),
    ("dtd", ["data/vtab-1k/dtd/{train800,val200,train800val200,test}.txt", "RepAdapter"]),
    ("ade20k", ["data/ADEChallengeData2016/images/{training,validation}", "ADEChallengeData2016.zip"]),
])
def test_instructions_only_datasets(tmp_path, task, expected):
    text = rel.dataset_instructions(task)
    assert all(piece in text for piece in expected), text
    with pytest.raises(dl.DownloadError) as err:
        rel.fetch_dataset(task, "data")
    assert str(err.value) == text
    assert "CUB_200_2011.tgz" in rel.dataset_instructions("cub") and "data/downloads" in rel.dataset_instructions("cub")

# --- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_download_verifies_records_and_loads(server, tmp_path, capsys):
    path = fetch_ckpt(tmp_path, server)
    blob = server.files[CKPT]
    assert path == tmp_path / "checkpoints" / CKPT and path.read_bytes() == blob
    assert server.gets() == [CKPT]
    out = capsys.readouterr().out
    assert f"size: {dl.format_bytes(len(blob))}" in out and "free disk space" in out
    assert dl.MAE_README in out and dl.OUR_MAE_PIN in out  # what it matched
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


def test_interrupted_checkpoint_download_resumes_with_http_range(server, tmp_path):
    blob = server.files[CKPT]
    server.faults[CKPT] = ("truncate", {"GET"})
    with pytest.raises(dl.DownloadError, match=f"{server.mirror}/{CKPT}: the connection closed early"):
        fetch_ckpt(tmp_path, server)
    assert leftovers(tmp_path / "checkpoints") == [f"{CKPT}.partial"]  # no file, no record, no lock
    with pytest.raises(dl.DownloadError, match="not found"):
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    server.faults.clear()
    path = fetch_ckpt(tmp_path, server)
    assert server.ranges(CKPT) == [None, f"bytes={len(blob) // 2}-"] and path.read_bytes() == blob
    assert leftovers(tmp_path / "checkpoints") == sorted([CKPT, dl.SUMS_NAME])


def test_a_kept_partial_that_is_not_a_prefix_of_the_file_is_deleted_after_the_check(server, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"{CKPT}.partial").write_bytes(b"x" * 100)
    with pytest.raises(dl.DownloadError, match="mismatch"):
        fetch_ckpt(tmp_path, server)
    assert leftovers(tmp_path / "checkpoints") == []
    assert fetch_ckpt(tmp_path, server).read_bytes() == server.files[CKPT]


def test_corrupted_checkpoint_is_refused_with_the_redownload_command(server, tmp_path, monkeypatch):
    unpinned = dataclasses.replace(dl.CHECKPOINTS[("vit_base", "mae")], pins=())  # only the record checks it
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), unpinned)
    path = fetch_ckpt(tmp_path, server)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(dl.DownloadError) as err:
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    message = str(err.value)
    assert str(path) in message and f"SHA-256 mismatch against the record in {path.parent / dl.SUMS_NAME}" in message
    assert ra.sha256(server.files[CKPT]) in message and ra.sha256(bytes(blob)) in message  # expected vs found
    assert f"rm {path}" in message and COMMAND in message and "--checkpoint FILE" in message
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


@pytest.mark.parametrize("kind,prefix_length", [("md5", 6), ("sha256", 64), ("size", None)])
def test_pinned_checksum_mismatch_is_reported_with_its_source_and_the_way_round(server, tmp_path, monkeypatch,
                                                                                kind, prefix_length):
    blob = server.files[CKPT]
    right = {"md5": ra.md5(blob), "sha256": ra.sha256(blob), "size": len(blob)}[kind]
    wrong = {"md5": "ab" * 16, "sha256": "ab" * 32, "size": len(blob) + 1}[kind]
    if prefix_length:
        right, wrong = right[:prefix_length], wrong[:prefix_length]
    url = dl.CHECKPOINTS[("vit_base", "mae")].url
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), dl.Checkpoint(CKPT, url, (dl.Pin(kind, wrong, "SRC"),)))
    with pytest.raises(dl.DownloadError) as err:
        fetch_ckpt(tmp_path, server)
    message = str(err.value)
    what = {"md5": "md5 prefix", "sha256": "SHA-256", "size": "size"}[kind]
    assert f"{what} mismatch against SRC: expected {wrong}" in message and "--checkpoint FILE" in message
    found = {"md5": ra.md5(blob), "sha256": ra.sha256(blob), "size": str(len(blob))}[kind]
    assert f"found {found}" in message
    assert leftovers(tmp_path / "checkpoints") == []
    # a file put in place by hand is checked against the pin before its first use
    (tmp_path / "checkpoints" / CKPT).write_bytes(blob)
    with pytest.raises(dl.DownloadError, match=f"{what} mismatch against SRC"):
        dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints" / dl.SUMS_NAME).exists()
    # the right value (a prefix, as torch.hub checks hash_prefix) is accepted
    monkeypatch.setitem(dl.CHECKPOINTS, ("vit_base", "mae"), dl.Checkpoint(CKPT, url, (dl.Pin(kind, right, "SRC"),)))
    assert dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints", model_factory=tiny_factory).read_bytes() == blob


def test_hand_placed_checkpoint_is_recorded_on_first_use(server, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / CKPT).write_bytes(server.files[CKPT])
    path = dl.checkpoint_path("vit_base", "mae", tmp_path / "checkpoints", model_factory=tiny_factory)
    assert dl.read_sums(path.parent / dl.SUMS_NAME)[CKPT][0] == ra.sha256(server.files[CKPT])
    assert server.requests == []


def test_a_hand_placed_checkpoint_without_a_pin_is_loaded_and_checked_before_it_is_recorded(server, tmp_path):
    """MoCo v3 ViT-S has no published checksum. An HTML page (a failed download saved by a browser) or a file of
    integer tensors put in its place is refused naming the file, never recorded in SHA256SUMS, and left where
    the user put it; the right file put there next is recorded on its first use."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    name = dl.CHECKPOINTS[("vit_small", "mocov3")].filename
    sums = folder / dl.SUMS_NAME

    def first_use():
        return dl.checkpoint_path("vit_small", "mocov3", folder, model_factory=tiny_factory)
    (folder / name).write_bytes(b"<!DOCTYPE html><html><head><title>Sign in</title></head></html>\n")
    with pytest.raises(dl.DownloadError, match=r"is not a checkpoint file: it is an HTML page"):
        first_use()
    assert not sums.exists() and (folder / name).exists()
    torch.manual_seed(0)
    integers = {k: (v * 100).to(torch.int64) for k, v in ra.tiny_model().backbone_state_dict().items()}
    torch.save({"model": integers}, folder / name)
    with pytest.raises(dl.DownloadError, match=r"hold integers \(e\.g\. .*torch\.int64\).*not a usable backbone"):
        first_use()
    assert not sums.exists()
    (folder / name).write_bytes(server.files[CKPT])
    assert first_use() == folder / name
    assert dl.read_sums(sums) == {name: (ra.sha256(server.files[CKPT]), len(server.files[CKPT]))}
    assert server.requests == []


def test_a_checkpoint_of_integer_tensors_passed_with_checkpoint_is_refused_before_the_run(tmp_path, capsys):
    """A ViT-S backbone whose tensors were cast to int8 (every key and shape right): loading would cast them
    back to floats silently."""
    backbone = gp.build_model("vit_small", "mae", "linear", num_classes=0).backbone_state_dict()
    torch.save({"model": {k: (v * 100).to(torch.int8) for k, v in backbone.items()}}, tmp_path / "ints.pth")
    import reproduce
    code = reproduce.cli_main(["--task", "dtd", "--arch", "vit_small", "--checkpoint", str(tmp_path / "ints.pth"), "--data-dir",
                               str(tmp_path / "data"), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ints.pth" in err and "hold integers" in err


def test_the_pinned_tables_hold_the_published_values():
    """Typed in by hand from the sources: the MAE README (md5 prefixes), VPT's README (MoCo v3), TensorFlow
    Datasets' url_checksums (Dogs, Flowers: size and SHA-256), torchvision's Flowers102 (md5), the CUB md5 in
    common loaders, and this project's pin of the MAE ViT-B file."""
    def pins(entry):
        return {p.kind: p.value for p in entry.pins}
    assert pins(dl.CHECKPOINTS[("vit_base", "mae")]) == {
        "md5": "8cad7c", "size": 343249461, "sha256": "aec5f0b68e5f3193a00b07bc65a37440db549c15b36b8bea242606cc40c4bc5d"}
    assert pins(dl.CHECKPOINTS[("vit_large", "mae")]) == {"md5": "b8b06e"}
    assert pins(dl.CHECKPOINTS[("vit_huge", "mae")]) == {"md5": "9bdbb0"}
    assert pins(dl.CHECKPOINTS[("vit_base", "mocov3")]) == {"md5": "8f39ce"}
    assert pins(dl.CHECKPOINTS[("vit_small", "mocov3")]) == {}
    assert "pinned by this project" in dl.CHECKPOINTS[("vit_base", "mae")].pins[2].source
    files = {dl.url_filename(f.url): f for src in rel.DATASETS.values() for f in src.files}
    assert {name: pins(f) for name, f in files.items()} == {
        "CUB_200_2011.tgz": {"md5": "97eceeb196236b17998738112f37df78"},
        "102flowers.tgz": {"size": 344862509, "md5": "52808999861908f626f3c1f4e79d11fa",
                           "sha256": "2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246"},
        "imagelabels.mat": {"size": 502, "md5": "e0620be6f572b9609742df49c70aed4d",
                            "sha256": "4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d"},
        "setid.mat": {"size": 14989, "md5": "a5357ecc9cb78c4bef273ce3793fc85c",
                      "sha256": "46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd"},
        "images.tar": {"size": 793579520, "sha256": "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"},
        "lists.tar": {"size": 481280, "sha256": "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c"}}
    assert files["CUB_200_2011.tgz"].approx_size == 1150585339
    assert {name: f.url for name, f in files.items()} == {
        "CUB_200_2011.tgz": "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        "102flowers.tgz": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
        "imagelabels.mat": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
        "setid.mat": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
        "images.tar": "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
        "lists.tar": "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar"}
    assert {k for k in dl.CHECKPOINTS if k[1] in ("mae", "mocov3")} == {    # the others: test_backbone_cli.py
        ("vit_base", "mae"), ("vit_large", "mae"), ("vit_huge", "mae"), ("vit_base", "mocov3"), ("vit_small", "mocov3")}
    assert dl.estimated_checkpoint_bytes("vit_base") == pytest.approx(343249461, rel=0.001)


def test_download_errors_are_user_errors():
    assert issubclass(dl.DownloadError, runtime.UserError)
    assert os.path.basename(dl.__file__) == "downloads.py"


# --- the whole path through the harness -------------------------------------------------------------

def test_one_command_from_nothing_to_a_trained_epoch(server, tmp_path):
    """What `reproduce.py --task cub --download` does: the checkpoint is fetched and checked against the run's
    own architecture, CUB is fetched, unpacked and split, and an epoch trains on it."""
    from harness import config
    from harness import runs
    cfg = config.resolve("cub", "mae", arch_overrides=dict(embed_dim=32, depth=2, num_heads=2), img_size=32,
                          num_classes=3, epochs=1, warmup_epochs=0, batch_size=8)
    settings = runtime.Settings(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"),
                                checkpoint_dir=str(tmp_path / "checkpoints"), download=True, mirror=server.mirror,
                                quiet=True)
    result = runs.run_one(cfg, "final", settings)
    assert len(result["history"]) == 1 and 0 <= result["final"]["test_acc"] <= 100
    assert result["history"][0]["images_per_second"] > 0
    assert rel.dataset_ready("cub", tmp_path / "data") and (tmp_path / "checkpoints" / dl.SUMS_NAME).is_file()
    assert sorted(set(server.gets())) == ["CUB_200_2011.tgz", CKPT]
    server.requests.clear()
    assert runs.run_one(cfg, "final", settings) == result and server.gets() == []   # nothing fetched again


def test_a_server_error_exits_2_with_the_url(server, tmp_path):
    """`reproduce.py download` in a process of its own (the tables' real pins): exit code 2, the URL and the
    status on stderr."""
    server.faults[CKPT] = (500, ("GET", "HEAD"))
    argv = ["download", "--ssl", "mae", "--arch", "vit_base", "--mirror", server.mirror]
    proc = process_of(reproduce.cli_main, argv, out=tmp_path / "out.log", err=tmp_path / "err.log", cwd=tmp_path)
    proc.join(120)
    stderr = (tmp_path / "err.log").read_text()
    assert proc.exitcode == 2, stderr
    assert f"{server.mirror}/{CKPT}" in stderr and "500" in stderr
    assert leftovers(tmp_path / "checkpoints") in ([], [dl.SUMS_NAME])
