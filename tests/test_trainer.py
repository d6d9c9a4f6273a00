"""Classification training as the official code trains, and a fast path whose claims are provable on a CPU."""
import math
import os

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from conftest import TINY_VIT as TINY, settings, tiny_demo
from harness.data import batches as batching
from harness.data import datasets
import fixtures
import gated_prompt as gp
from harness import config
from harness import runtime
from harness import classification


def tiny_run(cfg, tmp_path, **kw):
    """One config through classification.fit, the entry point run_classification and bench call."""
    torch.manual_seed(cfg.seed)
    model = config.model_from_config(cfg, cfg.head_size(), verbose=False)
    train_split, evals = classification.demo_splits(cfg)
    return classification.fit(cfg, model, train_split, evals, settings(tmp_path, **kw), tmp_path / "state.pt"), model


# --- the recipe -----------------------------------------------------------------------------------

def test_schedule_warms_up_linearly_from_zero_then_cosine_to_zero():
    f = [classification.lr_factor(e, 10, 100) for e in range(100)]
    assert f[0] == 0 and f[5] == 0.5 and f[10] == 1.0
    assert f[55] == pytest.approx(0.5) and f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_every_setting_of_a_resolved_config_reaches_the_model():
    """arch (and its pooling), img size, prompts, gate init, insertion block, dropout, head size."""
    cfg = config.resolve("cub", "mocov3", "gated+temp", arch="vit_small", num_prompts=7, gate_init=2.0,
                          insert_at=3, prompt_dropout=0.2)
    with torch.device("meta"):
        model = config.model_from_config(cfg.replace(img_size=320), cfg.head_size(), verbose=False)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads, model.cfg.pool) == (384, 12, 12, "cls")
    assert model.cfg.img_size == 320 and model.pos_embed.shape[1] == 1 + 20 * 20
    assert (model.num_prompts, model.pcfg.insert_at, model.pcfg.prompt_dropout) == (7, 3, 0.2)
    assert model.pcfg.gate_init == 2.0 and model.gate_logits.shape == (11,) and model.temperatures is not None
    assert model.head.out_features == 200 and model.cfg.pos_embed_interpolation == "bicubic"
    deep = config.resolve("dtd", "mae", "vpt-deep")
    with torch.device("meta"):
        model = config.model_from_config(deep, deep.head_size(), verbose=False)
    assert (model.cfg.pool, model.num_prompts, model.deep_prompts.shape[0], model.head.out_features) == ("mean", 10, 11, 47)


def test_a_short_cpu_run_learns(tmp_path):
    outcome, model = tiny_run(tiny_demo(epochs=5, num_classes=6), tmp_path)
    assert outcome.final["test_acc"] > 70  # 6 classes: chance is 16.7 %
    assert outcome.history[-1]["loss"] < outcome.history[1]["loss"]
    assert outcome.eval_seconds > 0 and outcome.train_seconds > 0
    gates = runtime.learned_gates(model)
    assert len(gates["selection_ratio"]) == TINY["depth"] - 1 and len(gates["temperatures"]) == TINY["depth"]


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path):
    with pytest.raises(runtime.NonFiniteLoss, match="loss became .* at epoch 1") as err:
        tiny_run(tiny_demo(num_classes=5, lr=1e30, epochs=3, warmup_epochs=0), tmp_path)
    assert not err.value.state_saved and not (tmp_path / "state.pt").exists()


def test_a_non_finite_loss_after_the_first_epoch_keeps_the_last_good_state(tmp_path, monkeypatch):
    """Epoch 1 runs at lr 0 (warm-up from 0) and saves its state (a state every epoch here); epoch 2 at lr 1e30
    blows up."""
    monkeypatch.setattr(runtime, "SAVE_EVERY", 1)
    with pytest.raises(runtime.NonFiniteLoss, match="loss became .* at epoch 2") as err:
        tiny_run(tiny_demo(num_classes=5, lr=1e30, epochs=3, warmup_epochs=1), tmp_path)
    assert err.value.state_saved
    assert (tmp_path / "state.pt").is_file() and torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 0


