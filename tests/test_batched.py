"""Many runs in one batch (harness.batched): each run's numbers are those of the same run trained alone, a
diverging run leaves the batch without touching the others, and a killed batched job resumes to bitwise the
uninterrupted results."""
import os
import signal
import time
from pathlib import Path

import torch

from conftest import process_of, settings, start_forkserver, tiny_demo, wait_until
from harness import batched
from harness import classification
from harness import config
from harness import runtime
from harness.data import datasets

CPU = torch.device("cpu")
start_forkserver()   # the real processes below fork from it; its imports run meanwhile


def sweep_cfgs():
    """Three runs of one graph key: an lr x weight decay x seed sweep (the tiny demo, no prompt dropout)."""
    base = tiny_demo(num_classes=4, prompt_dropout=0.0, batch_size=8, epochs=3, warmup_epochs=1)
    return [base.replace(lr=0.5, weight_decay=0.0), base.replace(lr=2.0, weight_decay=1e-3, seed=1),
            base.replace(lr=0.1, weight_decay=1e-2, seed=2)]


def model_of(cfg, dtype=torch.float32):
    """The run's model (prompts and head drawn from its seed) on one random backbone, as a checkpoint would be."""
    torch.manual_seed(0)
    backbone = config.model_from_config(cfg, cfg.num_classes, verbose=False).backbone_state_dict()
    torch.manual_seed(cfg.seed)
    model = config.model_from_config(cfg, cfg.num_classes, verbose=False)
    model.load_state_dict(backbone, strict=False)
    return model.to(dtype)


def batches_of(seed, steps, rows=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (rows,), generator=g)) for _ in range(steps)]


