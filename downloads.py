"""Downloads: backbone checkpoints and the FGVC datasets that have stable release archives.

Nothing is ever downloaded silently: `checkpoint_path(..., download=False)` and the harness's data readers
stop with the exact path, the URL and the one command that fetches the file. With download=True:

  checkpoints  -> <checkpoint_dir>/<official file name>; verified by size, SHA-256 (published where known)
                  and by loading it into a model of its architecture (`gated_prompt.load_backbone`, every key
                  and shape), then recorded in <checkpoint_dir>/SHA256SUMS. Every later use re-checks the
                  file against that record.
  CUB, Flowers, Dogs -> release archives kept in <data_dir>/downloads/ (md5 checked where published, SHA-256
                  recorded in <data_dir>/downloads/SHA256SUMS), unpacked safely into a temporary folder,
                  split files written by `releases.prepare`, a marker file `.gated_prompt_ready` written, and only
                  then renamed into place (<data_dir>/cub, <data_dir>/flowers, <data_dir>/dogs).
  Cars, NABirds, VTAB-1k, ADE20K -> `dataset_instructions(task)`: what to fetch by hand and where to put it.

SHA256SUMS format (both files): `sha256sum -c SHA256SUMS` checks it as is. Each file has a line
`<sha256>  <file name>` preceded by a comment line `# size <bytes> <file name>` (GNU sha256sum skips lines
that start with '#').

Mirrors: `mirror_url` puts a file's name under a mirror base URL (a lab proxy, a shared web folder or a
file:// directory holding the same files); `mirror=None` reads the environment variable GATED_PROMPT_MIRROR.

Every failure is a `DownloadError` (a `runtime.UserError`: exit code 2 through the CLI) naming the URL or file.
Downloads are never partially visible: data goes to `<name>.partial` beside the target and is renamed only
when complete and verified; a dataset folder counts as ready only with its marker file.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import torch
from tqdm import tqdm

import data
import gated_prompt as gp
import releases
import runtime

MIRROR_ENV = "GATED_PROMPT_MIRROR"
SUMS_NAME = "SHA256SUMS"
READY_MARKER = ".gated_prompt_ready"
DISK_MARGIN = 64 * 2**20  # bytes kept free beyond what a download and its unpacking need
TIMEOUT_S = 60  # a connection that sends nothing for this long counts as failed


class DownloadError(runtime.UserError):
    """A download, verification or unpacking failed; the message names the URL or file and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. What can be downloaded (module-level tables: tests monkeypatch them with fixture checksums)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    filename: str
    url: str
    sha256: str | None = None  # published checksum, if any
    size: int | None = None  # published size in bytes, if any


CHECKPOINTS = {  # (arch, ssl) -> the official file
    ("vit_base", "mae"): Checkpoint(
        "mae_pretrain_vit_base.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
        # size and SHA-256 as a third-party project pins them (Meta publishes none); a mismatch is reported
        sha256="aec5f0b68e5f3193a00b07bc65a37440db549c15b36b8bea242606cc40c4bc5d", size=343_249_461),
    ("vit_large", "mae"): Checkpoint(
        "mae_pretrain_vit_large.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"),
    ("vit_huge", "mae"): Checkpoint(
        "mae_pretrain_vit_huge.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"),
    ("vit_base", "mocov3"): Checkpoint(
        "linear-vit-b-300ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"),
    ("vit_small", "mocov3"): Checkpoint(
        "linear-vit-s-300ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar"),
}


@dataclass(frozen=True)
class SourceFile:
    url: str
    md5: str | None = None  # published checksum, if any
    approx_size: int | None = None  # bytes, for the disk check when the server sends no Content-Length
    unpack: bool = True  # a tar archive (else the file is copied into the dataset folder as is)


@dataclass(frozen=True)
class DatasetSource:
    title: str
    folder: str  # the dataset root the harness reads: <data_dir>/<folder>
    files: tuple[SourceFile, ...]
    inner: str  # the folder inside the archives that holds the release files ("" = the archive root)
    expect: tuple[str, ...]  # release entries that must exist after unpacking
    page: str