def test_cpu_runs_flush_denormals(tmp_path, monkeypatch):
    """Denormal floats make CPU arithmetic 6-25x slower once a loss saturates; runs flush them to zero."""
    seen = []
    real = classification.train

    def spy(*args, **kwargs):
        seen.append(float(torch.tensor(1e-39) * 1))
        return real(*args, **kwargs)
    monkeypatch.setattr(classification, "train", spy)
    cfg = tiny_demo(num_classes=5, epochs=1)
    classification.run_classification(cfg, "final", settings(tmp_path), tmp_path / "state.pt")
    assert seen == [0.0]
    assert float(torch.tensor(1e-39) * 1) != 0.0   # and the process setting is restored afterwards


def test_one_imagenet_normalisation_as_torchvision_normalises():
    """datasets.imagenet_normalize is ToTensor + Normalize with ImageNet's mean and std (typed in), for uint8
    pixels and for [0, 1] floats, and the training and evaluation batches come out of it."""
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = TF.normalize(images.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(datasets.imagenet_normalize(images), expected)
    torch.testing.assert_close(datasets.imagenet_normalize(images.float() / 255, max_value=1.0), expected)
    split = datasets.ImageSplit.from_dense("demo", "test", images, torch.arange(6) % 3)
    (batch, _), = batching.BatchLoader(split, 6, train=False, crop_size=32)
    torch.testing.assert_close(batch, TF.center_crop(expected, 32))


# --- static shapes: one training graph and one evaluation graph per run ------------------------------

def test_padded_masked_step_gives_the_unpadded_gradients():
    """The last batch is padded to full size with PAD_LABEL rows: the loss is the mean over the real rows, so the
    gradients equal those of the official unpadded batch."""
    torch.manual_seed(0)
    model = config.model_from_config(tiny_demo(num_classes=5, prompt_dropout=0.0), 5, verbose=False).train()
    images = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4])

    def grads(x, y):
        model.zero_grad()
        loss, correct = classification.classification_loss(model(x), y)
        loss.backward()
        return loss.detach(), correct, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss, correct, unpadded = grads(images, labels)
    padded_images = torch.cat([images, images[:3]])
    padded_labels = torch.cat([labels, torch.full((3,), batching.PAD_LABEL)])
    loss_p, correct_p, padded = grads(padded_images, padded_labels)
    assert torch.allclose(loss, loss_p) and int(correct) == int(correct_p)
    assert set(padded) == set(unpadded) == {"prompts", "gate_logits", "temperatures", "head.weight", "head.bias"}
    for name in unpadded:
        assert torch.allclose(unpadded[name], padded[name], rtol=1e-5, atol=1e-7), name
    other = grads(images[:4], labels[:4])[2]   # ...and is not a degenerate equality
    assert not torch.allclose(other["head.weight"], unpadded["head.weight"])


def compiled_demo(depth=1, **changes):
    """tiny_demo on `depth` blocks, for the tests that count compiled graphs: dynamo traces every block in Python, so
    a cold compile costs ~0.4 s less per block left out. The tests of which graphs a run builds or reuses take 1
    block; the one that checks for graph breaks takes 2, so that the gate between two blocks is traced too."""
    return tiny_demo(arch_overrides=dict(TINY, depth=depth), **changes)


def small_fit(cfg, tmp_path, compile):
    """classification.fit of `cfg` on 2 generated images per class, its training split also its test split: at
    batch 8, one or two steps an epoch and one evaluation batch, all the graph-counting tests need of a run."""
    torch.manual_seed(cfg.seed)
    model = config.model_from_config(cfg, cfg.head_size(), verbose=False)
    images, labels = datasets.make_synthetic_images(cfg.num_classes, 2, 40, seed=cfg.seed)
    split = datasets.ImageSplit.from_dense("demo", "train", images, labels)
    return classification.fit(cfg, model, split, {"test": split}, settings(tmp_path, compile=compile),
                              tmp_path / "state.pt")


