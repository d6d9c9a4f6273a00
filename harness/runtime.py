"""Plumbing shared by the classification and segmentation harnesses and the benchmark: run settings, device and
precision, seeding, atomic files, resumable training states with one host sync, data-parallel helpers, and the
parts of training that all three share -- torch.compile with counted compiled calls, model placement, the
optimizer, the training step, the learned-gates summary.

Why the training step lives here and not in classification.py: the segmentation harness and the benchmark train
with the same step, optimizer and placement; kept in classification.py they would make segmentation import the
classification module. Nothing here knows a task, a dataset or a model class.

Process-wide state, all of it here: torch.compile's backends and caches (one backend per setting, graphs kept
between runs of the same graph key: `enter_graph_key`, `reset_compiler`) and the result of the start-up compile
check (`check_compile`, once per device and setting)."""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import gated_prompt as gp
from harness import kernels as fast_kernels

EXIT_BAD_INPUT = 2  # missing data / checkpoint, corrupt file, bad label: a user error, not a crash


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (what was wrong, where the usage is) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UserError(Exception):
    """Bad input that the user can fix; the message says what was expected and where."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN / inf. Carries the facts (value, where, whether a state of an earlier epoch was saved);
    the command line words the advice."""
    def __init__(self, value, where, state_saved):
        super().__init__(f"loss became {value} at {where}")
        self.value, self.where, self.state_saved = value, where, state_saved

    def __reduce__(self):   # crosses process boundaries (parallel sweep workers)
        return NonFiniteLoss, (self.value, self.where, self.state_saved), self.__dict__


@dataclasses.dataclass
class Settings:
    """How to run, never what: paths, device and precision. Not part of a run's identity -- a finished run
    is reused whatever these say (rerunning a cell with --no-compile finds its result)."""
    results_dir: str = "results"
    data_dir: str = "data"
    cache_dir: str = None           # decoded images; default <results_dir>/cache
    checkpoint: str = None          # a backbone file; default checkpoints/<official file name>
    checkpoint_dir: str = "checkpoints"
    trust_pickle: bool = False      # unpickle a backbone file's objects beyond the safe extras (runs its code)
    device: torch.device = torch.device("cpu")
    bf16: bool = False              # bf16 autocast (CUDA default); False = the official code's fp32 numerics
    compile: object = False         # torch.compile the step (CUDA default); or a torch.compile backend
    compile_mode: str = None        # "max-autotune": inductor's autotuning, without CUDA graphs
    resume: bool = False
    quiet: bool = False             # no progress bars or per-epoch lines
    download: bool = False          # fetch a missing checkpoint / dataset (downloads.py)
    mirror: str = None              # base URL replacing the official hosts
    workers: int = None             # independent runs at once, each its own process (default: one per GPU)
    kernels: tuple = ()             # opt-in kernels.KERNELS switched on in the placed model (none by default)
    runs_per_batch: int = None      # runs of one graph key trained in one batch (harness.batched): None = as many
    #                                 as the device's memory holds (measured); 1 = every run alone (official code)

    @property
    def cache_folder(self):
        """Decoded images between runs and the backbone hashes: --cache-dir, else <results_dir>/cache."""
        return Path(self.cache_dir or Path(self.results_dir) / "cache")

    @classmethod
    def for_device(cls, device=None, fp32=False, no_compile=False, **kw):
        """bf16 autocast and torch.compile on CUDA unless turned off; fp32 and eager elsewhere. With compile on,
        a tiny compiled call is made on the device first (check_compile): a compiler that cannot work stops
        here with a UserError naming what is missing, not at the first training step."""
        device = pick_device(device)
        cuda = device.type == "cuda"
        settings = cls(device=device, bf16=cuda and not fp32, compile=cuda and not no_compile, **kw)
        check_compile(settings.device, settings.compile)
        return settings

    def record(self):
        """What a result file keeps of these settings."""
        return {"device": device_name(self.device), "bf16": self.bf16, "compile": bool(self.compile),
                "compile_mode": self.compile_mode, "world_size": world()[1], "kernels": list(self.kernels)}

# --- device and precision ------------------------------------------------------


