"""Downloads: verified files from their official hosts, and the backbone checkpoints.

    path = downloads.checkpoint_path("vit_base", "mae", "checkpoints", download=True)

Nothing is ever downloaded silently: `checkpoint_path(..., download=False)` stops with the exact path, the URL
and the one command that fetches the file. With download=True a checkpoint goes to <checkpoint_dir>/<official
file name>, verified against its pins (below) and by loading it into a model of its architecture
(`gated_prompt.load_backbone`, every key and shape), then recorded in <checkpoint_dir>/SHA256SUMS; every later
use re-checks it against its pins and that record. The FGVC datasets' release archives are fetched with the
same machinery by releases.py.

Pins: every file's expected size and checksums are in tables (`Pin`: kind, value, where the value comes from).
A hash pin may be a prefix of the digest (the MAE and VPT READMEs publish 6-digit md5 prefixes; DeiT and DINOv3 file
names end in an 8-digit SHA-256 prefix, torch.hub's convention); it is checked the way torch.hub checks a hash
prefix: the file's digest must start with it. DINO and DINOv2 publish no checksum: their files are checked by
loading and their SHA-256 recorded at the first download. DINOv3 files are behind Meta's licence: they are never
fetched from Meta's host, the error says where to get the file and where to put it (a --mirror may serve it). Tests
replace the tables with the pins of their fixture files.

Parallel processes (torchrun ranks, --workers, two commands at once): each download target has an OS file lock
(`<target>.lock`, fcntl.flock, released by the kernel if its process dies). A process that finds the lock held
says what it waits for, waits, then uses the result. Partial files are only touched under their target's lock.

Interrupted downloads resume: data goes to `<name>.partial` beside the target; a rerun asks the host for the rest
(HTTP Range) and starts again from byte 0 if the host does not honour it. The file is renamed into place only
when complete and verified. A failed size query (HEAD) only leaves the size unknown; the GET decides.

SHA256SUMS format: `sha256sum -c SHA256SUMS` checks it as is. Each file has a line `<sha256>  <file name>`
preceded by a comment line `# size <bytes> <file name>` (GNU sha256sum skips lines that start with '#').

Mirrors: `mirror_url` puts a file's name under a mirror base URL (a lab proxy, a shared web folder or a
file:// directory holding the same files); `mirror=None` reads the environment variable GATED_PROMPT_MIRROR.

Every failure is a `DownloadError` (a `runtime.UserError`: exit code 2 through the CLI) naming the URL or file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import torch
from tqdm import tqdm

import gated_prompt as gp
from harness import runtime
from harness.runtime import format_bytes, free_disk_bytes

MIRROR_ENV = "GATED_PROMPT_MIRROR"
SUMS_NAME = "SHA256SUMS"
DISK_MARGIN = 64 * 2**20  # bytes kept free beyond what a download and its unpacking need
TIMEOUT_S = 60  # a connection that sends nothing for this long counts as failed
USER_AGENT = "gated-prompt-downloads"


class DownloadError(runtime.UserError):
    """A download, verification or unpacking failed; the message names the URL or file and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. Pins, and the checkpoints (tests monkeypatch CHECKPOINTS)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """A value a file must match. kind "size": bytes; "sha256" / "md5": a hex digest or a prefix of one."""
    kind: str
    value: str | int
    source: str  # where the value comes from (named in a mismatch message)


MAE_README = "the md5 prefix published in the MAE README (github.com/facebookresearch/mae)"
VPT_README = "the md5 prefix published in VPT's README (github.com/KMnP/vpt)"
OUR_MAE_PIN = ("the value pinned by this project (Meta publishes no SHA-256 or size for it; independent public "
               "projects list the same values)")
DEIT_NAME = ("the SHA-256 prefix in the official file name, which DeiT's loader checks (torch.hub check_hash=True, "
             "github.com/facebookresearch/deit models.py)")
DINOV3_NAME = ("the SHA-256 prefix in the official file name (torch.hub's check_hash convention; "
               "github.com/facebookresearch/dinov3 hub/backbones.py)")
