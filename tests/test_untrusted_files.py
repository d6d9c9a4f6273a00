"""Files the harness reads are data, never code. The resumable training state (<run>.state.pt) is read
weights-only, so no code in the file can run; a state of another version or shape, or a disk too full to save one,
is one line naming the file, never a traceback. Every other reader (results, claims, caches, packs, checkpoints,
yaml) is checked by a scan of the sources."""
import ast
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures
from conftest import TINY_VIT
import gated_prompt as gp
import reproduce
from harness import results
from harness import runtime

TINY = TINY_VIT
ROOT = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this calls os.system: what a hostile state file does (the trial's payload)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def tiny_training():
    model = gp.build_model("vit_base", "mae", "gated+temp", num_classes=3, vit_overrides=TINY, img_size=32,
                           num_prompts=2)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    return model, optimizer, scheduler


def save_state(path, model, optimizer, scheduler, step=0):
    runtime.save_training_state(path, runtime.to_host(runtime.training_state(model, optimizer, scheduler, step)),
                                [{"epoch": 1, "loss": 0.5}], {"task": "demo"}, 1.5, best={"val_acc": -1.0})


def one_line_error(err):
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_state_round_trips_with_every_rng_and_holds_only_tensors_and_plain_values(tmp_path):
    model, optimizer, scheduler = tiny_training()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    runtime.seed_everything(7)
    path = tmp_path / "run.state.pt"
    save_state(path, model, optimizer, scheduler, step=4)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.load(path, weights_only=True)   # torch's own safe reader takes it as it is
    other, other_opt, other_sched = tiny_training()
    state = runtime.load_training_state(path, other, other_opt, other_sched)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert state["step"] == 4 and state["history"] == [{"epoch": 1, "loss": 0.5}]
    assert state["extra"] == {"best": {"val_acc": -1.0}, "config": {"task": "demo"}, "elapsed": 1.5}
    for k, v in model.prompt_state_dict().items():
        assert torch.equal(other.prompt_state_dict()[k], v)
    assert torch.equal(other_opt.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


def hostile_state(path, marker):
    """A well-formed state whose history also pickles a call of os.system."""
    model, optimizer, scheduler = tiny_training()
    save_state(path, model, optimizer, scheduler)
    state = torch.load(path, weights_only=False)   # our own file, just written
    state["history"].append(WritesMarker(marker))
    torch.save(state, path)


def test_a_state_file_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    path, marker = tmp_path / "run.state.pt", tmp_path / "marker"
    hostile_state(path, marker)
    with pytest.raises(runtime.UserError) as err:
        runtime.load_training_state(path, *tiny_training())
    text = one_line_error(err)
    assert str(path) in text and "system" in text and "delete it" in text
    assert not marker.exists()


def test_resume_from_the_command_line_never_runs_a_state_files_code(tmp_path, capsys):
    """reproduce.py --task dtd ... --resume on a hostile state: exit 2, one line naming the file, no marker."""
    backbone = gp.build_model("vit_small", "mae", "linear", num_classes=0)
    torch.save({"model": backbone.backbone_state_dict()}, tmp_path / "vits.pth")
    fixtures.write_vtab_fixture(tmp_path / "data" / "vtab-1k", "dtd", per_class=(1, 1, 1))
    argv = ["--task", "dtd", "--arch", "vit_small", "--checkpoint", str(tmp_path / "vits.pth"), "--data-dir",
            str(tmp_path / "data"), "--results-dir", str(tmp_path / "r"), "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "2", "--resume"]
    cfg = reproduce.planned_configs(reproduce.parse_args(argv))[0]
    state, marker = results.run_files(tmp_path / "r", cfg, "final").state, tmp_path / "marker"
    state.parent.mkdir(parents=True)
    hostile_state(state, marker)
    assert reproduce.cli_main(argv) == runtime.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(state) in err and "Traceback" not in err
    assert not marker.exists() and list((tmp_path / "r").rglob("*.claim")) == []


def test_a_state_file_of_another_version_or_shape_is_refused_in_one_line(tmp_path):
    model, optimizer, scheduler = tiny_training()
    path = tmp_path / "run.state.pt"
    save_state(path, model, optimizer, scheduler)
    current = torch.load(path, weights_only=False)   # our own file, just written
    # what the harness wrote before states were read weights-only: numpy's RNG state as a numpy array
    older = {k: v for k, v in current.items() if k != "format"}
    older["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    cases = {"older": older,
             "no format, numpy-free": {k: v for k, v in current.items() if k != "format"},
             "newer": dict(current, format=current["format"] + 1),
             "a list": [current],
             "missing keys": {"format": current["format"], "model": current["model"]},
             "a step that is not a number": dict(current, step="7"),
             "no seconds spent": dict(current, extra={"config": {"task": "demo"}}),
             "a foreign optimizer": dict(current, optimizer={"state": {}, "param_groups": []}),
             "a foreign rng": dict(current, rng={"python": 3, "numpy": None, "torch": None})}
    for what, state in cases.items():
        torch.save(state, path)
        with pytest.raises(runtime.UserError) as err:
            runtime.load_training_state(path, *tiny_training())
        text = one_line_error(err)
        assert str(path) in text and "delete it" in text, what


# --- a full disk --------------------------------------------------------------------------------------------

def test_a_full_disk_when_saving_state_names_the_space_needed_and_keeps_the_last_state(tmp_path, monkeypatch):
    model, optimizer, scheduler = tiny_training()
    path = tmp_path / "run.state.pt"
    save_state(path, model, optimizer, scheduler, step=1)
    before = path.read_bytes()
    monkeypatch.setattr(runtime, "free_disk_bytes", lambda folder: 1000)
    with pytest.raises(runtime.UserError) as err:
        save_state(path, model, optimizer, scheduler, step=2)
    text = one_line_error(err)
    assert "disk" in text and str(tmp_path) in text and "needs" in text and "1.00 kB free" in text
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.state.pt"]


def test_a_disk_that_fills_up_while_the_state_is_written_is_reported_and_leaves_nothing(tiny_tmpfs, monkeypatch):
    """The free-space check passes (another process fills the disk after it): the write's ENOSPC is the same
    one line, and neither a temporary file nor half a state is left."""
    model, optimizer, scheduler = tiny_training()
    fixtures.fill_disk(tiny_tmpfs / "filler")
    monkeypatch.setattr(runtime, "free_disk_bytes", lambda folder: 2**40)
    with pytest.raises(runtime.UserError) as err:
        save_state(tiny_tmpfs / "run.state.pt", model, optimizer, scheduler)
    text = one_line_error(err)
    assert "disk" in text and "full" in text and str(tiny_tmpfs) in text
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"]


# --- every reader --------------------------------------------------------------------------------------------

def test_no_reader_unpickles_objects_except_a_backbone_file_the_user_trusts():
    """torch.load only weights-only (the one exception: read_checkpoint's trust_pickle branch, an opt-in flag),
    np.load never with allow_pickle, yaml only safe_load, no pickle / marshal / shelve reads at all."""
    sources = [ROOT / "gated_prompt.py", ROOT / "reproduce.py", *sorted((ROOT / "harness").rglob("*.py")),
               *sorted((ROOT / "bench").glob("*.py"))]
    unsafe, trusted = [], []

    def visit(node, function, path):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            weights_only = keywords.get("weights_only")
            if (owner, node.func.attr) == ("torch", "load") and not (
                    isinstance(weights_only, ast.Constant) and weights_only.value is True):
                (trusted if function == "read_checkpoint" else unsafe).append(where)
            elif (owner, node.func.attr) == ("np", "load") and "allow_pickle" in keywords:
                unsafe.append(where)
            elif owner == "yaml" and node.func.attr != "safe_load" and "load" in node.func.attr:
                unsafe.append(where)
            elif owner in ("pickle", "marshal", "shelve", "dill") and node.func.attr in ("load", "loads", "open"):
                unsafe.append(where)
        for child in ast.iter_child_nodes(node):
            visit(child, function, path)
    for path in sources:
        visit(ast.parse(path.read_text()), None, path)
    assert unsafe == [] and len(trusted) == 1, (unsafe, trusted)