def test_two_epochs_with_odd_batches_compile_one_train_and_one_eval_graph(tmp_path):
    """Train split 5 x 64 = 320 images at batch 48 (a last batch of 32) and a test split of 160 at the eval
    batch 256: dynamo compiles exactly two graphs -- the training step and the evaluation step -- and never
    breaks a graph or recompiles for the odd batches."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = torch._dynamo.testing.CompileCounter()
    cfg = compiled_demo(depth=2, num_classes=5, batch_size=48, epochs=2)
    outcome, _ = tiny_run(cfg, tmp_path, compile=backend)
    assert len(outcome.history) == 2 and outcome.final["test_acc"] >= 0
    assert backend.frame_count == 2, f"{backend.frame_count} graphs"
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that runs the graph dynamo traced (gm.forward) and counts graphs and their calls."""

    def __init__(self):
        self.graphs = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


def test_many_runs_in_one_process_all_run_compiled(tmp_path):
    """Table 2 runs 94 configurations in one process, heads differing per task. dynamo's recompile limit is
    keyed on code objects shared by every run, so left alone the configurations past the limit run eager
    (test_a_run_that_fell_back_to_eager_says_so). At a limit of 2 (one run's training and evaluation graph), three
    runs in a row -- 2 head sizes, 2 prompt counts -- must each put every training and evaluation step through a
    compiled graph, and the result must say so (counted, not the setting): left alone, the third would run eager.
    Each run: 2 images per class at batch 8, 2 epochs; one eval batch (256)."""
    backend = CountingBackend()
    runs = [(2, 1), (7, 1), (3, 2)]
    runtime.reset_compiler()
    with torch._dynamo.config.patch(recompile_limit=2):
        for n, (classes, prompts) in enumerate(runs):
            cfg = compiled_demo(num_classes=classes, epochs=2, warmup_epochs=0, batch_size=8)
            cfg = cfg.replace(num_prompts=prompts, insert_at=1)
            calls_before = backend.calls
            outcome = small_fit(cfg, tmp_path / str(n), backend)
            steps = 2 * math.ceil(2 * classes / 8)
            assert backend.calls - calls_before >= steps + 1, \
                f"run {n + 1} ({classes} classes, {prompts} prompts) ran eager"
            assert outcome.compile == {"compile": True, "compiled_calls": {"train": [steps, steps], "eval": [1, 1]},
                                       "all_compiled": True, "graphs": outcome.compile["graphs"]}, f"run {n + 1}"
            assert outcome.compile["graphs"] in ("cold", "reused")
    runtime.reset_compiler()


def test_a_run_that_fell_back_to_eager_says_so(capsys):
    """dynamo's silent fallback at its recompile limit (here 1: a second input shape runs eager) is counted and
    recorded: the record says "eager", counts 0 compiled calls of the second shape, and warns."""
    torch._dynamo.reset()
    double = runtime.Compiled(lambda x: x * 2, CountingBackend())
    with torch._dynamo.config.patch(recompile_limit=1):
        double(torch.ones(2))
        double(torch.ones(3))
    record = runtime.compile_record(True, train=double)
    assert record["compiled_calls"] == {"train": [1, 2]} and record["graphs"] == "eager"
    assert not record["all_compiled"]
    assert "WARNING: torch.compile was on but these steps ran eager: train 1 of 2" in capsys.readouterr().out
    torch._dynamo.reset()


def test_same_key_runs_in_one_process_compile_each_graph_once(tmp_path):
    """Three runs of one graph key (other seeds, lr, gate init and head size), then a run of another key (more
    prompts), then the first key again: dynamo builds the training and the evaluation graph once per key (counted
    by its own counters), every call runs compiled, and each result says cold / reused."""
    runtime.reset_compiler()
    torch._dynamo.utils.counters.clear()
    backend = CountingBackend()
    base = compiled_demo(num_classes=4, epochs=1, warmup_epochs=0, batch_size=8)
    cfgs = [base, base.replace(seed=1, lr=0.5), base.replace(seed=2, gate_init=2.0, num_classes=5),
            base.replace(num_prompts=3), base.replace(seed=3)]
    records = []
    for n, cfg in enumerate(cfgs):
        records.append(small_fit(cfg, tmp_path / str(n), backend).compile)
    assert [r["graphs"] for r in records] == ["cold", "reused", "reused", "cold", "reused"]
    assert all(r["all_compiled"] for r in records)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4 == backend.graphs
    assert classification.graph_key(cfgs[0]) == classification.graph_key(cfgs[2]) != \
        classification.graph_key(cfgs[3])
    assert classification.by_graph_key(cfgs) == [0, 1, 2, 4, 3]
    runtime.reset_compiler()