DINOV3_LICENCE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class Checkpoint:
    filename: str
    url: str
    pins: tuple[Pin, ...] = ()
    licence: str | None = None   # where a licence must be accepted first: never fetched from `url` itself


def _dino(name: str) -> Checkpoint:   # no checksum published (README, hubconf.py)
    return Checkpoint(f"{name}_pretrain.pth", f"https://dl.fbaipublicfiles.com/dino/{name}_pretrain/{name}_pretrain.pth")


def _dinov2(name: str) -> Checkpoint:   # no checksum published (README, dinov2/hub/backbones.py); no registers
    return Checkpoint(f"{name}_pretrain.pth", f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth")


def _dinov3(name: str, sha256_prefix: str) -> Checkpoint:   # LVD-1689M weights, behind Meta's licence
    filename = f"{name}_pretrain_lvd1689m-{sha256_prefix}.pth"
    return Checkpoint(filename, f"https://dl.fbaipublicfiles.com/dinov3/{name}/{filename}",
                      (Pin("sha256", sha256_prefix, DINOV3_NAME),), DINOV3_LICENCE)


def _deit(name: str, sha256_prefix: str) -> Checkpoint:
    filename = f"{name}-{sha256_prefix}.pth"
    return Checkpoint(filename, f"https://dl.fbaipublicfiles.com/deit/{filename}",
                      (Pin("sha256", sha256_prefix, DEIT_NAME),))


CHECKPOINTS = {  # (arch, ssl) -> the official file
    ("vit_base", "mae"): Checkpoint(
        "mae_pretrain_vit_base.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
        (Pin("md5", "8cad7c", MAE_README), Pin("size", 343_249_461, OUR_MAE_PIN),
         Pin("sha256", "aec5f0b68e5f3193a00b07bc65a37440db549c15b36b8bea242606cc40c4bc5d", OUR_MAE_PIN))),
    ("vit_large", "mae"): Checkpoint(
        "mae_pretrain_vit_large.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
        (Pin("md5", "b8b06e", MAE_README),)),
    ("vit_huge", "mae"): Checkpoint(
        "mae_pretrain_vit_huge.pth", "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth",
        (Pin("md5", "9bdbb0", MAE_README),)),
    ("vit_base", "mocov3"): Checkpoint(
        "linear-vit-b-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar",
        (Pin("md5", "8f39ce", VPT_README),)),
    ("vit_small", "mocov3"): Checkpoint(  # nothing published: checked by loading, recorded at the first download
        "linear-vit-s-300ep.pth.tar", "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar"),
    ("vit_small", "dino"): _dino("dino_deitsmall16"),
    ("vit_base", "dino"): _dino("dino_vitbase16"),
    ("vit_small", "dinov2"): _dinov2("dinov2_vits14"),
    ("vit_base", "dinov2"): _dinov2("dinov2_vitb14"),
    ("vit_large", "dinov2"): _dinov2("dinov2_vitl14"),
    ("vit_small", "dinov3"): _dinov3("dinov3_vits16", "08c60483"),
    ("vit_base", "dinov3"): _dinov3("dinov3_vitb16", "73cec8be"),
    ("vit_large", "dinov3"): _dinov3("dinov3_vitl16", "8aa4cbdd"),
    ("vit_small", "supervised"): _deit("deit_small_patch16_224", "cd65a155"),   # DeiT, ImageNet-1k labels
    ("vit_base", "supervised"): _deit("deit_base_patch16_224", "b5f2ef4d"),
}


def pinned_size(pins: tuple[Pin, ...]) -> int | None:
    return next((int(p.value) for p in pins if p.kind == "size"), None)


def hash_pinned(pins: tuple[Pin, ...]) -> bool:
    """True when a checksum (not only a size) vouches for the file."""
    return any(p.kind in ("sha256", "md5") for p in pins)

# ---------------------------------------------------------------------------------------------
# 2. Mirrors, sizes, commands
# ---------------------------------------------------------------------------------------------


def url_filename(url: str) -> str:
    """The file name a URL serves, without query string or fragment ("...tgz?download=1" -> "...tgz")."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name:
        raise ValueError(f"{url}: no file name in the URL path")
    return name


def mirror_base(mirror: str | None = None) -> str | None:
    """The mirror to use: `mirror`, else GATED_PROMPT_MIRROR, else None. A mirror that is not an http(s) URL
    with a host or a file:// folder is a DownloadError naming it (the flag or the variable)."""
    source = "--mirror" if mirror is not None else MIRROR_ENV
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    parts = urlsplit(mirror)
    try:
        parts.port   # a port that is not a number raises here
    except ValueError:
        parts = None
    if not parts or not ((parts.scheme in ("http", "https") and parts.hostname)
                         or (parts.scheme == "file" and parts.path)):
        raise DownloadError(f"{source} {mirror!r} is not a base URL: give http(s)://host/folder or "
                            "file:///absolute/folder (a folder holding the files under their official names)")
    return mirror


def mirror_url(url: str, mirror: str | None = None) -> str:
    """`url` served from mirror_base(mirror): the host and directory are replaced, the file name is kept and
    query strings are dropped; without a mirror, `url` itself."""
    base = mirror_base(mirror)
    return url if base is None else base.rstrip("/") + "/" + url_filename(url)


def check_folder(path: str | os.PathLike, flag: str) -> None:
    """DownloadError when `path` (a folder to download into, given with `flag`) or a folder above it is a file,
    or the nearest existing one cannot be written."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise DownloadError(f"{flag} {path}: {p} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as err:
        raise DownloadError(f"{flag} {path}: cannot write in {p} ({err.strerror or err})") from None


def download_command(arch: str, ssl: str, mirror: str | None = None) -> str:
    """The one command that fetches a checkpoint (an explicit mirror is repeated; the env variable is not)."""
    return f"python reproduce.py download --ssl {ssl} --arch {arch}" + (f" --mirror {mirror}" if mirror else "")


def estimated_checkpoint_bytes(arch: str) -> int:
    """fp32 size of a ViT backbone of `arch` at 224 px (for the disk check when no size is known)."""
    patch, d, depth, _ = gp.ARCHS[arch]
    tokens = (224 // patch) ** 2 + 1
    params = 3 * patch * patch * d + d + d + tokens * d + depth * (12 * d * d + 13 * d) + 2 * d
    return 4 * params


def check_disk(where: Path, need: int, what: str) -> None:
    free = free_disk_bytes(where)
    print(f"  free disk space at {where}: {format_bytes(free)}")
    if need + DISK_MARGIN > free:
        raise DownloadError(f"not enough free disk space for {what}: needs about {format_bytes(need)} "
                            f"(+{format_bytes(DISK_MARGIN)} margin), {where} has {format_bytes(free)} free. "
                            f"Free some space or choose another folder.")

# ---------------------------------------------------------------------------------------------
# 3. One process at a time per target
# ---------------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    """Hold an exclusive OS lock (fcntl.flock) on `path` for the block; the kernel releases it if the process
    dies. A process that finds it held prints what it waits for and waits. The holder deletes the file before
    releasing it; a waiter that then holds a deleted file retries on the file now at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                holder = _lock_holder(path)
                print(f"waiting: another process{holder} is {what} (lock {path})", flush=True)
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        if waited:
            print(f"  the other process is done {what}; using its result", flush=True)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiter on this file retries on a fresh one
        os.close(fd)


def _lock_holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text())})"
    return ""