DATASETS = {
    "cub": DatasetSource(
        "CUB-200-2011", "cub",
        (SourceFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                    md5="97eceeb196236b17998738112f37df78", approx_size=1_150_000_000),),
        inner="CUB_200_2011",
        expect=("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
        page="https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "flowers": DatasetSource(
        "Oxford Flowers-102", "flowers",
        (SourceFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                    md5="52808999861908f626f3c1f4e79d11fa", approx_size=345_000_000),
         SourceFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                    md5="e0620be6f572b9609742df49c70aed4d", approx_size=1_000_000, unpack=False),
         SourceFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
                    md5="a5357ecc9cb78c4bef273ce3793fc85c", approx_size=1_000_000, unpack=False)),
        inner="", expect=("jpg", "imagelabels.mat", "setid.mat"),
        page="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "dogs": DatasetSource(  # no published checksums: the SHA-256 is recorded at the first download
        "Stanford Dogs", "dogs",
        (SourceFile("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar", approx_size=794_000_000),
         SourceFile("http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar", approx_size=500_000)),
        inner="", expect=("Images", "train_list.mat", "test_list.mat", "file_list.mat"),
        page="http://vision.stanford.edu/aditya86/ImageNetDogs/"),
}

# ---------------------------------------------------------------------------------------------
# 2. Mirrors, sizes, commands
# ---------------------------------------------------------------------------------------------


def url_filename(url: str) -> str:
    """The file name a URL serves, without query string or fragment ("...tgz?download=1" -> "...tgz")."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name:
        raise ValueError(f"{url}: no file name in the URL path")
    return name


def mirror_url(url: str, mirror: str | None = None) -> str:
    """`url` served from `mirror` (a base URL): the host and directory are replaced, the file name is kept
    and query strings are dropped. mirror=None reads GATED_PROMPT_MIRROR; with neither, `url` is returned."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url_filename(url)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def download_command(arch: str, ssl: str, mirror: str | None = None) -> str:
    """The one command that fetches a checkpoint (an explicit mirror is repeated; the env variable is not)."""
    return f"python reproduce.py download --ssl {ssl} --arch {arch}" + (f" --mirror {mirror}" if mirror else "")


