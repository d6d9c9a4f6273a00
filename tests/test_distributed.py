"""Data parallelism with torch.distributed (gloo on CPU) and sweeps spread over worker processes."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import forkserver, settings, start_forkserver, tiny_demo
from harness.data import batches as batching
from harness.data import datasets
from harness import config
from harness import results
from harness import runtime
from harness import runs
from harness import classification

start_forkserver()   # the tests below fork their processes from it; its imports run meanwhile

CFG = tiny_demo(epochs=3, prompt_dropout=0.0, batch_size=32)   # no prompt dropout: the masks would differ across ranks


def ranks(fn, world_size, *args, join=True):
    """fn(rank, world_size, port, *args) in world_size processes at once (a new port each time), forked from the
    tests' fork server (conftest.forkserver), so none imports torch again. join: wait for them (an exception in
    one is raised here); else their torch ProcessContext, whose join() is true once all have ended."""
    forkserver()
    return mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=join,
                              start_method="forkserver")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    return runtime.init_distributed()


def _train_rank(rank, world_size, port, results_dir):
    _join(rank, world_size, port)
    runs.run_one(CFG, "final", settings(Path(results_dir), results_dir=results_dir))
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    ddp_ranks = ranks(_train_rank, 2, str(tmp_path / "ddp"), join=False)
    single = runs.run_one(CFG, "final", settings(tmp_path, results_dir=str(tmp_path / "single")))   # meanwhile
    while not ddp_ranks.join():
        pass
    name = results.run_name(CFG, "final")
    ddp = json.loads((tmp_path / "ddp" / f"{name}.json").read_text())
    assert ddp["runtime"]["world_size"] == 2
    assert ddp["final"]["test_acc"] == pytest.approx(single["final"]["test_acc"], abs=1e-9)
    for h1, h2 in zip(single["history"], ddp["history"]):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-4)
    a = torch.load(tmp_path / "single" / f"{name}.prompts.pt")
    b = torch.load(tmp_path / "ddp" / f"{name}.prompts.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _eval_rank(rank, world_size, port, n, out):
    _join(rank, world_size, port)
    labels = torch.arange(n) % 3
    split = datasets.ImageSplit.from_dense("demo", "test", torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels)
    loader = batching.BatchLoader(split, 2, train=False, crop_size=8, rank=rank, world_size=world_size)
    shards = [None] * world_size
    torch.distributed.all_gather_object(shards, loader.sample_indices().tolist())
    seen = torch.tensor([i for shard in shards for i in shard])

    class Oracle(torch.nn.Module):  # right on the first n // 2 images (by their label pattern), wrong after
        def forward(self, images):
            return self.logits.pop(0)
    oracle = Oracle()
    batches = [chunk.tolist() for chunk in loader.sample_indices().split(2)]
    oracle.logits = [torch.nn.functional.one_hot(torch.tensor(
        [labels[i] if i < n // 2 else (labels[i] + 1) % 3 for i in chunk + chunk[-1:] * (2 - len(chunk))]), 3).float()
        for chunk in batches]   # padded rows repeat the last real one (their label is PAD_LABEL)
    correct, count = classification.evaluate(classification.make_eval_step(oracle, torch.device("cpu"), False, False), oracle, loader)
    if rank == 0:
        torch.save({"seen": seen, "acc": classification.accuracy(correct, count)}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world_size,n", [(2, 7), (3, 10)])
def test_sharded_evaluation_counts_every_image_exactly_once(tmp_path, world_size, n):
    ranks(_eval_rank, world_size, n, str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt")
    assert sorted(out["seen"].tolist()) == list(range(n))
    assert out["acc"] == pytest.approx(100.0 * (n // 2) / n)


def test_a_sweep_spread_over_two_workers_equals_the_serial_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.1}, {"lr": 1.0}])
    cfg = CFG.replace(epochs=2)
    serial = runs.run_cells([cfg], settings(tmp_path, results_dir=str(tmp_path / "serial"), workers=1), sweep=True)
    spread = runs.run_cells([cfg], settings(tmp_path, results_dir=str(tmp_path / "spread"), workers=2), sweep=True)
    assert serial[0][0].lr == spread[0][0].lr
    assert serial[1][0][0]["final"] == pytest.approx(spread[1][0][0]["final"])
    name = results.run_name(cfg.replace(lr=0.1), "sweep")
    a = torch.load(tmp_path / "serial" / f"{name}.prompts.pt")
    b = torch.load(tmp_path / "spread" / f"{name}.prompts.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_torchrun_with_download_fetches_each_file_once(tmp_path):
    """`torchrun --nproc_per_node 2 ... --download` on a fresh machine: rank 0 fetches the checkpoint and CUB
    (the checkpoint held half-way for half a second, so a rank that did not wait would ask too), the other rank
    then uses them."""
    import release_archives as ra
    server = ra.Server()
    try:
        server.files = ra.build_release_files(tmp_path / "release")
        server.files["mae_pretrain_vit_base.pth"] = ra.tiny_checkpoint()
        gate = server.gates["mae_pretrain_vit_base.pth"] = threading.Event()
        halfway = server.halfway["mae_pretrain_vit_base.pth"] = threading.Event()

        def hold_half_a_second():   # from the moment rank 0 has half the file
            if halfway.wait(600):
                time.sleep(0.5)
            gate.set()
        threading.Thread(target=hold_half_a_second, daemon=True).start()
        (tmp_path / "pins.json").write_text(json.dumps(ra.pins_json(server.files)))
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ra.__file__,
             str(tmp_path / "pins.json"), "tiny-run", str(tmp_path / "results"), str(tmp_path / "data"),
             str(tmp_path / "checkpoints"), server.mirror],
            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    finally:
        server.gates["mae_pretrain_vit_base.pth"].set()
        server.close()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(server.gets()) == ["CUB_200_2011.tgz", "mae_pretrain_vit_base.pth"]
    [result] = (tmp_path / "results" / "cub").rglob("*final*.json")
    assert json.loads(result.read_text())["runtime"]["world_size"] == 2


def test_torchrun_without_the_checkpoint_is_rank_0s_one_line_and_no_rank_traceback(tmp_path):
    """`torchrun --nproc_per_node 2 reproduce.py --task cub --ssl mae` with no checkpoint: rank 0 says what is
    missing once and exits 2 (torchrun's root cause: exit 2); the other rank stops without a word of its own
    (before: a broken-connection traceback from its barrier per rank)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).resolve().parents[1] / "reproduce.py"), "--task", "cub", "--ssl", "mae",
         "--results-dir", str(tmp_path / "results")],   # its checkpoints/ folder: none here
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and text.count("error: backbone checkpoint not found") == 1, text[-3000:]
    assert "[rank" not in text and "Connection closed by peer" not in text, text[-3000:]
    root_cause = text.split("Root Cause (first observed failure):")[1]   # rank 0, or the other as it ends too
    assert "exitcode  : 2" in root_cause, root_cause
