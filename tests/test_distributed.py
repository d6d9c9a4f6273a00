"""Data parallelism with torch.distributed (gloo on CPU) and sweeps spread over worker processes."""
import argparse
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import data
import reproduce
import runtime

TINY = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)
CFG = dict(reproduce.DEMO, method="gated+temp", arch_overrides=TINY, num_classes=6, epochs=3, warmup_epochs=1, bf16=False,
           compile=False, prompt_dropout=0.0, batch_size=32)  # no dropout: masks would differ across ranks


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(results_dir, **kw):
    defaults = dict(results_dir=str(results_dir), data_dir="data", cache_dir=None, checkpoint=None,
                    resume=False, sweep=False, seeds=1)
    return argparse.Namespace(**dict(defaults, **kw))


def _join(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    return runtime.init_distributed()


def _train_rank(rank, world_size, port, results_dir):
    _join(rank, world_size, port)
    reproduce.run_one(dict(CFG), "final", args_for(results_dir), torch.device("cpu"))
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = reproduce.run_one(dict(CFG), "final", args_for(tmp_path / "single"), torch.device("cpu"))
    mp.spawn(_train_rank, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    name = reproduce.run_name(CFG, "final")
    ddp = json.loads((tmp_path / "ddp" / f"{name}.json").read_text())
    assert ddp["world_size"] == 2
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
    loader = data.BatchLoader(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels, 2, train=False, crop_size=8,
                              rank=rank, world_size=world_size)
    shards = [None] * world_size
    torch.distributed.all_gather_object(shards, loader.sample_indices().tolist())
    seen = torch.tensor([i for shard in shards for i in shard])

    class Oracle(torch.nn.Module):  # right on the first n // 2 images (by their label pattern), wrong after
        def forward(self, images):
            return self.logits.pop(0)
    oracle = Oracle()
    idx = loader.sample_indices()
    oracle.logits = [torch.nn.functional.one_hot(torch.where(i < n // 2, labels[i], (labels[i] + 1) % 3), 3).float()
                     for i in idx.split(2)]
    acc = reproduce.evaluate(oracle, loader, torch.device("cpu"), bf16=False)
    if rank == 0:
        torch.save({"seen": seen, "acc": acc}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world_size,n", [(2, 7), (3, 10)])
def test_sharded_evaluation_counts_every_image_exactly_once(tmp_path, world_size, n):
    mp.spawn(_eval_rank, args=(world_size, free_port(), n, str(tmp_path / "out.pt")), nprocs=world_size, join=True)
    out = torch.load(tmp_path / "out.pt")
    assert sorted(out["seen"].tolist()) == list(range(n))
    assert out["acc"] == pytest.approx(100.0 * (n // 2) / n)


def test_a_sweep_spread_over_two_workers_equals_the_serial_sweep(tmp_path):
    cfg = dict(CFG, epochs=2, lr_grid=[0.1, 1.0])
    serial = reproduce.run_cells([cfg], args_for(tmp_path / "serial", sweep=True, workers=1), torch.device("cpu"))
    spread = reproduce.run_cells([cfg], args_for(tmp_path / "spread", sweep=True, workers=2), torch.device("cpu"))
    assert serial[0][0]["lr"] == spread[0][0]["lr"]
    assert serial[1][0][0]["final"] == pytest.approx(spread[1][0][0]["final"])
    name = reproduce.run_name(dict(cfg, lr=0.1), "sweep")
    a = torch.load(tmp_path / "serial" / f"{name}.prompts.pt")
    b = torch.load(tmp_path / "spread" / f"{name}.prompts.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