def pick_device(name=None):
    if isinstance(name, torch.device):
        return name
    if name:
        return torch.device(name)
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name):
    """torch.device(name) for --device, or UserError: an unknown name, or a GPU that is not there."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device: use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() "
                            "is False); leave --device out or pass --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: this harness runs on cuda or cpu")
    return device


def autocast(device, bf16=True):
    """bf16 autocast on CUDA (the fast path); fp32 elsewhere unless asked (CPU bf16 is slow but exact enough)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def flush_denormals(device):
    """On CPU, flush denormal floats to zero while the block runs: once a loss saturates, denormal gradients
    make x86 arithmetic 6-25x slower. GPUs flush them already."""
    if device.type != "cpu":
        yield
        return
    before = float(torch.tensor(1e-39) * 1) == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator's state as tensors and plain values (numpy's key as a list of ints)."""
    kind, key, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, key.tolist(), position, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

# --- files ---------------------------------------------------------------------


def temporary_prefix():
    """Prefix of this process's temporary files: .tmp-<pid>@<host>- (remove_dead_temporaries reads it back)."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}-"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def format_bytes(n):
    if n is None:
        return "unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def free_disk_bytes(path):
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def disk_full(path, need):
    """The UserError of a disk too full to write `need` bytes to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    return UserError(f"the disk is full: writing {path} needs {format_bytes(need)}, {folder} has "
                     f"{format_bytes(free_disk_bytes(folder))} free; free some space, then run the command again")


def atomic_write(path, write):
    """Write through write(binary file) to a temporary file beside `path`, then rename: readers never see
    a half-written file, and a crash leaves the old one. The bytes are made in memory first, so that a disk
    without room for them is a UserError before anything is written (and ENOSPC during the write the same
    one, with the temporary file removed). The file gets the umask's permissions (mkstemp alone would leave
    it 0600, unreadable to colleagues sharing a results folder)."""
    path = os.fspath(path)
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if free_disk_bytes(path) < len(data):
        raise disk_full(path, len(data))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=temporary_prefix())
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, len(data)) from None
        raise


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


def remove_dead_temporaries(folder, recursive=True):
    """Delete temporary files (.tmp-<pid>@<host>-* of atomic_write, *.tmp<pid>@<host> of the image cache)
    left by killed processes of this host; files of live processes and of other hosts stay. Returns them."""
    if not os.path.isdir(folder):
        return []
    host, removed = socket.gethostname(), []
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for parent, _, names in walk:
        for name in names:
            m = re.fullmatch(r"\.tmp-(\d+)@(.+)-\w+", name) or re.fullmatch(r".+\.tmp(\d+)@(.+)", name)
            if m and m.group(2) == host and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(parent, name))
                    removed.append(os.path.join(parent, name))
    return removed


def check_writable(*folders):
    """Create each folder and a file in it now: an unwritable results or cache folder is found before training,
    not at the first save after an epoch."""
    for folder in folders:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=temporary_prefix()):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror}): pass a writable --results-dir "
                            "(and --cache-dir)") from None


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    """Write JSON atomically (a crash never leaves a half-written result)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_jsonable).encode()))


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def to_host(tree):
    """Copy every tensor of a nested dict / list to the host with ONE device sync (non-blocking copies, then one
    synchronize): the only sync a training epoch makes when no progress bar is shown."""
    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", non_blocking=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x
    out = copy(tree)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out


def training_state(model, optimizer, scheduler, step):
    """Prompt-side parameters, optimizer, scheduler, RNG and step: with save_training_state's history and extra,
    enough to resume bit-for-bit. Tensors stay where they are; pass the state through to_host (with the epoch's
    metrics) before saving it."""
    return {"model": model.prompt_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state()}


STATE_FORMAT = 2   # the layout of a training state: tensors and plain values only (1 pickled numpy arrays)
STATE_KEYS = ("format", "model", "optimizer", "scheduler", "step", "rng", "history", "extra")


SAVE_EVERY = 1   # epochs between resumable states: a kill loses at most these. Each save is a host copy inside the
#                 epoch's one read-back, written by a StateWriter off the training thread; 1: a stop signal (SLURM)
#                 always finds the last finished epoch on disk


def save_due(epoch, epochs):
    """Whether the state is saved after (0-based) `epoch` of `epochs`: every SAVE_EVERY epochs and after the last."""
    return (epoch + 1) % SAVE_EVERY == 0 or epoch + 1 == epochs