# ---------------------------------------------------------------------------------------------
# 4. Checks and SHA256SUMS records
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


def record_sum(path: str | os.PathLike, name: str, sha256: str | None, size: int | None = None) -> None:
    """Add or replace (sha256=None: drop) the record of `name` in a SHA256SUMS file, under its lock."""
    path = Path(path)
    with file_lock(lock_path(path), f"updating {path}"):
        records = read_sums(path)
        if sha256 is None:
            if name not in records:
                return
            del records[name]
        else:
            records[name] = (sha256, size)
        lines = ["# SHA-256 of each verified file; check with `sha256sum -c SHA256SUMS` (it skips '#' lines)."]
        for n in sorted(records):
            sha, n_bytes = records[n]
            if n_bytes is not None:
                lines.append(f"# size {n_bytes} {n}")
            lines.append(f"{sha}  {n}")
        runtime.write_text(path, "\n".join(lines) + "\n")


def record_pins(sums: Path, name: str) -> tuple[Pin, ...]:
    """The record of `name` in `sums` as pins (none without a record)."""
    record = read_sums(sums).get(name)
    if record is None:
        return ()
    source = f"the record in {sums}"
    return ((Pin("size", record[1], source),) if record[1] is not None else ()) + (Pin("sha256", record[0], source),)


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


