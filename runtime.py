"""Plumbing shared by the classification and segmentation harnesses: run settings, device and precision,
seeding, atomic files, resumable training states with one host sync, data-parallel helpers, the training step."""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import tempfile

import numpy as np
import torch
import torch.distributed as dist

import gated_prompt as gp

EXIT_BAD_INPUT = 2  # missing data / checkpoint, corrupt file, bad label: a user error, not a crash


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
    device: torch.device = torch.device("cpu")
    bf16: bool = False              # bf16 autocast (CUDA default); False = the official code's fp32 numerics
    compile: object = False         # torch.compile the step (CUDA default); or a torch.compile backend
    resume: bool = False
    quiet: bool = False             # no progress bars or per-epoch lines
    download: bool = False          # fetch a missing checkpoint / dataset (downloads.py)
    mirror: str = None              # base URL replacing the official hosts
    workers: int = None             # independent runs at once (default: one per GPU)
    loader_workers: int = None      # ADE20K decoding processes (default: from the CPU count)

    @classmethod
    def for_device(cls, device=None, fp32=False, no_compile=False, **kw):
        """bf16 autocast and torch.compile on CUDA unless turned off; fp32 and eager elsewhere."""
        device = pick_device(device)
        cuda = device.type == "cuda"
        return cls(device=device, bf16=cuda and not fp32, compile=cuda and not no_compile, **kw)

    def record(self):
        """What a result file keeps of these settings."""
        return {"device": device_name(self.device), "bf16": self.bf16, "compile": bool(self.compile),
                "world_size": world()[1]}

# --- device and precision ------------------------------------------------------


def pick_device(name=None):
    if isinstance(name, torch.device):
        return name
    if name:
        return torch.device(name)
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def atomic_write(path, write):
    """Write through write(binary file) to a temporary file beside `path`, then rename: readers never see
    a half-written file, and a crash leaves the old one. The file gets the umask's permissions (mkstemp
    alone would leave it 0600, unreadable to colleagues sharing a results folder)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=temporary_prefix())
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
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


def training_state(model, optimizer, scheduler, step, history, extra=None):
    """Prompt-side parameters, optimizer, scheduler, RNG and history: enough to resume bit-for-bit. Tensors stay
    where they are; pass the state through to_host (with the epoch's metrics) before saving it."""
    return {"model": model.prompt_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "history": history, "rng": rng_state(),
            "extra": extra or {}}


def save_training_state(path, host_state):
    atomic_write(path, lambda f: torch.save(host_state, f))


def load_training_state(path, model, optimizer, scheduler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # truncated or not a state file: the path and what to do, not a traceback
        raise UserError(f"{path} is not a readable training state ({type(e).__name__}; truncated?): delete it to "
                        "start the run over") from None
    try:
        model.load_prompt_state_dict(state["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: this training state does not match the model being trained ({e}); delete it "
                        "to start the run over") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
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
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
    return "src-" + h.hexdigest()[:10]


def check_finite(value, where, state_saved):
    """Stop on NaN/inf with exit code 3 (the CLI maps NonFiniteLoss to it)."""
    if not math.isfinite(value):
        raise NonFiniteLoss(value, where, state_saved)

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


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. filling a cache), then the other ranks."""
    distributed = world()[1] > 1
    if distributed and not is_main():
        dist.barrier()
    yield
    if distributed and is_main():
        dist.barrier()


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

# --- the training step (classification, segmentation and the benchmark) --------

def compiled(fn, compile):
    """torch.compile with static shapes (every batch is padded to full size, so one graph serves a whole run),
    or `fn` itself. `compile`: False, True (inductor) or a torch.compile backend (tests count compiles)."""
    if not compile:
        return fn
    return torch.compile(fn, dynamic=False, **({} if compile is True else {"backend": compile}))


def place_model(model, device, bf16):
    """The model on `device`; on CUDA under bf16 autocast its frozen Linear / patch-embedding weights are stored in
    bf16 (the same matmul inputs, so bit-identical logits; half the weight memory, no cast per step)."""
    model.to(device)
    if bf16 and device.type == "cuda":
        model.store_frozen_weights(torch.bfloat16)
    return model


def make_optimizer(params, lr, momentum, weight_decay, device):
    """The official SGD; fused into one kernel on CUDA (the same math)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=device.type == "cuda")


def make_train_step(model, optimizer, loss_fn, device, bf16=True, compile=False):
    """One SGD step. The forward under bf16 autocast and loss_fn(output, targets) -> (fp32 loss, stats) form one
    compiled region; then backward, the all-reduce of the trainable gradients, the optimizer step. Returns
    step(inputs, targets) -> (detached loss, stats) as device tensors; it never syncs with the host."""
    def forward_loss(inputs, targets):
        with autocast(device, bf16):
            output = model(inputs)
        return loss_fn(output, targets)
    forward_loss = compiled(forward_loss, compile)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs, targets):
        loss, stats = forward_loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params)
        optimizer.step()
        gp.project_temperatures(model)   # Eq. 9's tau back into [0.01, 10]: projected SGD
        return loss.detach(), stats
    return step