def test_batched_runs_take_the_steps_of_their_solo_runs_in_float64():
    """4 SGD steps (momentum, each run's own lr, weight decay with VPT's head-bias rule, its own images): every
    trainable tensor of every run equals the run trained alone by runtime.make_train_step to 1e-10."""
    cfgs = [c.replace(warmup_epochs=0) for c in sweep_cfgs()]   # the first epoch's lr factor is 1
    data = [batches_of(100 + r, 4) for r in range(3)]
    solo = []
    for cfg, run_data in zip(cfgs, data):
        model = model_of(cfg, torch.float64)
        opt = runtime.make_optimizer(classification.decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum,
                                     cfg.weight_decay, CPU)
        step = runtime.make_train_step(model, opt, classification.classification_loss, CPU, bf16=False)
        model.train()
        for images, labels in run_data:
            step(images, labels)
        solo.append(model.prompt_state_dict())
    models = batched.share_backbone([model_of(c, torch.float64) for c in cfgs])
    job = batched.Job(cfgs, models, [None] * 3, runtime.Settings(quiet=True), [0, 1, 2])
    job.batch.train()
    for parts in zip(*data):
        job.step(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    moved = 0
    for model, expected in zip(models, solo):
        got = model.prompt_state_dict()
        assert set(got) == set(expected) and {"prompts", "gate_logits", "temperatures", "head.weight"} <= set(got)
        for k in expected:
            assert (got[k] - expected[k]).abs().max() < 1e-10, k
        moved += (got["prompts"] - model_of(cfgs[0], torch.float64).prompts).abs().max() > 0
    assert moved == 3


def tiny_splits(seed, classes=4, per_class=4):
    images, labels = datasets.make_synthetic_images(classes, per_class, 40, seed=seed)
    split = datasets.ImageSplit.from_dense("demo", "train", images, labels)
    return split, {"test": split}


def fit_batched(cfgs, tmp_path, **kw):
    models = [model_of(c) for c in cfgs]
    splits = [tiny_splits(c.seed) for c in cfgs]
    paths = [tmp_path / f"state{c.seed}-{c.lr}.pt" for c in cfgs]
    return batched.fit_batched(cfgs, models, [s for s, _ in splits], [e for _, e in splits],
                               settings(tmp_path, **kw), paths), models


def test_a_diverging_run_leaves_the_batch_and_the_others_go_on(tmp_path):
    """A run at lr 1e30 becomes NaN in its first epoch: recorded as diverged, no metrics; the two others end with
    the numbers they reach in a batch without it (fp32: to rounding)."""
    cfgs = sweep_cfgs()
    wild = cfgs[1].replace(lr=1e30, seed=7)
    with_wild, models = fit_batched([cfgs[0], wild, cfgs[2]], tmp_path / "a")
    without, models_without = fit_batched([cfgs[0], cfgs[2]], tmp_path / "b")
    assert with_wild[1].diverged.startswith("loss became nan") and with_wild[1].final == {}
    assert len(with_wild[1].history) < 3
    for got, expected, m, e in zip([with_wild[0], with_wild[2]], without, [models[0], models[2]], models_without):
        assert got.diverged is None and len(got.history) == 3
        assert abs(got.history[-1]["loss"] - expected.history[-1]["loss"]) < 1e-5
        assert got.final == expected.final
        a, b = m.prompt_state_dict(), e.prompt_state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_runs_of_other_graph_keys_or_schedules_are_refused():
    cfgs = sweep_cfgs()
    try:
        batched.check_batchable([cfgs[0], cfgs[1].replace(num_prompts=3)], [range(2), range(2)])
    except ValueError as e:
        assert "graph key" in str(e)
    else:
        raise AssertionError("two graph keys were batched")


def batched_job(path, hang, resume):
    """A job's process (see process_of): the three long runs in one batch into `path`, states every 2 epochs; with
    `hang`, it prints "saved" after epoch 2's states and waits there (to be killed); at the end out.pt holds every
    run's metrics, losses and trained tensors."""
    runtime.SAVE_EVERY = 2
    if hang:
        real, saves = runtime.save_training_state, []

        def save_then_hang(path, *args, **kwargs):
            real(path, *args, **kwargs)
            saves.append(Path(path))
            if len(saves) == 3:          # epoch 2's states of all three runs: a long run would go on here
                while not all(p.exists() for p in saves):   # written off this thread (runtime.StateWriter)
                    time.sleep(0.01)
                print("saved", flush=True)
                time.sleep(600)
        runtime.save_training_state = save_then_hang
    outcomes, models = fit_batched(sweep_cfgs_long(), Path(path), resume=resume)
    torch.save({"final": [o.final for o in outcomes], "loss": [[h["loss"] for h in o.history] for o in outcomes],
                "state": [m.prompt_state_dict() for m in models]}, Path(path) / "out.pt")


def sweep_cfgs_long():
    return [c.replace(epochs=5, prompt_dropout=0.1) for c in sweep_cfgs()]


def test_a_killed_batched_job_resumes_to_bitwise_the_uninterrupted_results(tmp_path):
    """A real process trains 3 runs in one batch (prompt dropout on: the masks come from the saved RNG), is
    killed (SIGKILL) after its epoch-2 states, and a new process resumes: every run's losses, metrics and trained
    tensors equal bitwise those of an uninterrupted run (here, one thread as in the children)."""
    cut_dir, log = tmp_path / "cut", tmp_path / "cut.log"
    cut_dir.mkdir()
    cut = process_of(batched_job, str(cut_dir), True, False, out=log, err=tmp_path / "cut.err")
    try:
        outcomes, models = fit_batched(sweep_cfgs_long(), tmp_path / "full")   # meanwhile, uninterrupted, here
        a = {"final": [o.final for o in outcomes], "loss": [[h["loss"] for h in o.history] for o in outcomes],
             "state": [m.prompt_state_dict() for m in models]}
        wait_until(lambda: log.read_text() or not cut.is_alive(), says=lambda: (tmp_path / "cut.err").read_text())
        assert log.read_text().splitlines()[0] == "saved" and cut.is_alive(), (tmp_path / "cut.err").read_text()
    finally:
        cut.kill()
        cut.join()
    states = sorted(p.name for p in cut_dir.glob("state*.pt"))
    assert len(states) == 3 and not (cut_dir / "out.pt").exists()
    resumed = process_of(batched_job, str(cut_dir), False, True, out=tmp_path / "resumed.log")
    resumed.join()
    assert resumed.exitcode == 0, (tmp_path / "resumed.log").read_text()
    b = torch.load(cut_dir / "out.pt")
    assert a["final"] == b["final"] and a["loss"] == b["loss"] and len(a["loss"][0]) == 5
    for x, y in zip(a["state"], b["state"]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_sweep_through_the_queue_trains_its_points_in_one_batch_each_with_its_own_files(tmp_path, monkeypatch,
                                                                                          capsys):
    """The sweep of --sweep (runs.picked_configs, what run_cells runs before the final runs) on a VTAB fixture (real
    JPEGs, a checkpoint file): the 3 lr points train in one batch, each leaves its own result, prompts and pack;
    with prompt dropout off their val accuracies and trained prompts are those of the same points run one at a
    time (runs_per_batch 1, the official code's way)."""
    import fixtures
    from test_reproduce import write_tiny_mae_checkpoint, tiny_cell
    from harness import results, runs
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.1}, {"lr": 0.5}, {"lr": 2.0}])
    cell = tiny_cell(prompt_dropout=0.0, batch_size=4)   # 9 training images: 3 steps an epoch, not 1 of 128 rows
    outs = {}
    for per_batch in (None, 1):
        s = settings(tmp_path / str(per_batch), checkpoint=str(ckpt), data_dir=str(tmp_path / "data"),
                     runs_per_batch=per_batch)
        runs.picked_configs([cell], s)
        outs[per_batch] = [results.run_files(s.results_dir, cell.replace(lr=lr), "sweep") for lr in (0.1, 0.5, 2.0)]
    assert "in batches" in capsys.readouterr().out
    for together, alone in zip(outs[None], outs[1]):
        a, b = results.read_result(together.result), results.read_result(alone.result)
        assert a["batched_runs"] == 3 and "batched_runs" not in b
        assert a["final"] == b["final"] and together.pack.is_file() and together.prompts.is_file()
        pa, pb = torch.load(together.prompts), torch.load(alone.prompts)
        assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pb)