def test_more_graph_keys_than_fit_in_dynamos_cache_never_run_eager(tmp_path, monkeypatch):
    """Past KEYS_PER_CACHE keys (here 1) the cache is emptied before a new key compiles, so every run stays
    compiled, and never between runs of one key."""
    monkeypatch.setattr(runtime, "KEYS_PER_CACHE", 1)
    runtime.reset_compiler()
    backend = CountingBackend()
    records = []
    with torch._dynamo.config.patch(recompile_limit=2):   # raised to KEYS_PER_CACHE * GRAPHS_PER_KEY
        for n, prompts in enumerate((1, 2, 2)):
            cfg = compiled_demo(num_classes=4, epochs=1, warmup_epochs=0, batch_size=8, num_prompts=prompts)
            records.append(small_fit(cfg, tmp_path / str(n), backend).compile)
    assert [r["graphs"] for r in records] == ["cold", "cold", "reused"]
    assert all(r["all_compiled"] for r in records)
    runtime.reset_compiler()


def test_every_sample_is_trained_on_and_padding_is_ignored(tmp_path):
    """No drop_last: each epoch counts exactly the split's samples (the padded rows count for nothing)."""
    cfg = tiny_demo(num_classes=5, batch_size=48, epochs=1)
    train_split, evals = classification.demo_splits(cfg)
    train_loader, _ = classification.make_loaders(cfg, train_split, evals, torch.device("cpu"))
    model = config.model_from_config(cfg, 5, verbose=False)
    optimizer = runtime.make_optimizer(model.trainable_parameters(), 0.1, 0.9, 0.0, torch.device("cpu"))
    step = runtime.make_train_step(model, optimizer, classification.classification_loss, torch.device("cpu"), False)
    stats = classification.train_epoch(step, model, train_loader, 0, 1, torch.device("cpu"), quiet=True)
    assert int(stats["seen"]) == len(train_split) == 320 and len(train_loader) == 7


# --- host syncs -----------------------------------------------------------------------------------

def test_an_epoch_syncs_with_the_host_once_when_no_bar_is_shown(tmp_path, monkeypatch):
    """From the first training step to the final evaluation, nothing reads a device value except the one
    to_host per epoch (the epoch's metrics and the resumable state together); the NaN check reads that copy,
    so a NaN still stops the run within the epoch. (On a CPU every tensor is a host tensor, so this counts the
    reads a GPU would have to sync for: any read of a tensor that did not come back through to_host.)"""
    calls = {"to_host": 0, "reads": 0}
    counting, host_copies = {"on": False}, set()
    real_to_host, real_epoch, real_final = runtime.to_host, classification.train_epoch, classification.final_metrics

    def to_host(tree):
        calls["to_host"] += 1
        out = real_to_host(tree)
        stack = [out]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                host_copies.add(id(x))
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
        return out

    def train_epoch(*args, **kwargs):
        counting["on"] = True
        return real_epoch(*args, **kwargs)

    def final_metrics(*args, **kwargs):
        counting["on"] = False
        return real_final(*args, **kwargs)
    monkeypatch.setattr(runtime, "to_host", to_host)
    monkeypatch.setattr(classification, "train_epoch", train_epoch)
    monkeypatch.setattr(classification, "final_metrics", final_metrics)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            calls["reads"] += counting["on"] and id(self) not in host_copies
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    tiny_run(tiny_demo(num_classes=5, epochs=3), tmp_path)
    assert calls == {"to_host": 3, "reads": 0}