def save_training_state(path, host_state, history, config, elapsed, writer=None, **extra):
    """Write a resumable state: training_state's host copy, the history so far, and `extra` = the run's config
    identity (resume_or_start refuses a state of another config), the seconds spent so far, and what else the
    harness keeps (the classification trainer: its best-val record). Only tensors and plain values, so that
    load_training_state reads it weights-only. The bytes are made here and now; a StateWriter, if given, puts
    them on disk on its own thread."""
    state = dict(host_state, format=STATE_FORMAT, history=history, extra=dict(extra, config=config, elapsed=elapsed))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    if writer is None:
        atomic_write(path, lambda f: f.write(data))
    else:
        writer.write(path, data)


class StateWriter:
    """Writes a training loop's states to disk on a thread of its own, in order, so that the loop does not wait
    for the disk (a shared cluster filesystem can take longer than a VTAB epoch). A failed write (a full disk)
    is raised on the loop's thread at its next save or at the end of the `with` block. Leaving the block waits
    for every write, also when the block raises (a stop signal, Ctrl-C, a crash): the last finished epoch's
    state is on disk before the process goes on or exits. A kill loses at most the writes in flight, and
    atomic_write leaves the state before them."""

    def __init__(self, max_pending=64):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._pending, self._max_pending = [], max_pending

    def write(self, path, data):
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()   # an earlier write's error, now
        if len(self._pending) >= self._max_pending:
            self.wait()
        self._pending.append(self._pool.submit(atomic_write, path, lambda f: f.write(data)))

    def wait(self):
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        try:
            self.wait()
        except Exception:
            if kind is None:
                raise   # otherwise the block's own exception goes on
        finally:
            self._pool.shutdown(wait=True)


def load_training_state(path, model, optimizer, scheduler):
    """Read a state save_training_state wrote -- weights-only: no code in the file runs -- into the model,
    optimizer, scheduler and RNGs. Anything else (a pickle of objects, another version or shape, a state of
    another model) is a one-line UserError naming the file."""
    restart = "delete it to start the run over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:   # weights_only met an object: unpickling it would run code
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e)))) or ["an object"]
        raise UserError(f"{path} is not a training state this harness can read safely: it pickles "
                        f"{', '.join(names)}, which loading would run (a state holds only tensors and plain "
                        f"values; states of earlier versions pickled numpy arrays); {restart}") from None
    except Exception as e:   # truncated or not a state file: the path and what to do, not a traceback
        raise UserError(f"{path} is not a readable training state ({type(e).__name__}; truncated?): {restart}") from None
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and all(k in state for k in STATE_KEYS)
            and isinstance(state["extra"], dict) and isinstance(state["history"], list)
            and type(state["step"]) is int and type(state["extra"].get("elapsed")) in (int, float)):
        found = f"format {state.get('format')}, keys {sorted(map(str, state))}" if isinstance(state, dict) \
            else f"a {type(state).__name__}"
        raise UserError(f"{path} is a training state of another version or shape ({found}; this code reads format "
                        f"{STATE_FORMAT}); {restart}")
    try:
        model.load_prompt_state_dict(state["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: this training state does not match the model being trained ({e}); {restart}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise UserError(f"{path}: its optimizer, scheduler or random-number state does not fit this run "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); {restart}") from None
    return state


def resume_or_start(state_path, config, model, optimizer, scheduler, resume):
    """The saved state to continue from (keys step, history, extra; model, optimizer, scheduler and RNG are
    loaded), or None to start from scratch. A state left by an interrupted run is only continued with `resume`;
    without it the run says so and starts over (its first save replaces the state). A state of another config
    is refused."""
    if not os.path.isfile(state_path):
        if resume and is_main():
            print(f"--resume: no saved state at {state_path}; starting from scratch")
        return None
    if not resume:
        if is_main():
            print(f"{state_path} holds an interrupted run; starting over (pass --resume to continue it)")
        return None
    state = load_training_state(state_path, model, optimizer, scheduler)
    if state["extra"].get("config") != config:
        raise UserError(f"{state_path} was written by a run with another configuration; delete it to start over")
    if is_main():
        print(f"resumed from {state_path} ({len(state['history'])} history records)")
    return state


def code_version():
    """git commit (+dirty) of this checkout, else a hash of the source files."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if rev:
            return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha1()
    for path in sorted(Path(here).parent.glob("**/*.py")):   # the repository's sources
        h.update(path.read_bytes())
    return "src-" + h.hexdigest()[:10]


def check_finite(value, where, state_saved):
    """Stop on NaN/inf with exit code 3 (the CLI maps NonFiniteLoss to it)."""
    if not math.isfinite(value):
        raise NonFiniteLoss(value, where, state_saved)

# --- stop signals: preemption, time limits, scancel ------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)   # SLURM's; SIGUSR2 is submitit's default


class Stopped(BaseException):
    """A stop signal ended the run between two training steps (or at once outside the step loops): the resumable
    state on disk is consistent. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):   # crosses process boundaries (parallel workers)
        return Stopped, (self.signum,), self.__dict__