def estimated_checkpoint_bytes(arch: str) -> int:
    """fp32 size of a ViT backbone of `arch` at 224 px (for the disk check when no size is known)."""
    patch, d, depth, _ = gp.ARCHS[arch]
    tokens = (224 // patch) ** 2 + 1
    params = 3 * patch * patch * d + d + d + tokens * d + depth * (12 * d * d + 13 * d) + 2 * d
    return 4 * params


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _check_disk(where: Path, need: int, what: str) -> None:
    free = free_disk_bytes(where)
    print(f"  free disk space at {where}: {format_bytes(free)}")
    if need + DISK_MARGIN > free:
        raise DownloadError(f"not enough free disk space for {what}: needs about {format_bytes(need)} "
                            f"(+{format_bytes(DISK_MARGIN)} margin), {where} has {format_bytes(free)} free. "
                            f"Free some space or choose another folder.")

# ---------------------------------------------------------------------------------------------
# 3. SHA256SUMS records
# ---------------------------------------------------------------------------------------------

_HASH_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_SIZE_LINE = re.compile(r"^# size (\d+) (.+)$")


def read_sums(path: str | os.PathLike) -> dict[str, tuple[str, int | None]]:
    """{file name: (sha256, size or None)} from a SHA256SUMS file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    hashes, sizes = {}, {}
    for line in path.read_text().splitlines():
        if m := _SIZE_LINE.match(line):
            sizes[m.group(2)] = int(m.group(1))
        elif m := _HASH_LINE.match(line):
            hashes[m.group(2)] = m.group(1).lower()
    return {name: (sha, sizes.get(name)) for name, sha in hashes.items()}


def record_sum(path: str | os.PathLike, name: str, sha256: str, size: int) -> None:
    """Add or replace the record of `name` in a SHA256SUMS file (written atomically)."""
    records = read_sums(path)
    records[name] = (sha256, size)
    lines = ["# SHA-256 of each verified file; check with `sha256sum -c SHA256SUMS` (it skips '#' lines)."]
    for n in sorted(records):
        sha, n_bytes = records[n]
        if n_bytes is not None:
            lines.append(f"# size {n_bytes} {n}")
        lines.append(f"{sha}  {n}")
    runtime.write_text(path, "\n".join(lines) + "\n")


def file_digests(path: str | os.PathLike, md5: bool = False) -> tuple[str, str | None]:
    """(sha256, md5 or None) of a file, with a progress bar for big files on a terminal."""
    sha, m = hashlib.sha256(), hashlib.md5() if md5 else None
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {Path(path).name}",
                                     disable=None if size > 64 * 2**20 else True) as bar:
        while chunk := f.read(4 * 2**20):
            sha.update(chunk)
            if m is not None:
                m.update(chunk)
            bar.update(len(chunk))
    return sha.hexdigest(), (m.hexdigest() if m is not None else None)


def _verify(path: Path, *, sha256: str | None, size: int | None, md5: str | None, source: str, fix: str) -> str:
    """Check a file against expected size / sha256 / md5; returns its sha256. DownloadError on a mismatch."""
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        raise DownloadError(f"{path}: size mismatch against {source}: expected {size} bytes, found {found_size}. "
                            f"{fix}")
    found_sha, found_md5 = file_digests(path, md5=md5 is not None)
    if sha256 is not None and found_sha != sha256.lower():
        raise DownloadError(f"{path}: SHA-256 mismatch against {source}: expected {sha256}, found {found_sha}. "
                            f"{fix}")
    if md5 is not None and found_md5 != md5.lower():
        raise DownloadError(f"{path}: md5 mismatch against {source}: expected {md5}, found {found_md5}. {fix}")
    return found_sha

# ---------------------------------------------------------------------------------------------
# 4. Fetching one file
# ---------------------------------------------------------------------------------------------


def _http_problem(url: str, err: Exception) -> str:
    if isinstance(err, HTTPError):
        hint = {403: "the host refused the request (Stanford Dogs' host sometimes does; retry later)",
                404: "no file at this address (moved, or not on this mirror)"}.get(
            err.code, "server error; retry later" if err.code >= 500 else "")
        return f"{url}: HTTP {err.code} {err.reason}" + (f" -- {hint}" if hint else "")
    if isinstance(err, URLError):
        return f"cannot reach {url}: {err.reason}"
    if isinstance(err, (http.client.HTTPException, ConnectionError, socket.timeout)):
        return f"{url}: the connection failed or closed early ({type(err).__name__}: {err})"
    return f"downloading {url} failed: {type(err).__name__}: {err}"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def remote_size(url: str) -> int | None:
    """Content-Length from a HEAD request (None if the server does not say). DownloadError if unreachable."""
    request = Request(url, method="HEAD", headers={"User-Agent": "gated-prompt-downloads"})
    try:
        with urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
    except HTTPError as err:
        if err.code in (405, 501):  # HEAD not supported: the download itself will tell
            return None
        raise DownloadError(_http_problem(url, err)) from None
    except (URLError, http.client.HTTPException, OSError) as err:
        raise DownloadError(_http_problem(url, err)) from None
    return int(length) if length and length.strip().isdigit() else None


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _remove_stale_partials(target: Path) -> None:
    """Leftovers of a killed download (<name>.partial and torch.hub's <name>.partial.<id>.partial)."""
    if target.parent.is_dir():
        for stale in target.parent.glob(glob_escape(target.name) + ".partial*"):
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _download(url: str, target: Path, *, expected_size: int | None, verify: Callable[[Path], str]) -> str:
    """Download url to <target>.partial (torch.hub, progress bar), check completeness, run verify(partial)
    (returns the sha256; raises DownloadError), then rename to target. Nothing is left behind on failure."""
    partial = _partial(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            with _socket_timeout(TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(partial), progress=True)
        except (URLError, http.client.HTTPException, OSError) as err:
            raise DownloadError(_http_problem(url, err) + "; nothing was kept, run the same command again") from None
        got = partial.stat().st_size
        if expected_size is not None and got != expected_size:
            raise DownloadError(f"{url}: the connection closed early: got {got} of {expected_size} bytes; nothing "
                                f"was kept, run the same command again")
        sha = verify(partial)
        os.replace(partial, target)
        return sha
    finally:
        partial.unlink(missing_ok=True)

# ---------------------------------------------------------------------------------------------
# 5. Checkpoints
# ---------------------------------------------------------------------------------------------


def _default_model(arch: str, ssl: str) -> torch.nn.Module:
    """A backbone of `arch` on the meta device: key and shape checks without allocating the weights twice."""
    with torch.device("meta"):
        return gp.build_model(arch, ssl, "linear", num_classes=0, verbose=False)


def checkpoint_path(arch: str, ssl: str, checkpoint_dir: str | os.PathLike = "checkpoints", *,
                    download: bool = False, mirror: str | None = None,
                    model_factory: Callable[[], torch.nn.Module] | None = None) -> Path:
    """The verified official backbone file <checkpoint_dir>/<file name> for (arch, ssl).

    Present: checked against <checkpoint_dir>/SHA256SUMS (size, SHA-256); without a record it is checked
    against the published checksum where one is known, then recorded. Missing: DownloadError with the path,
    URL and command, unless download=True: then it is downloaded (size and free disk space printed first),
    checked (size, published checksum, loads through gated_prompt.load_backbone into model_factory(arch,
    ssl) -- by default a meta-device ViT of `arch`), recorded in SHA256SUMS and only then put in place.
    """
    if (arch, ssl) not in CHECKPOINTS:
        known = ", ".join(f"{s} {a}" for a, s in CHECKPOINTS)
        raise DownloadError(f"no official {ssl} checkpoint for {arch} (known: {known}); pass --checkpoint FILE")
    ck = CHECKPOINTS[(arch, ssl)]
    directory = Path(checkpoint_dir)
    path, sums = directory / ck.filename, directory / SUMS_NAME
    url = mirror_url(ck.url, mirror)
    command = download_command(arch, ssl, mirror)
    _remove_stale_partials(path)
    record = read_sums(sums).get(ck.filename)
    if path.is_file():
        if record is not None:
            _verify(path, sha256=record[0], size=record[1], md5=None, source=f"the record in {sums}",
                    fix=_redownload_fix(path, command, sums))
        else:
            sha = _verify(path, sha256=ck.sha256, size=ck.size, md5=None, source=f"the published checksum of {ck.url}",
                          fix=_redownload_fix(path, command, None))
            record_sum(sums, ck.filename, sha, path.stat().st_size)
            print(f"{path}: {'matches the published SHA-256; ' if ck.sha256 else ''}recorded in {sums}")
        return path
    if not download:
        raise DownloadError(f"backbone checkpoint not found: {path}\n  download URL: {url}\n"
                            f"  fetch it with: {command}   (or add --download to this command)")

    print(f"downloading the {ssl} {arch} backbone: {url}\n  -> {path}")
    content_length = remote_size(url)
    size = content_length or ck.size
    if content_length and ck.size and content_length != ck.size:
        print(f"  warning: the server reports {content_length} bytes, the published size is {ck.size}")
    print(f"  size: {format_bytes(size) if size else '~' + format_bytes(estimated_checkpoint_bytes(arch)) + ' (estimated)'}")
    _check_disk(directory, size or estimated_checkpoint_bytes(arch), f"{ck.filename}")
    factory = model_factory or (lambda: _default_model(arch, ssl))

    def verify(partial: Path) -> str:
        if record is not None:  # the file was deleted, its record kept: the new download must match it
            expected, source = (record[0], record[1]), f"the record in {sums}"
        else:
            expected, source = (ck.sha256, ck.size), f"the published checksum of {ck.url}"
        fix = (f"The download from {url} is not the expected file; nothing was kept. "
               + (f"If the file changed upstream on purpose, delete its lines in {sums} and run `{command}` "
                  f"again." if record is not None else "Try again, or another mirror."))
        sha = _verify(partial, sha256=expected[0], size=expected[1], md5=None, source=source, fix=fix)
        try:
            report = gp.load_backbone(factory(), partial)
        except gp.CheckpointError as err:
            raise DownloadError(f"the file downloaded from {url} does not load as a {arch} backbone; it was "
                                f"deleted.\n{err}") from None
        print(f"  {report}")
        record_sum(sums, ck.filename, sha, partial.stat().st_size)
        return sha

    sha = _download(url, path, expected_size=content_length, verify=verify)
    print(f"  verified and recorded in {sums}: {sha}  {ck.filename}")
    return path


def _redownload_fix(path: Path, command: str, sums: Path | None) -> str:
    extra = f" If you replaced the file on purpose, delete its lines in {sums} instead." if sums else ""
    return (f"The file is corrupt or not the official one. To re-download it: delete it (rm {path}) and run "
            f"`{command}`.{extra}")

# ---------------------------------------------------------------------------------------------
# 6. Datasets with stable release archives
# ---------------------------------------------------------------------------------------------


def dataset_root(dataset: str, data_dir: str | os.PathLike) -> Path:
    """The folder the harness reads for an automatically downloadable dataset."""
    return Path(data_dir) / DATASETS[dataset].folder


def read_marker(root: str | os.PathLike) -> dict | None:
    """The parsed ready marker of a dataset folder, or None (absent, unreadable)."""
    try:
        marker = json.loads((Path(root) / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def dataset_ready(dataset: str, data_dir: str | os.PathLike) -> bool:
    """True when <data_dir>/<folder> was completed by fetch_dataset (marker present, split files there)."""
    root = dataset_root(dataset, data_dir)
    marker = read_marker(root)
    return (marker is not None and marker.get("dataset") == dataset
            and all((root / f"{split}.json").is_file() for split in data.FGVC_SPLITS))


def fetch_dataset(dataset: str, data_dir: str | os.PathLike = "data", *, mirror: str | None = None) -> Path:
    """Download, verify, unpack and prepare an FGVC dataset with stable archives (cub, flowers, dogs);
    returns its root folder. Instructions-only datasets raise DownloadError carrying the instructions.

    Archives are kept in <data_dir>/downloads/ (verified again on reuse; a file put there by hand is used).
    A rerun after an interruption at any stage resumes: finished archives are reused, anything else is
    redone. A folder is ready only with its `.gated_prompt_ready` marker; a ready folder costs no network.
    """
    if dataset not in DATASETS:
        raise DownloadError(dataset_instructions(dataset, data_dir))
    data_dir = Path(data_dir)
    root = dataset_root(dataset, data_dir)
    if _usable_already(dataset, data_dir, root):
        return root
    src, downloads = DATASETS[dataset], data_dir / "downloads"
    print(f"{dataset}: {src.title} ({src.page}); archives are kept in {downloads}")
    todo = _plan_downloads(dataset, src, data_dir, downloads, mirror)
    records = _fetch_archives(dataset, src, downloads, todo, mirror)
    _unpack_prepare_and_mark(dataset, src, data_dir, downloads, root, records)
    print(f"{dataset}: ready in {root} (marker {READY_MARKER}); the archives in {downloads} can be deleted")
    return root


def _usable_already(dataset: str, data_dir: Path, root: Path) -> bool:
    """True for a ready folder, or a user's folder that already has split files; a user's folder without them is
    refused (never overwritten)."""
    if dataset_ready(dataset, data_dir):
        print(f"{dataset}: {root} is ready (downloaded {read_marker(root).get('date', '?')}); nothing to fetch")
        return True
    if root.exists() and read_marker(root) is None:
        if all((root / f"{split}.json").is_file() for split in data.FGVC_SPLITS):
            print(f"{dataset}: using the existing {root} (split files present; not created by the downloader)")
            return True
        raise DownloadError(f"{root} exists but was not created by the downloader and has no split files. Move "
                            f"it away to download afresh, or, if it holds the release files, build the splits "
                            f"with `python reproduce.py prepare --dataset {dataset} --root {root}`.")
    return False


def _plan_downloads(dataset: str, src: DatasetSource, data_dir: Path, downloads: Path, mirror: str | None) -> list:
    """[(file, url, target, Content-Length)] still to download; prints each file's size and refuses when the disk
    cannot hold the downloads plus their unpacked copies."""
    todo, need = [], 0
    for f in src.files:
        target = downloads / url_filename(f.url)
        _remove_stale_partials(target)
        url = mirror_url(f.url, mirror)
        if target.is_file():
            size = target.stat().st_size
            print(f"  {target.name}: already downloaded ({format_bytes(size)})")
        else:
            length = remote_size(url)
            size = length or f.approx_size
            todo.append((f, url, target, length))
            need += size or 0
            print(f"  {target.name}: {format_bytes(size)}{'' if length else ' (approximate)'} to download from {url}")
        need += size or 0  # unpacked copy (about the archive size: the images are already compressed)
    _check_disk(data_dir, need, f"{dataset} (downloads + unpacked files)")
    return todo


def _fetch_archives(dataset: str, src: DatasetSource, downloads: Path, todo: list, mirror: str | None) -> dict:
    """{archive name: sha256}: kept archives verified again, the missing ones downloaded and verified."""
    sums, records = downloads / SUMS_NAME, {}
    for f in src.files:
        target = downloads / url_filename(f.url)
        if target.is_file():
            records[target.name] = _verify_kept_archive(target, f, sums, dataset, mirror)
    for f, url, target, length in todo:
        print(f"{dataset}: downloading {url}")
        records[target.name] = _download(url, target, expected_size=length,
                                         verify=lambda p, f=f, url=url, target=target:
                                         _verify_new_archive(p, f, url, target, sums))
    return records


def _unpack_prepare_and_mark(dataset: str, src: DatasetSource, data_dir: Path, downloads: Path, root: Path,
                             records: dict) -> None:
    """Unpack into a staging folder, build the split files, write the marker, then rename the folder into place:
    the folder appears complete, with its marker, or not at all."""
    staging = data_dir / f".{src.folder}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted unpack or prepare starts over
    try:
        release = _unpack(src, downloads, staging)
        try:
            sizes = releases.prepare(dataset, release, overwrite=True)
        except data.DataError as err:
            raise DownloadError(f"{dataset}: the unpacked release files in {downloads} do not give split files: "
                                f"{err}") from None
        marker = {"dataset": dataset, "title": src.title,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "split_sizes": sizes, "files": [
                      {"name": url_filename(f.url), "url": f.url, "md5": f.md5,
                       "sha256": records[url_filename(f.url)],
                       "size": (downloads / url_filename(f.url)).stat().st_size} for f in src.files]}
        runtime.write_json(release / READY_MARKER, marker)
        if root.exists():  # ours (it had a marker) but incomplete: replace it
            shutil.rmtree(root)
        os.replace(release, root)  # the commit point
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _archive_fix(path: Path, dataset: str) -> str:
    return (f"Delete it (rm {path}) and run the download again (e.g. python reproduce.py --task {dataset} "
            f"--download).")


def _verify_kept_archive(path: Path, f: SourceFile, sums: Path, dataset: str, mirror: str | None) -> str:
    """An archive already in downloads/: against its record, else its published md5 (then recorded)."""
    record = read_sums(sums).get(path.name)
    if record is not None:
        return _verify(path, sha256=record[0], size=record[1], md5=None, source=f"the record in {sums}",
                       fix=_archive_fix(path, dataset))
    sha = _verify(path, sha256=None, size=None, md5=f.md5, source=f"the published md5 of {f.url}",
                  fix=_archive_fix(path, dataset))
    record_sum(sums, path.name, sha, path.stat().st_size)
    print(f"  {path.name}: {'matches the published md5; ' if f.md5 else ''}recorded in {sums}")
    return sha


def _verify_new_archive(partial: Path, f: SourceFile, url: str, target: Path, sums: Path) -> str:
    record = read_sums(sums).get(target.name)
    fix = f"The download from {url} is not the expected file; nothing was kept. Try again, or another mirror."
    if record is not None:  # a deleted archive's record is kept: the new download must match it
        sha = _verify(partial, sha256=record[0], size=record[1], md5=None, source=f"the record in {sums}",
                      fix=fix + f" If the file changed upstream on purpose, delete its lines in {sums}.")
    else:
        sha = _verify(partial, sha256=None, size=None, md5=f.md5, source=f"the published md5 of {f.url}", fix=fix)
    if f.unpack and not tarfile.is_tarfile(partial):
        raise DownloadError(f"{url}: not a tar archive (an error page?); nothing was kept")
    record_sum(sums, target.name, sha, partial.stat().st_size)
    return sha


def _unpack(src: DatasetSource, downloads: Path, staging: Path) -> Path:
    """Extract the archives (and copy the plain files) into staging; returns the release folder in it."""
    release = staging / src.inner if src.inner else staging
    release.mkdir(parents=True, exist_ok=True)
    for f in src.files:
        path = downloads / url_filename(f.url)
        if not f.unpack:
            shutil.copyfile(path, release / path.name)
            continue
        safe_extract(path, staging)
    missing = [name for name in src.expect if not (release / name).exists()]
    if missing:
        raise DownloadError(f"after unpacking {', '.join(url_filename(f.url) for f in src.files)} from {downloads}, "
                            f"{', '.join(str(release.relative_to(staging) / m) for m in missing)} is missing: "
                            f"not the {src.title} release archive(s)? Delete them and download again.")
    return release


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into dest with a progress bar; nothing may land outside dest (tarfile's 'data'
    filter where available, else an equivalent check). DownloadError on a damaged or unsafe archive."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc=f"unpacking {archive.name}", unit=" files", disable=None):
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, dest, filter="data")
                else:
                    _check_member(member, dest)
                    tar.extract(member, dest)
    except DownloadError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:  # incl. zlib errors, FilterError
        raise DownloadError(f"{archive}: damaged or unsafe archive ({type(err).__name__}: {err}). "
                            f"Delete it and download again.") from None


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Fallback for Pythons without tarfile's 'data' filter: regular files and folders inside dest only."""
    target = (dest / member.name).resolve()
    if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
        raise DownloadError(f"unsafe archive member {member.name!r} (outside the target folder, a link or a "
                            f"device); refusing to unpack")

# ---------------------------------------------------------------------------------------------
# 7. Instructions-only datasets, and the overview table
# ---------------------------------------------------------------------------------------------

CARS_HELP = "https://github.com/pytorch/vision/issues/7545"
NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"
NOAH_URL = "https://github.com/ZhangYuanhan-AI/NOAH#data-preparation"
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


def dataset_instructions(task: str, data_dir: str | os.PathLike = "data") -> str:
    """How to get a task's data by hand: what to fetch, from where, and the folder the harness reads."""
    d = Path(data_dir)
    if task in DATASETS:
        src = DATASETS[task]
        names = ", ".join(url_filename(f.url) for f in src.files)
        return (f"{task} ({src.title}) downloads automatically: python reproduce.py --task {task} --download "
                f"(or fetch_dataset). If its host is unreachable, put {names} from {src.page} (or a mirror) in "
                f"{d / 'downloads'}/ and run it again: files there are used (checked against the published md5 "
                f"where there is one). Result: {d / src.folder}/ with {', '.join(src.expect)} and "
                f"{{train,val,test}}.json.")
    if task == "cars":
        return (f"Stanford Cars cannot be downloaded automatically: its original host "
                f"(ai.stanford.edu/~jkrause/cars) is gone. Get the original release files from a mirror (see "
                f"{CARS_HELP} for copies, e.g. on Kaggle): cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
                f"cars_test_annos_withlabels.mat. Arrange them as {d / 'cars'}/cars_train/*.jpg, "
                f"{d / 'cars'}/cars_test/*.jpg, {d / 'cars'}/devkit/cars_train_annos.mat and "
                f"{d / 'cars'}/cars_test_annos_withlabels.mat, then build the splits with "
                f"`python reproduce.py prepare --dataset cars --root {d / 'cars'}`.")
    if task == "nabirds":
        return (f"NABirds needs a (free) sign-up: request it at {NABIRDS_URL}, download nabirds.tar.gz and unpack "
                f"it so that {d / 'nabirds'}/images/, images.txt, image_class_labels.txt and train_test_split.txt "
                f"are directly in {d / 'nabirds'}, then build the splits with "
                f"`python reproduce.py prepare --dataset nabirds --root {d / 'nabirds'}`.")
    if task in data.VTAB_TASKS or task in ("vtab", "vtab-1k"):
        folder = d / "vtab-1k" / (task if task in data.VTAB_TASKS else "<task>")
        return (f"VTAB-1k is not downloaded automatically. Download the prepared image-folder archive linked "
                f"from {data.VTAB_URL} (the NOAH / RepAdapter release; the source datasets and how to build it "
                f"yourself: {NOAH_URL}) and unpack it into {d / 'vtab-1k'}/ so that each task has "
                f"{folder}/{{train800,val200,train800val200,test}}.txt (lines '<image path> <label>') and its "
                f"images. No tensorflow-datasets needed.")
    if task == "ade20k":
        return (f"ADE20K is not downloaded automatically (its host is often down). Download {ADE_URL} (about "
                f"0.9 GB) or a mirror of ADEChallengeData2016.zip and unzip it into {d}/ so that "
                f"{d / 'ADEChallengeData2016'}/images/{{training,validation}}/*.jpg and "
                f"{d / 'ADEChallengeData2016'}/annotations/{{training,validation}}/*.png exist.")
    raise DownloadError(f"unknown task {task!r}; datasets: {', '.join(list(data.FGVC_DATASETS) + ['ade20k'])}, "
                        f"VTAB-1k tasks: {', '.join(data.VTAB_TASKS)}")


def describe() -> list[dict]:
    """One row per checkpoint and dataset: automatic or instructions-only, size, target and source."""
    rows = []
    for (arch, ssl), ck in CHECKPOINTS.items():
        rows.append(dict(kind="checkpoint", name=f"{ssl} {arch}", automatic=True, size=ck.size,
                         size_text=format_bytes(ck.size) if ck.size else
                         f"~{format_bytes(estimated_checkpoint_bytes(arch))} (estimated)",
                         target=f"checkpoints/{ck.filename}", source=ck.url,
                         checksum="published SHA-256" if ck.sha256 else "SHA-256 recorded at first download",
                         command=download_command(arch, ssl)))
    for name, src in DATASETS.items():
        total = sum(f.approx_size or 0 for f in src.files)
        rows.append(dict(kind="dataset", name=name, automatic=True, size=total, size_text=f"~{format_bytes(total)}",
                         target=f"data/{src.folder}", source=src.page,
                         checksum="published md5" if all(f.md5 for f in src.files)
                         else "SHA-256 recorded at first download",
                         command=f"python reproduce.py --task {name} --download"))
    for name, target, size in (("cars", "data/cars", "see the mirror"), ("nabirds", "data/nabirds", "see the host"),
                               ("vtab-1k", "data/vtab-1k/<task>", "see the archive"),
                               ("ade20k", "data/ADEChallengeData2016", "~0.9 GB")):
        rows.append(dict(kind="dataset", name=name, automatic=False, size=None, size_text=size, target=target,
                         source=None, checksum="-", command=None,
                         instructions=dataset_instructions(name if name != "vtab-1k" else "vtab")))
    return rows


def describe_table() -> str:
    """describe() as a Markdown table."""
    lines = ["| what | how | size | goes to | checked by |", "|---|---|---|---|---|"]
    for r in describe():
        how = f"automatic: `{r['command']}`" if r["automatic"] else "by hand (instructions in the error message)"
        lines.append(f"| {r['kind']} {r['name']} | {how} | {r['size_text']} | `{r['target']}` | {r['checksum']} |")
    return "\n".join(lines)