def test_fused_sgd_takes_the_same_step_as_the_default():
    """The CUDA path uses fused SGD: the same math as the official optimizer (checked where torch has a fused
    CPU kernel)."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(3)]
    grads = [torch.randn_like(p) for p in params]
    steps = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        try:
            opt = torch.optim.SGD(ps, lr=0.3, momentum=0.9, weight_decay=0.0, fused=fused)
            for _ in range(3):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
        except RuntimeError as err:
            pytest.skip(f"no fused SGD kernel on this device: {err}")
        steps[fused] = [p.detach() for p in ps]
    for a, b in zip(steps[False], steps[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert runtime.make_optimizer(params, 0.1, 0.9, 0.0, torch.device("cpu")).defaults["fused"] is False


# --- resume ---------------------------------------------------------------------------------------

def test_a_resumed_run_ends_with_the_same_numbers(tmp_path, monkeypatch):
    """States every 2 epochs: a run stopped after its first save (epoch 2) resumes to the same numbers."""
    monkeypatch.setattr(runtime, "SAVE_EVERY", 2)
    cfg = tiny_demo(num_classes=5, epochs=4)
    full, full_model = tiny_run(cfg, tmp_path / "a")
    (tmp_path / "b").mkdir()
    real_save, saves = runtime.save_training_state, []

    def save_then_crash(path, state, *args, **kwargs):
        real_save(path, state, *args, **kwargs)   # on disk once the run's StateWriter is done
        saves.append(state["step"])
        if len(saves) == 1:
            raise KeyboardInterrupt("killed after epoch 2")
    monkeypatch.setattr(runtime, "save_training_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(cfg, tmp_path / "b")
    monkeypatch.setattr(runtime, "save_training_state", real_save)
    with pytest.raises(runtime.UserError, match="another configuration"):   # the state belongs to this config only
        tiny_run(cfg.replace(gate_init=3.0), tmp_path / "b", resume=True)
    resumed, resumed_model = tiny_run(cfg, tmp_path / "b", resume=True)
    assert saves == [1]   # the first save came after the second epoch (0-based 1)
    assert resumed.final == full.final and resumed.elapsed_before > 0
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    a, b = full_model.prompt_state_dict(), resumed_model.prompt_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loading_prompts_refuses_another_models_state():
    model = config.model_from_config(tiny_demo(num_classes=5), 5, verbose=False)
    other = config.model_from_config(tiny_demo(num_classes=5, num_prompts=3), 5, verbose=False)
    with pytest.raises(ValueError, match="wrong shapes.*prompts"):
        model.load_prompt_state_dict(other.prompt_state_dict())
    shallow = config.model_from_config(tiny_demo(num_classes=5, method="vpt-shallow"), 5, verbose=False)
    with pytest.raises(ValueError, match="missing.*gate_logits"):
        model.load_prompt_state_dict(shallow.prompt_state_dict())
    assert isinstance(model.load_prompt_state_dict(model.prompt_state_dict()), gp.VisionTransformer)


def test_evaluation_counts_real_samples_only():
    images, labels = datasets.make_synthetic_images(3, 5, 32)  # 15 images, eval batch 8: the last batch has 7 rows of padding
    split = datasets.ImageSplit.from_dense("demo", "test", images, labels)
    loader = batching.BatchLoader(split, 8, train=False, crop_size=32)

    class Constant(torch.nn.Module):   # always predicts class 0: right on exactly 5 of the 15
        def forward(self, x):
            return F.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()
    model = Constant()
    correct, count = classification.evaluate(classification.make_eval_step(model, torch.device("cpu"), False, False), model, loader)
    assert (int(correct), int(count)) == (5, 15)


# --- disk: a split read once is streamed --------------------------------------------------------------

def test_vtab_test_split_is_streamed_never_cached_and_evaluates_the_same(tmp_path):
    """VTAB's final protocol reads its test split once: it is decoded chunk by chunk while evaluated, and only
    train800val200 (read every epoch) lands in the cache. The streamed batches hold the same images and labels
    as the fully decoded split's, so evaluation counts the same."""
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd", num_classes=3, per_class=(3, 1, 5))
    cfg = config.resolve("dtd", "mae", arch_overrides=dict(TINY, patch_size=32), epochs=1)
    train, evals = classification.load_data(cfg, settings(tmp_path, results_dir=str(tmp_path)), "final")
    assert len(train) == 12 and isinstance(evals["test"], datasets.StreamedSplit) and len(evals["test"]) == 15
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert cached and all(name.startswith("dtd-train800val200-") for name in cached)
    streamed = evals["test"]
    streamed.chunk = 4                                            # 4 + 4 + 4 + 3 images
    loader = batching.StreamedBatchLoader(streamed, 8, crop_size=224)
    whole = datasets.load_splits("dtd", tmp_path / "data" / "vtab-1k", ["test"])["test"]
    reference = batching.BatchLoader(whole, 8, train=False, crop_size=224)

    def real_rows(loader_batches):
        images, labels = zip(*[(x[y != batching.PAD_LABEL], y[y != batching.PAD_LABEL]) for x, y in loader_batches])
        return torch.cat(images), torch.cat(labels)
    assert len(loader) == 4 and len(list(loader)) == 4
    (xs, ys), (xr, yr) = real_rows(loader), real_rows(reference)
    assert torch.equal(ys, yr) and torch.equal(xs, xr) and len(ys) == 15
    torch.manual_seed(0)
    model = config.model_from_config(cfg, 47, verbose=False)
    eval_step = classification.make_eval_step(model, torch.device("cpu"), False, False)
    assert [int(v) for v in classification.evaluate(eval_step, model, loader)] == \
        [int(v) for v in classification.evaluate(eval_step, model, reference)]