def test_a_stop_signal_in_a_batched_sweep_stops_after_the_step_keeps_every_state_and_resumes_bitwise(
        tmp_path, monkeypatch):
    """SIGTERM (a SLURM time limit) delivered to this process while a sweep's 3 lr points train in one batch, after
    epoch 2's first step: the batch stops before its next step (runtime.Stopped saying how many runs keep their
    states), every point keeps its epoch-1 state and no claim is left; --resume then ends with bitwise the numbers
    and prompts of an uninterrupted batched sweep."""
    import pytest
    import fixtures
    from test_reproduce import write_tiny_mae_checkpoint, tiny_cell
    from harness import results, runs
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd")
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.1}, {"lr": 0.5}, {"lr": 2.0}])
    cell = tiny_cell(epochs=3, batch_size=4)   # 9 training images: 2-3 steps an epoch

    def run(folder, resume=False):
        s = settings(tmp_path / folder, checkpoint=str(ckpt), data_dir=str(tmp_path / "data"), resume=resume)
        runs.picked_configs([cell], s)   # --sweep's sweep (its final run is not what this checks)

    def files(folder):
        return [results.run_files(tmp_path / folder / "results", cell.replace(lr=lr), "sweep") for lr in (0.1, 0.5, 2.0)]
    run("whole")
    real_points, epochs = runtime.step_points, []

    def signalled(batches):   # the batched loop takes one step_points per epoch
        epochs.append(1)
        for step, item in enumerate(real_points(batches)):
            yield item
            if len(epochs) == 2 and step == 0:
                os.kill(os.getpid(), signal.SIGTERM)
    old_handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(runtime, "step_points", signalled)
    try:
        runtime.handle_stop_signals()
        with pytest.raises(runtime.Stopped) as stopped:
            run("stopped")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        runtime._STOP.update(signum=None, pid=None)
    assert stopped.value.summary.startswith("3 runs trained in one batch keep their states (")
    assert len(epochs) == 2
    for f in files("stopped"):
        assert f.state.is_file() and not f.claim.exists() and not f.result.exists()
        assert torch.load(f.state, weights_only=True)["step"] == 0          # epoch 1's state
    monkeypatch.setattr(runtime, "step_points", real_points)
    run("stopped", resume=True)
    for a, b in zip(files("whole"), files("stopped")):
        ra, rb = results.read_result(a.result), results.read_result(b.result)
        assert ra["final"] == rb["final"] and [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
        pa, pb = torch.load(a.prompts), torch.load(b.prompts)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