def verify(path: Path, pins: tuple[Pin, ...], fix: str) -> str:
    """Check a file against its pins (sizes first, then one pass for the digests); returns its SHA-256.
    A hash pin may be a prefix of the digest (checked like torch.hub's hash_prefix). DownloadError naming the
    pin's source, the expected and the found value on a mismatch."""
    found_size = path.stat().st_size
    for pin in pins:
        if pin.kind == "size" and found_size != pin.value:
            raise DownloadError(f"{path}: size mismatch against {pin.source}: expected {pin.value} bytes, found "
                                f"{found_size}. {fix}")
    sha, md5 = file_digests(path, md5=any(p.kind == "md5" for p in pins))
    for pin in pins:
        if pin.kind in ("sha256", "md5"):
            found = sha if pin.kind == "sha256" else md5
            expected = str(pin.value).lower()
            if not found.startswith(expected):
                what = {"sha256": "SHA-256", "md5": "md5"}[pin.kind] + (" prefix" if len(expected) < len(found) else "")
                raise DownloadError(f"{path}: {what} mismatch against {pin.source}: expected {expected}, found "
                                    f"{found}. {fix}")
    return sha

# ---------------------------------------------------------------------------------------------
# 5. Fetching one file
# ---------------------------------------------------------------------------------------------


def _http_problem(url: str, err: Exception) -> str:
    if isinstance(err, HTTPError):
        hint = {403: "the host refused the request (Stanford Dogs' host sometimes does; retry later)",
                404: "no file at this address (moved, or not on this mirror)"}.get(
            err.code, "server error; retry later" if err.code >= 500 else "")
        return f"{url}: HTTP {err.code} {err.reason}" + (f" -- {hint}" if hint else "")
    if isinstance(err, URLError):
        return f"cannot reach {url}: {err.reason}"
    if isinstance(err, (http.client.HTTPException, ConnectionError, TimeoutError)):
        return f"{url}: the connection failed or closed early ({type(err).__name__}: {err})"
    return f"downloading {url} failed: {type(err).__name__}: {err}"


def remote_size(url: str) -> int | None:
    """Content-Length from a HEAD request; None when the server does not say or refuses HEAD in any way (e.g. a
    presigned S3 URL behind a redirect answers HEAD with 403): the GET decides whether the file can be fetched."""
    request = Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
    except (URLError, http.client.HTTPException, OSError, ValueError):
        return None
    return int(length) if length and length.strip().isdigit() else None


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def _get(url: str, partial: Path) -> None:
    """GET url into `partial`: appended from its current size where the server honours HTTP Range (206 from
    the requested byte), else written from byte 0. DownloadError when the body ends short (the bytes received
    are kept, so the next call resumes) or the request fails."""
    start = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as err:
        if err.code == 416 and start:  # asked past the end: complete already (bytes */<start>), else restart
            if (err.headers.get("Content-Range") or "") == f"bytes */{start}":
                return
            partial.unlink()
            return _get(url, partial)
        raise
    with response:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
        resumed = bool(start) and getattr(response, "status", None) == 206 and match and int(match[1]) == start
        if start and not resumed:
            print(f"  {url}: the host does not resume downloads; starting again from byte 0")
        if start and resumed:
            print(f"  resuming at byte {start}")
        offset = start if resumed else 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.strip().isdigit() else None
        with open(partial, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=partial.name[:-len(".partial")],
                disable=None) as bar:
            read = getattr(response, "read1", response.read)  # read1: what has arrived, so a kill loses little
            try:
                while chunk := read(2**20):
                    f.write(chunk)
                    f.flush()
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError):
                pass  # the size check below reports it
    got = partial.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"{url}: the connection closed early: got {got} of {total} bytes. The {got} bytes are "
                            f"kept in {partial}: run the same command again to resume.")


