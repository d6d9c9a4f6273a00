"""What the tests share: one thread per test process, the tiny ViT, the tiny demo config, test Settings, and the
command line run in this process. Import the helpers with `from conftest import ...` (pytest puts tests/ on the
path, as for fixtures.py)."""
import gc
import subprocess

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
