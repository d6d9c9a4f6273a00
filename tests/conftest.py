"""What the tests share: one thread per test process, the tiny ViT, the tiny demo config, test Settings, the
command line run in this process, and real processes that skip importing torch. Import the helpers with
`from conftest import ...` (pytest puts tests/ on the path, as for fixtures.py)."""
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import config
from harness import runtime

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)   # the tests' small ViT (arch_overrides)


def tiny_demo(**changes):
    """The demo's recipe on TINY_VIT with 6 classes, 2 epochs of which 1 warm-up: a CPU run of seconds.
    `changes` replace any field (checked like any config)."""
    return config.resolve("demo", arch_overrides=TINY_VIT, num_classes=6, epochs=2, warmup_epochs=1).replace(**changes)


def settings(tmp_path, **changes):
    """runtime.Settings of a test run: results in tmp_path/results, data in tmp_path/data, no progress output."""
    return runtime.Settings(**dict(dict(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"),
                                        quiet=True), **changes))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: extra intra-op threads only add spin-waits, which cost seconds per step on a
    busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def frozen_imports():
    """Move the ~400k objects of the imported modules (torch, timm, ...) out of the garbage collector's view: they
    live as long as the process, and every full collection (the harness's gc.collect between bench units, Python's
    own gen-2 passes) would otherwise walk them all (~0.25 s each). Objects made later are collected as before."""
    gc.freeze()
    yield


@pytest.fixture
def cli(capsys, monkeypatch):
    """`python reproduce.py ARGV` in this process: cli(*argv, cwd=None) -> a CompletedProcess with the exit code
    (cli_main's, or argparse's for --help and unknown flags), stdout and stderr."""
    import reproduce

    def run(*argv, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = reproduce.cli_main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)
    return run


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up (needs root and `mount`; skipped where they are missing)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    except OSError:
        mounted = None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# Imported once by multiprocessing's fork server (a process of its own that runs no test and no torch op, so forking
# it is safe): processes forked from it start in ~0.1 s instead of the ~3 s of importing these again.
PRELOADED = ["torch", "torch.distributed", "torchvision.transforms.functional", "numpy", "PIL.Image", "tqdm",
             "yaml", "submitit"]


def forkserver():
    """multiprocessing's forkserver context, its server (started at the first use) preloading PRELOADED. Also for
    torch.multiprocessing.start_processes(..., start_method="forkserver")."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)   # no effect once the server runs
    return context


def start_forkserver():
    """Start the fork server now, so that its imports run beside what runs next (a test module whose tests start
    processes calls this when it is imported: during collection). Not in those processes, which import the module
    too."""
    if multiprocessing.current_process().name == "MainProcess":
        forkserver()
        multiprocessing.forkserver.ensure_running()


def _run_in_this_process(target, args, env, cwd, out, err):
    """A process_of child: the caller's environment and working directory, stdout appended to the file `out` and
    stderr to `err`, one thread, then sys.exit(target(*args)) (its exit code, as for `python -c`; an exception:
    its traceback on stderr, exit code 1)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    sys.exit(target(*args))


def process_of(target, *args, out, err=None, cwd=None):
    """A started real process that runs target(*args) (a module-level function): its own pid, signal handlers,
    file locks and exit code (.exitcode; -N when killed by signal N), forked from the fork server instead of a
    fresh interpreter. This process's environment and sys.path, working directory `cwd` (default: this one);
    stdout appended to the file `out`, stderr to `err` (default: `out` too). Daemonic: killed if the test session
    ends first."""
    for path in (out, err or out):
        open(path, "a").close()   # there to be read at once
    process = forkserver().Process(target=_run_in_this_process, daemon=True, args=(
        target, args, dict(os.environ), str(cwd or os.getcwd()), str(out), str(err or out)))
    process.start()
    return process


def start_together(procs, go, logs, meanwhile=lambda: None, timeout=600):
    """Processes that each create <go>.ready-<pid> when ready and then wait for the file `go`: start them at the
    same moment, run meanwhile() here, wait for them (killing any left over). Returns (their logs' text, what
    meanwhile returned)."""
    try:
        wait_until(lambda: len(list(Path(go).parent.glob(f"{Path(go).name}.ready-*"))) == len(procs)
                   or not all(p.is_alive() for p in procs), says=lambda: [log.read_text() for log in logs])
        Path(go).touch()
        done = meanwhile()
        for p in procs:
            p.join(timeout)
    finally:
        for p in procs:
            p.kill()
    return [log.read_text() for log in logs], done


def wait_until(condition, timeout=300, says=lambda: ""):
    """Poll condition() every 0.02 s until it is true; after `timeout` seconds fail with says()."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {timeout} s: {says()}")
        time.sleep(0.02)