_STOP = {"signum": None, "in_steps": 0, "pid": None}


def handle_stop_signals(signals=STOP_SIGNALS):
    """Install the stop handler for `signals` in this process (main thread only; a no-op elsewhere) and forget any
    earlier signal. A signal that arrives while a step_points loop runs takes effect before its next batch; one
    that arrives elsewhere, or a second one, raises Stopped at once. Forked children (data-loader workers) ignore
    it: their parent stops them."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    _STOP.update(signum=None, pid=os.getpid())
    for signum in signals:
        signal.signal(signum, _on_stop_signal)


def _on_stop_signal(signum, frame):
    if os.getpid() != _STOP["pid"]:
        return
    first, _STOP["signum"] = _STOP["signum"] is None, signum
    if not first or not _STOP["in_steps"]:
        raise Stopped(signum)


def stop_requested():
    return _STOP["signum"] is not None and os.getpid() == _STOP["pid"]


def check_stop():
    """Raise Stopped when a stop signal has been received."""
    if stop_requested():
        raise Stopped(_STOP["signum"])


def step_points(batches):
    """`batches` item by item; a stop signal received meanwhile raises Stopped before the next item is taken, so
    the step under way finishes first."""
    _STOP["in_steps"] += 1
    try:
        for item in batches:
            check_stop()
            yield item
    finally:
        _STOP["in_steps"] -= 1

# --- data parallel (torchrun) ---------------------------------------------------


def init_distributed():
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return world()[0] == 0


class MainRankFailed(UserError):
    """Rank 0 failed in a main_first block and said why; the other ranks stop without a word of their own."""


def _rank0_outcome(failed=False):
    """Rank 0's `failed` flag, sent to every rank (the barrier of main_first that also says how rank 0 did)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([int(failed)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _wait_for_rank0_to_exit(seconds=60):
    """Rank 0 failed and is about to say why and exit: wait for that (a barrier it never joins fails when it is
    gone), so that its message comes first and torchrun reports its exit; torchrun's SIGTERM meanwhile ends this
    rank without a word."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        dist.barrier(async_op=True).wait(datetime.timedelta(seconds=seconds))
    except Exception:  # noqa: BLE001 - rank 0 has gone (or the wait timed out): either way this rank stops too
        pass


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. filling a cache), then the other ranks. If rank 0's block raises, the
    other ranks raise MainRankFailed instead of running theirs (not a broken-connection traceback each)."""
    distributed = world()[1] > 1
    if distributed and not is_main() and _rank0_outcome():
        _wait_for_rank0_to_exit()
        raise MainRankFailed("rank 0 stopped; its message says why")
    try:
        yield
    except BaseException:
        if distributed and is_main():
            _rank0_outcome(failed=True)
        raise
    if distributed and is_main():
        _rank0_outcome()


def all_reduce_gradients(params):
    """Average the gradients of the trainable parameters only (the backbone has none)."""
    rank, world_size = world()
    if world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(tensor):
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor

# --- torch.compile, counted ----------------------------------------------------

_COMPILE_CHECKED = {}


def check_compile(device, compile):
    """With compile on, compile and run a tiny function on `device` once per process: a compiler that cannot
    work (no C compiler, no Python headers for Triton's launcher) stops the run here with a UserError naming
    what is missing, before any data is decoded. A no-op with compile off."""
    if not compile:
        return
    key = (str(device), compile if isinstance(compile, (bool, str)) else id(compile))
    if key not in _COMPILE_CHECKED:
        try:
            probe = compiled(lambda x: (x * 2).sin().sum(), compile)
            float(probe(torch.ones(8, device=device)))
            _COMPILE_CHECKED[key] = None
        except Exception as err:  # noqa: BLE001 - any compiler failure is the message
            _COMPILE_CHECKED[key] = compile_failure(err, device)
    if _COMPILE_CHECKED[key]:
        raise UserError(_COMPILE_CHECKED[key])


