"""Plumbing shared by the classification and segmentation harnesses: device and precision,
seeding, atomic result files, resumable training checkpoints, data-parallel helpers."""
import contextlib
import hashlib
import json
import os
import random
import subprocess
import tempfile

import numpy as np
import torch
import torch.distributed as dist

EXIT_BAD_INPUT = 2  # missing data / checkpoint, corrupt file, bad label: a user error, not a crash


class UserError(Exception):
    """Bad input that the user can fix; the message says what was expected and where."""


class NonFiniteLoss(RuntimeError):
    pass

# --- device and precision ------------------------------------------------------


def pick_device(name=None):
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


def atomic_write(path, write):
    """Write through write(binary file) to a temporary file beside `path`, then rename: readers never see
    a half-written file, and a crash leaves the old one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def save_training_state(path, model, optimizer, scheduler, step, history, extra=None):
    """Prompt-side parameters, optimizer, scheduler, RNG and history: enough to resume bit-for-bit."""
    state = {"model": model.prompt_state_dict() if hasattr(model, "prompt_state_dict") else model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "history": history, "rng": rng_state(), "extra": extra or {}}
    atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path, model, optimizer, scheduler):
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    trainable = set(model.prompt_state_dict()) if hasattr(model, "prompt_state_dict") else set()
    if unexpected or (trainable and set(missing) & trainable):
        raise UserError(f"{path}: resume state does not match this model (missing {sorted(set(missing) & trainable)}, "
                        f"unexpected {unexpected}); was it written with other --method / --num-prompts?")
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


def check_finite(loss, where):
    """Stop on NaN/inf (one host sync; call it once per logging interval, not per step)."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f"loss became {loss.item()} at {where}; lower --lr or check the data. "
                            "The last good epoch's state is kept for --resume.")

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

# --- the training step (shared by reproduce.py and bench.py) ----------------------


def make_train_step(model, optimizer, device, bf16=True, compile=False):
    """One SGD step: forward under bf16 autocast (fused attention), loss in fp32, backward, all-reduce of
    the trainable gradients, step. Returns (detached loss, number of correct predictions) as device
    tensors; never syncs with the host."""
    forward = torch.compile(model) if compile else model
    params = [p for p in model.parameters() if p.requires_grad]

    def step(images, labels):
        with autocast(device, bf16):
            logits = forward(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params)
        optimizer.step()
        return loss.detach(), (logits.detach().argmax(-1) == labels).sum()
    return step, forward