# --- states written off the training thread -------------------------------------------------------------------

def test_states_are_written_off_the_training_thread_and_on_disk_when_the_loop_ends(tmp_path, monkeypatch):
    """A slow disk holds up the writer's thread, not the loop: save_training_state returns at once; leaving the
    writer's block (also by an exception: a stop signal, Ctrl-C) waits until the file is written, and the
    block's own exception goes on. The file is the state handed over, readable as a state."""
    import threading
    disk = threading.Event()
    real_write = runtime.atomic_write

    def slow_disk(path, write):
        assert threading.current_thread() is not threading.main_thread()
        disk.wait(timeout=30)
        real_write(path, write)
    monkeypatch.setattr(runtime, "atomic_write", slow_disk)
    model = config.model_from_config(tiny_demo(num_classes=5), 5, verbose=False)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    host = runtime.to_host(runtime.training_state(model, optimizer, scheduler, 3))
    path = tmp_path / "run.state.pt"
    with pytest.raises(KeyboardInterrupt):
        with runtime.StateWriter() as writer:
            runtime.save_training_state(path, host, [{"epoch": 4}], {"task": "demo"}, 1.5, writer=writer)
            assert not path.exists()                      # returned before the disk did anything
            threading.Timer(0.2, disk.set).start()
            raise KeyboardInterrupt
    state = torch.load(path, weights_only=True)           # written before the interrupt went on
    assert state["step"] == 3 and state["history"] == [{"epoch": 4}] and state["extra"]["elapsed"] == 1.5


def test_a_failed_state_write_is_raised_on_the_training_thread(tmp_path, monkeypatch):
    """A full disk during a background write is the one-line UserError of a full disk, raised in the loop at its
    next save (or when the loop ends), not lost in the writer's thread."""
    monkeypatch.setattr(runtime, "free_disk_bytes", lambda path: 10)
    model = config.model_from_config(tiny_demo(num_classes=5), 5, verbose=False)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    host = runtime.to_host(runtime.training_state(model, optimizer, scheduler, 0))
    with pytest.raises(runtime.UserError, match="run.state.pt"):
        with runtime.StateWriter() as writer:
            runtime.save_training_state(tmp_path / "run.state.pt", host, [], {}, 0.0, writer=writer)
    with pytest.raises(runtime.UserError, match="run.state.pt"):
        with runtime.StateWriter() as writer:
            runtime.save_training_state(tmp_path / "run.state.pt", host, [], {}, 0.0, writer=writer)
            writer._pending[0].exception()                # the write has failed by now
            runtime.save_training_state(tmp_path / "run.state.pt", host, [], {}, 0.0, writer=writer)
            pytest.fail("the second save goes on after the first one failed")
    assert list(tmp_path.iterdir()) == []                # no temporary file left