def download(url: str, target: Path, check: Callable[[Path], str]) -> str:
    """Fetch url to <target>.partial (resuming a kept one), run check(partial) (returns the SHA-256, raises
    DownloadError), then rename to target. A file that fails its check is deleted. The caller holds
    target's lock."""
    partial = partial_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _get(url, partial)
    except DownloadError:
        raise
    except (URLError, http.client.HTTPException, OSError) as err:
        kept = " (the bytes received are kept: run the same command again to resume)" if partial.is_file() else ""
        raise DownloadError(_http_problem(url, err) + kept) from None
    try:
        sha = check(partial)
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return sha

# ---------------------------------------------------------------------------------------------
# 6. Checkpoints
# ---------------------------------------------------------------------------------------------


def _default_model(arch: str, ssl: str) -> torch.nn.Module:
    """A backbone of `arch` on the meta device: key and shape checks without allocating the weights twice."""
    with torch.device("meta"):
        return gp.build_model(arch, ssl, "linear", num_classes=0, verbose=False)


def checkpoint_path(arch: str, ssl: str, checkpoint_dir: str | os.PathLike = "checkpoints", *,
                    download: bool = False, mirror: str | None = None,
                    model_factory: Callable[[], torch.nn.Module] | None = None) -> Path:
    """The verified official backbone file <checkpoint_dir>/<file name> for (arch, ssl).

    Present: checked against its pins and its record in <checkpoint_dir>/SHA256SUMS (recorded on first use).
    Missing: DownloadError with the path, URL and command, unless download=True: then, under the file's lock,
    it is downloaded (size and free disk space printed first), checked (pins, record, loads through
    gated_prompt.load_backbone into model_factory() -- by default a meta-device ViT of `arch`), put in place
    and recorded. A process that waited for another one's download uses its file.
    """
    if (arch, ssl) not in CHECKPOINTS:
        known = ", ".join(f"{s} {a}" for a, s in CHECKPOINTS)
        try:
            gp.vit_config(arch, ssl)   # a pairing no file can make runnable is said as such
        except ValueError as e:
            raise DownloadError(f"no official {ssl} checkpoint for {arch}: {str(e).split(': ', 1)[1]}") from None
        raise DownloadError(f"no official {ssl} checkpoint for {arch} (known: {known}); pass --checkpoint FILE")
    ck = CHECKPOINTS[(arch, ssl)]
    check_folder(checkpoint_dir, "--checkpoint-dir")
    path = Path(checkpoint_dir) / ck.filename
    command = download_command(arch, ssl, mirror)
    factory = model_factory or (lambda: _default_model(arch, ssl))
    if path.is_file():  # a complete file: it only ever appears by rename (or is put there by hand)
        return _check_kept_checkpoint(path, ck, command, factory)
    url = mirror_url(ck.url, mirror)
    if ck.licence and url == ck.url:
        raise DownloadError(f"{ck.filename} is behind Meta's licence: accept it at {ck.licence}, download the file "
                            f"with the URL Meta e-mails you (wget), and put it at {path} (or pass --checkpoint FILE)")
    if not download:
        raise DownloadError(f"backbone checkpoint not found: {path}\n  download URL: {url}\n"
                            f"  fetch it with: {command}   (or add --download to this command)")
    with file_lock(lock_path(path), f"downloading {path}"):
        if path.is_file():
            return _check_kept_checkpoint(path, ck, command, factory)
        _download_checkpoint(path, ck, url, arch, factory)
    return path


def _check_kept_checkpoint(path: Path, ck: Checkpoint, command: str, factory: Callable[[], torch.nn.Module]) -> Path:
    """A file already in place (downloaded, or put there by hand): checked against its pins and its record. Not
    yet recorded (first use), it is also loaded into factory()'s model first: only a file that passes every
    check becomes the record later uses are checked against."""
    sums = path.parent / SUMS_NAME
    recorded = record_pins(sums, path.name)
    fix = _kept_checkpoint_fix(path, command, sums if recorded else None)
    sha = verify(path, ck.pins + recorded, fix=fix)
    if not recorded:
        try:
            report = load_backbone_file(path, factory)
        except gp.CheckpointError as err:
            raise DownloadError(f"{err}\n{fix}") from None
        record_sum(sums, path.name, sha, path.stat().st_size)
        print(f"{path}: {_matched(ck.pins)}{report}; recorded in {sums}")
    return path