def compile_failure(err, device):
    """One line naming what torch.compile lacks on `device`, from the compiler's error."""
    text = f"{type(err).__name__}: {err}"
    if "Python.h" in text:
        missing = "the Python development headers (Python.h; e.g. apt install python3-dev)"
    elif any(s in text for s in ("C compiler", "gcc", "cc1", "clang", "CalledProcessError")):
        missing = "a working C compiler (e.g. apt install gcc)"
    elif "triton" in text.lower():
        missing = "a working Triton (pip install triton)"
    else:
        missing = "something: " + (text.strip().splitlines() or [""])[0][:200]
    return f"torch.compile cannot build on {device_name(device)}: missing {missing}; pass --no-compile to run eager"


# Graphs are kept between the runs of a process: a run whose graph key (classification.graph_key: what shapes the
# compiled graphs) was compiled before reuses them -- dynamo lifts the parameters of a module into graph inputs, so
# a new model of the same shape passes the guards, given the SAME backend object (one per setting, _BACKENDS). The
# graphs of all keys sit on the same code objects, under dynamo's recompile limit: KEYS_PER_CACHE keys fit (the
# limit is raised to match), and the cache is emptied before a new key would go beyond it, never letting a run
# fall back to eager.
KEYS_PER_CACHE = 16     # Table 2 has 13 graph keys
GRAPHS_PER_KEY = 4      # the training and the evaluation backbone, with room to spare
_BACKENDS = {}
_GRAPH_KEYS = set()
_COUNTS = {"graphs": 0, "graph_runs": 0}   # graphs built and compiled-graph calls, process-wide


def reset_compiler():
    """Empty dynamo's caches (process-wide) and forget which graph keys were compiled. Inductor's on-disk cache
    still serves graphs compiled before."""
    torch._dynamo.reset()
    _GRAPH_KEYS.clear()


def enter_graph_key(key):
    """Before a compiled run with graph key `key`: "reused" when this process compiled the key's graphs already
    (they are kept), else "cold" (emptying dynamo's caches first when KEYS_PER_CACHE other keys are held)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, KEYS_PER_CACHE * GRAPHS_PER_KEY)
    if key in _GRAPH_KEYS:
        return "reused"
    if len(_GRAPH_KEYS) >= KEYS_PER_CACHE:
        reset_compiler()
    _GRAPH_KEYS.add(key)
    return "cold"


def compile_backend(compile, mode=None):
    """The process's one counting backend for a setting (True / "inductor", a backend name, or a backend object),
    so that graphs compiled for one run serve the next. It counts built graphs and calls that ran one (_COUNTS)."""
    key = (compile if isinstance(compile, (bool, str)) else id(compile), mode)
    if key not in _BACKENDS:
        if compile is True or isinstance(compile, str):
            from torch._inductor.compile_fx import compile_fx
            patches = {"max_autotune": True, "triton.cudagraphs": False} if mode == "max-autotune" else None
            backend = (lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)) \
                if compile in (True, "inductor") else torch._dynamo.lookup_backend(compile)
        else:
            backend = compile

        def counting(gm, example_inputs):
            _COUNTS["graphs"] += 1
            graph = backend(gm, example_inputs)

            def run(*args):
                _COUNTS["graph_runs"] += 1
                return graph(*args)
            return run
        _BACKENDS[key] = (compile, counting)   # keeps a backend object alive: its id stays its own
    return _BACKENDS[key][1]


class Compiled:
    """`fn` under torch.compile (static shapes) with the process's backend for the setting (compile_backend),
    counting its calls, how many of them ran a compiled graph (dynamo falls back to eager at its recompile limit,
    silently) and how many graphs its calls built (0: every call reused graphs compiled before): `calls`,
    `compiled_calls`, `graphs`."""

    def __init__(self, fn, compile, mode=None):
        self.calls = self.compiled_calls = self.graphs = 0
        self.fn = torch.compile(fn, dynamic=False, backend=compile_backend(compile, mode))

    def __call__(self, *args, **kwargs):
        graphs, runs = _COUNTS["graphs"], _COUNTS["graph_runs"]
        out = self.fn(*args, **kwargs)
        self.calls += 1
        self.compiled_calls += _COUNTS["graph_runs"] > runs
        self.graphs += _COUNTS["graphs"] - graphs
        return out


def compiled(fn, compile, mode=None):
    """A Compiled `fn` (static shapes: every batch is padded to full size, so one graph serves a whole run), or
    `fn` itself. `compile`: False, True (inductor) or a torch.compile backend (tests count compiles); mode
    "max-autotune": inductor's autotuning without CUDA graphs."""
    return Compiled(fn, compile, mode) if compile else fn