def check_floating_weights(state: dict, name: str) -> None:
    """CheckpointError when a backbone state dict (gated_prompt.detect_format's) holds weights or biases of
    integer type: loading would cast them to floats silently (a quantised or converted copy, not a backbone)."""
    integer = [(k, v.dtype) for k, v in state.items() if str(k).endswith(("weight", "bias", "kernel", "scale"))
               and ((isinstance(v, torch.Tensor) and not v.is_floating_point())
                    or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "f") in "iub"))]
    if integer:
        raise gp.CheckpointError(f"{name}: {len(integer)} weight tensor(s) hold integers (e.g. {integer[0][0]}: "
                                 f"{integer[0][1]}), not floating-point numbers: not a usable backbone (a quantised "
                                 "or converted copy?); use the original checkpoint file")


def load_backbone_file(path: Path, factory: Callable[[], torch.nn.Module]) -> str:
    """Read a backbone file (weights-only), check its weights are floating point, and load it into factory()'s
    model (gated_prompt.load_backbone: every key and shape); returns load_backbone's report."""
    raw, _ = gp.read_checkpoint(path)
    check_floating_weights(gp.detect_format(raw, str(path))[0], str(path))
    return gp.load_backbone(factory(), raw, name=str(path))


def _download_checkpoint(path: Path, ck: Checkpoint, url: str, arch: str,
                         factory: Callable[[], torch.nn.Module]) -> None:
    """Download, check (pins, a kept record, loading) and record; the caller holds the file's lock."""
    print(f"downloading the {arch} backbone: {url}\n  -> {path}")
    content_length, pinned = remote_size(url), pinned_size(ck.pins)
    if content_length and pinned and content_length != pinned:
        print(f"  warning: the server reports {content_length} bytes, the pinned size is {pinned}")
    size = content_length or pinned
    print(f"  size: {format_bytes(size) if size else '~' + format_bytes(estimated_checkpoint_bytes(arch)) + ' (estimated)'}")
    check_disk(path.parent, size or estimated_checkpoint_bytes(arch), path.name)
    sums = path.parent / SUMS_NAME
    recorded = record_pins(sums, path.name)  # a deleted file's record is kept: the new download must match it
    fix = (f"The download from {url} is not the expected file; it was deleted. Try again or another mirror, or "
           f"use a file you trust with --checkpoint FILE (then only its keys and shapes are checked)."
           + (f" If the file changed upstream on purpose, delete its lines in {sums}." if recorded else ""))

    def check(partial: Path) -> str:
        sha = verify(partial, ck.pins + recorded, fix)
        try:
            report = load_backbone_file(partial, factory)
        except gp.CheckpointError as err:
            raise DownloadError(f"the file downloaded from {url} does not load as a {arch} backbone; it was "
                                f"deleted.\n{err}") from None
        print(f"  {report}")
        return sha

    sha = download(url, path, check)
    record_sum(sums, path.name, sha, path.stat().st_size)
    print(f"  verified ({_matched(ck.pins)}loads as {arch}) and recorded in {sums}: {sha}  {path.name}")


def _matched(pins: tuple[Pin, ...]) -> str:
    sources = sorted({p.source for p in pins})
    return f"matches {' and '.join(sources)}; " if sources else ""


def _kept_checkpoint_fix(path: Path, command: str, sums: Path | None) -> str:
    extra = f" If you replaced the file on purpose, delete its lines in {sums}." if sums else ""
    return (f"The file is corrupt or not the official one. To re-download it: delete it (rm {path}) and run "
            f"`{command}`. To use a file you trust instead, pass it with --checkpoint FILE (then only its keys "
            f"and shapes are checked).{extra}")