def compile_record(compile, **fns):
    """What a result keeps of torch.compile: the setting, per step function the calls that ran a compiled graph
    out of all calls, counted, and "graphs": "cold" (this run built graphs), "reused" (every call ran graphs an
    earlier run of this process built) or "eager" (compile off, or some call ran eager); warns when compile was on
    but some calls ran eager."""
    counts = {name: [fn.compiled_calls, fn.calls] for name, fn in fns.items() if isinstance(fn, Compiled)}
    eager = {name: c for name, c in counts.items() if c[0] < c[1]}
    if compile and eager and is_main():
        print("WARNING: torch.compile was on but these steps ran eager: "
              + ", ".join(f"{name} {c[1] - c[0]} of {c[1]}" for name, c in eager.items()), flush=True)
    all_compiled = bool(compile) and bool(counts) and not eager
    graphs = "eager" if not all_compiled else "cold" if any(fn.graphs for fn in fns.values()
                                                            if isinstance(fn, Compiled)) else "reused"
    return {"compile": bool(compile), "compiled_calls": counts, "all_compiled": all_compiled, "graphs": graphs}

# --- the training step (classification, segmentation and the benchmark) --------


def place_model(model, device, bf16, kernels=()):
    """The model on `device`; on CUDA under bf16 autocast its frozen Linear / patch-embedding weights are stored in
    bf16 (the same matmul inputs, so bit-identical logits; half the weight memory, no cast per step); then the
    opt-in `kernels` (harness.kernels.apply)."""
    model.to(device)
    if bf16 and device.type == "cuda":
        model.store_frozen_weights(torch.bfloat16)
    fast_kernels.apply(model, kernels, device)
    return model


def make_optimizer(params, lr, momentum, weight_decay, device):
    """The official SGD; fused into one kernel on CUDA (the same math; `fused` needs torch >= 2.3)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=device.type == "cuda")


def make_train_step(model, optimizer, loss_fn, device, bf16=True, compile=False, forward=None):
    """One SGD step. `forward(inputs)` -> output (autocast and any compiling are its own); without one, the
    model's forward under bf16 autocast and loss_fn(output, targets) -> (fp32 loss, stats) form one compiled
    region. Then backward, the all-reduce of the trainable gradients, the optimizer step. Returns
    step(inputs, targets) -> (detached loss, stats) as device tensors; it never syncs with the host.
    step.compiled is the Compiled function it calls (for compile_record), or None."""
    if forward is None:
        def forward_loss(inputs, targets):
            with autocast(device, bf16):
                output = model(inputs)
            return loss_fn(output, targets)
        forward_loss = compiled(forward_loss, compile)
        counted = forward_loss
    else:
        def forward_loss(inputs, targets):
            return loss_fn(forward(inputs), targets)
        counted = getattr(forward, "compiled", None)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs, targets):
        loss, stats = forward_loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params)
        optimizer.step()
        gp.project_temperatures(model)   # Eq. 9's tau back into [0.01, 10]: projected SGD
        return loss.detach(), stats
    step.compiled = counted if isinstance(counted, Compiled) else None
    return step


def learned_gates(vit):
    """Gates (Eq. 6), selection ratio (Eq. 11) and temperatures (Eq. 9) of a trained prompted ViT (the
    classifier, or the segmenter's backbone); None where the method has none."""
    out = {"gates": None, "selection_ratio": None, "temperatures": None}
    if vit.gate_logits is not None:
        vit.eval()
        out["gates"] = vit.gates().detach().cpu().tolist()
        out["selection_ratio"] = vit.selection_ratio().tolist()
    if vit.temperatures is not None:
        out["temperatures"] = vit.temperatures.detach().cpu().tolist()
    return out


def synchronize(device):
    """Wait for the device's queued work (CUDA); a no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
