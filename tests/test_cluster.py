"""Tables on a cluster: runs as SLURM jobs through submitit (sbatch, squeue and srun faked by small scripts on the
PATH), the same jobs as local processes, the inputs table before submission, claims and job records that never
train a run twice, and stop signals that lose nothing (real processes where the behaviour needs one)."""
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT, process_of, settings, start_forkserver, start_together, tiny_demo, wait_until
import gated_prompt as gp
import reproduce
from harness import classification
from harness import cluster
from harness import config
from harness import inputs
from harness import results
from harness import runs
from harness import runtime
from harness.data import datasets

ROOT = Path(__file__).resolve().parents[1]
start_forkserver()   # the real processes below fork from it; its imports run meanwhile


def tiny_cells(n=4, **changes):
    """n tiny demo cells (seeds 0..n-1): what `--table N --run` queues in these tests."""
    return [tiny_demo(seed=s, **changes) for s in range(n)]


def final_files(results_dir, cfgs):
    return [results.run_files(results_dir, c, "final") for c in cfgs]


def same_runs(dir_a, dir_b, cfgs):
    """Every run of cfgs ended with bitwise the same prompts, metrics and loss history in both folders."""
    for a, b in zip(final_files(dir_a, cfgs), final_files(dir_b, cfgs)):
        ra, rb = json.loads(a.result.read_text()), json.loads(b.result.read_text())
        assert ra["final"] == rb["final"] and [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
        pa, pb = torch.load(a.prompts), torch.load(b.prompts)
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def serial(tmp_path, cfgs, name="serial"):
    """The reference: the same runs, one after the other, in this process."""
    for cfg in cfgs:
        runs.run_one(cfg, "final", settings(tmp_path, results_dir=str(tmp_path / name)))
    return tmp_path / name


def leftovers(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.suffix in (".claim", ".job") or p.name.endswith(
        ".state.pt"))


# --- fake SLURM: sbatch records its script and answers a job id; squeue prints a file -------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch, squeue and scontrol on the PATH. sbatch copies each script to <dir>/sbatch-<id>.sh and prints
    'Submitted batch job <id>' (ids from 1000); squeue prints <dir>/queue (write lines '<job id> <STATE>')."""
    where = tmp_path / "slurm"
    (where / "bin").mkdir(parents=True)
    scripts = {"sbatch": 'n=$(cat "$FAKE_SLURM/next" 2>/dev/null || echo 1000)\necho $((n + 1)) > "$FAKE_SLURM/next"\n'
                         'cp "$1" "$FAKE_SLURM/sbatch-$n.sh"\necho "Submitted batch job $n"\n',
               "squeue": 'cat "$FAKE_SLURM/queue" 2>/dev/null\n', "srun": "exit 0\n", "scontrol": "exit 0\n"}
    for name, body in scripts.items():
        (where / "bin" / name).write_text("#!/bin/sh\n" + body)
        (where / "bin" / name).chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM", str(where))
    monkeypatch.setenv("PATH", f"{where / 'bin'}{os.pathsep}{os.environ['PATH']}")
    results._SQUEUE["at"] = 0.0   # no answer of another test's squeue
    yield where
    results._SQUEUE["at"] = 0.0


def queue(where, lines):
    (where / "queue").write_text("".join(f"{line}\n" for line in lines))
    results._SQUEUE["at"] = 0.0


def test_a_table_is_submitted_as_one_array_with_the_knobs_and_a_second_submission_adds_nothing(
        tmp_path, fake_slurm, monkeypatch, cli):
    monkeypatch.setattr(runs, "table_configs", lambda number, overrides: tiny_cells(3))
    r = tmp_path / "r"
    out = cli("--table", "4", "--run", "--slurm", "--slurm-partition", "gpu", "--slurm-gpus", "1", "--slurm-cpus",
              "6", "--slurm-time", "600", "--slurm-account", "lab", "--slurm-qos", "high", "--slurm-array-limit", "2",
              "--results-dir", r)
    assert out.returncode == 0, out.stderr
    script = (fake_slurm / "sbatch-1000.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=6", "--time=600", "--account=lab",
                 "--qos=high", "--array=0-2%2", "--signal=USR2@90", f"--output={r.resolve()}/jobs/%A_%a_0_log.out",
                 f"--error={r.resolve()}/jobs/%A_%a_0_log.err"):
        assert f"#SBATCH {line}\n" in script, line
    assert f"export PYTHONPATH={ROOT}" in script
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("submitted job")] == \
        ["submitted job 1000_0", "submitted job 1000_1", "submitted job 1000_2"]
    assert "python reproduce.py --table 4 --results-dir" in out.stdout
    records = [json.loads(f.job.read_text()) for f in final_files(r, tiny_cells(3))]
    assert [rec["job"] for rec in records] == ["1000_0", "1000_1", "1000_2"]
    # queued and running per squeue: the same command submits nothing, and --table 4 shows them
    queue(fake_slurm, ["1000_0 PENDING", "1000_1 RUNNING", "1000_2 PENDING"])
    again = cli("--table", "4", "--run", "--slurm", "--results-dir", r)
    assert again.returncode == 0 and "submitted job" not in again.stdout and not (fake_slurm / "sbatch-1001.sh").exists()
    assert again.stdout.count("not submitted:") == 3 and "running: job 1000_1" in again.stdout
    shown = cli("--table", "4", "--results-dir", r).stdout
    assert "JOBS (2 queued, 1 running" in shown and "job 1000_1" in shown.split("running")[-1]
    # SLURM forgot them without a result: failed, with the log; submitting again replaces exactly those
    queue(fake_slurm, ["1000_1 RUNNING"])
    shown = cli("--table", "4", "--results-dir", r).stdout
    assert "JOBS (1 running, 2 failed" in shown and f"log {r.resolve()}/jobs/1000_0_0_log.err" in shown
    again = cli("--table", "4", "--run", "--slurm", "--results-dir", r)
    assert again.returncode == 0 and again.stdout.count("submitted job 1001_") == 2, again.stdout
    assert "--array=0-1%" in (fake_slurm / "sbatch-1001.sh").read_text()


def test_a_swept_cells_final_runs_wait_for_its_sweep_jobs(tmp_path, fake_slurm, monkeypatch, cli):
    monkeypatch.setattr(runs, "table_configs", lambda number, overrides: [tiny_demo(num_prompts=p) for p in (2, 3)])
    monkeypatch.setattr(config, "sweep_grid", lambda cfg: [{"lr": 0.1}, {"lr": 0.2}])
    out = cli("--table", "4", "--run", "--sweep", "--seeds", "2", "--slurm", "--results-dir", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    first, later = (fake_slurm / "sbatch-1000.sh").read_text(), (fake_slurm / "sbatch-1001.sh").read_text()
    assert "--array=0-3%4" in first and "dependency" not in first             # 2 cells x 2 lr
    assert "--array=0-3%4" in later and "#SBATCH --dependency=afterany:1000\n" in later   # 2 cells x 2 seeds
    assert "starts after job(s) 1000" in out.stdout


def test_sbatch_refusing_the_jobs_is_one_line_and_leaves_no_record(tmp_path, fake_slurm, monkeypatch, cli):
    (fake_slurm / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' "
                                               ">&2\nexit 1\n")
    monkeypatch.setattr(runs, "table_configs", lambda number, overrides: tiny_cells(2))
    out = cli("--table", "4", "--run", "--slurm", "--slurm-partition", "gpux", "--results-dir", tmp_path / "r")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == \
        "error: sbatch refused the jobs: sbatch: error: invalid partition specified: gpux"
    assert leftovers(tmp_path / "r") == []


def test_without_srun_or_submitit_the_command_says_so_in_one_line(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(runs, "table_configs", lambda number, overrides: tiny_cells(1))
    monkeypatch.setenv("PATH", str(tmp_path))   # no srun here
    out = cli("--table", "4", "--run", "--slurm", "--results-dir", tmp_path / "r")
    assert out.returncode == 2 and "srun is not found" in out.stderr and "--slurm local" in out.stderr
    assert leftovers(tmp_path / "r") == []
    monkeypatch.setitem(sys.modules, "submitit", None)   # not installed
    out = cli("--table", "4", "--run", "--slurm", "--results-dir", tmp_path / "r")
    assert out.returncode == 2 and out.stderr.strip() == "error: --slurm needs submitit: pip install submitit"


# --- flags --------------------------------------------------------------------------------------------------

SLURM_FLAGS = {"--slurm-partition": ("gpu", "partition", "gpu"), "--slurm-gpus": ("0", "gpus", 0),
               "--slurm-cpus": ("4", "cpus", 4), "--slurm-time": ("90", "time_min", 90),
               "--slurm-account": ("lab", "account", "lab"), "--slurm-qos": ("low", "qos", "low"),
               "--slurm-array-limit": ("16", "array_limit", 16)}


@pytest.mark.parametrize("flag", list(SLURM_FLAGS))
@pytest.mark.parametrize("mode", [["--task", "flowers"], ["--table", "4", "--run"]])
def test_each_slurm_flag_sets_its_option_and_needs_slurm(flag, mode):
    value, field, want = SLURM_FLAGS[flag]
    args = reproduce.parse_args(mode + ["--slurm", flag, value])
    reproduce.check_flags(args)
    assert getattr(reproduce.slurm_options(args), field) == want and reproduce.slurm_options(args).executor == "slurm"
    with pytest.raises(runtime.UserError, match=f"^{flag} goes with --slurm$"):
        reproduce.check_flags(reproduce.parse_args(mode + [flag, value]))


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--slurm"], "--slurm does not apply to the demo"),
    (["--table", "4", "--slurm"], "--slurm does not apply to printing a table"),
    (["--task", "cub", "--slurm", "--workers", "2"], "--workers does not apply to --slurm"),
    (["--task", "cub", "--slurm", "--device", "cpu"], "--device does not apply to --slurm"),
    (["--task", "cub", "--slurm", "--resume"], "--resume does not apply to --slurm (jobs always continue"),
    (["--task", "cub", "--slurm", "--slurm-gpus", "2"], "--slurm-gpus 2 is not usable: it must be 0 or 1"),
    (["--task", "cub", "--slurm", "--slurm-time", "0"], "--slurm-time 0 is not usable"),
    (["--task", "cub", "--slurm", "--slurm-array-limit", "0"], "--slurm-array-limit 0 is not usable"),
    (["--task", "cub", "--slurm", "--slurm-partition", ""], "--slurm-partition is empty"),
])
def test_slurm_values_and_flags_a_job_cannot_honour_are_refused_before_any_work(argv, message, monkeypatch, capsys,
                                                                                tmp_path):
    monkeypatch.setattr(inputs, "checkpoint_for", lambda *a: pytest.fail("reached the checkpoint"))
    code = reproduce.cli_main(argv + ["--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


# --- the inputs table ---------------------------------------------------------------------------------------

def test_every_missing_input_is_listed_before_anything_is_submitted(tmp_path, fake_slurm, cli):
    """Table 4 needs the MAE ViT-B checkpoint, CUB and Flowers: one table lists them all (what, where, how to get
    it), then one error line; nothing is submitted or run."""
    from test_reproduce import write_tiny_mae_checkpoint
    out = cli("--table", "4", "--run", "--slurm", "--results-dir", tmp_path / "r", cwd=tmp_path)
    assert out.returncode == 2 and not (fake_slurm / "sbatch-1000.sh").exists()
    table = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [row[:3] for row in table] == [["MISSING", "checkpoint", "mae"], ["MISSING", "dataset", "cub"],
                                          ["MISSING", "dataset", "flowers"]]
    assert "python reproduce.py download --ssl mae --arch vit_base" in out.stdout
    assert out.stderr.strip() == ("error: 3 of the 3 inputs above are missing or unusable; nothing was submitted "
                                  "(add --download to fetch those marked --download)")
    # the checkpoint in place and the datasets' folders half there: what is left is named, the same way
    (tmp_path / "checkpoints").mkdir()
    write_tiny_mae_checkpoint(tmp_path / "checkpoints" / "mae_pretrain_vit_base.pth")
    (tmp_path / "data" / "cub").mkdir(parents=True)   # no split files
    out = cli("--table", "4", "--run", "--results-dir", tmp_path / "r", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert out.returncode == 2 and lines[1].split()[0] == "BAD" and "verify" in lines[1]   # not the official file
    assert lines[2].split()[:3] == ["BAD", "dataset", "cub"] and ".json not found" in lines[2]
    assert "nothing was run" in out.stderr and not (tmp_path / "r" / "cub").exists()


def test_a_task_needing_a_step_by_hand_says_which(tmp_path, fake_slurm, cli):
    out = cli("--task", "nabirds", "--slurm", "--results-dir", tmp_path / "r", "--data-dir", tmp_path / "d",
              cwd=tmp_path)
    assert out.returncode == 2
    assert "MISSING dataset nabirds" in " ".join(out.stdout.split()) and "by hand (below)" in out.stdout
    assert "dataset nabirds: NABirds needs a (free) sign-up" in out.stdout


# --- claims: whose they are, and when nobody holds them any more ---------------------------------------------

def write_claim(files, **holder):
    files.claim.parent.mkdir(parents=True, exist_ok=True)
    files.claim.write_text(json.dumps(dict(dict(holder="u@node7", pid=4242, host="node7", started="t"), **holder)))


@pytest.mark.parametrize("pid", ["4242", None, True, -1, 0, 1.5])
def test_a_claim_with_a_malformed_pid_is_no_live_holder(pid, tmp_path):
    files = results.run_files(tmp_path, tiny_demo(), "final")
    write_claim(files, pid=pid, host=socket.gethostname())
    assert results.claim_cell(files) is None and json.loads(files.claim.read_text())["pid"] == os.getpid()


def test_a_requeued_job_recognises_its_own_claim_on_another_node_and_slurm_says_whose_job_ended(
        tmp_path, monkeypatch, fake_slurm):
    files = results.run_files(tmp_path, tiny_demo(), "final")
    write_claim(files, job="slurm:1234_5", task="0.0")   # written by this job's earlier life on node7
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    queue(fake_slurm, ["1234_5 RUNNING", "1234_6 RUNNING"])
    monkeypatch.setenv("SLURM_JOB_ID", "1300")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert results.claim_cell(files)["job"] == "slurm:1234_5"       # another live job's: respected
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert results.claim_cell(files) is None                       # its own, from before the requeue: continued
    assert json.loads(files.claim.read_text())["job"] == "slurm:1234_5"
    write_claim(files, job="slurm:999", task="0.0")
    assert results.claim_cell(files) is None                       # a job SLURM no longer lists: taken over
    write_claim(files, job=None)
    assert results.claim_cell(files)["holder"] == "u@node7"        # another host, no job to ask about: respected


def test_a_cell_held_by_another_live_process_exits_4_naming_it(tmp_path, cli):
    """The holder is on another machine and cannot be checked from here: the command trains nothing and exits 4,
    never 0."""
    from test_reproduce import write_tiny_mae_checkpoint
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    files = results.run_files(tmp_path / "r", config.resolve("dtd", "mae"), "final")
    write_claim(files)
    out = cli("--task", "dtd", "--checkpoint", ckpt, "--data-dir", tmp_path / "data", "--results-dir", tmp_path / "r")
    assert out.returncode == 4, out.stderr
    assert "u@node7 (pid 4242" in out.stdout and "NOT RUN - 1 run(s) held by another process" in out.stdout


# --- the backbone memo, the seed, empty paths, advice -------------------------------------------------------

def test_a_tampered_backbone_memo_is_said_and_read_again_never_believed(tmp_path, capsys):
    from test_reproduce import write_tiny_mae_checkpoint
    ckpt = write_tiny_mae_checkpoint(tmp_path / "mae.pth")
    truth = results.backbone_identity(ckpt, tmp_path / "cache")
    memo = tmp_path / "cache" / "backbones.json"
    entries = json.loads(memo.read_text())
    key = next(iter(entries))
    entries[key]["ssl"] = "mocov3"     # contradicts its own format (timm / MAE)
    memo.write_text(json.dumps(entries))
    capsys.readouterr()
    got = results.backbone_identity(ckpt, tmp_path / "cache")
    results.check_backbone_fits(got, "mae")    # no "is a MoCo v3 checkpoint (its layout: timm / MAE)"
    assert got == truth and "holds an entry for" in capsys.readouterr().out
    assert json.loads(memo.read_text())[key]["ssl"] == "mae"
    memo.write_text("[1, 2]")
    assert results.backbone_identity(ckpt, tmp_path / "cache") == truth
    assert "is not a file this harness wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--task", "cub", "--seed", str(2 ** 32)], "--seed 4294967296 is not usable: seeds must lie in 0..4294967295"),
    (["--task", "cub", "--seed", str(2 ** 32 - 1), "--seeds", "2"], "--seed 4294967295 with --seeds 2 (up to 4294967296)"),
    (["--demo", "--seed", str(2 ** 40)], "--seed 1099511627776 is not usable"),
    (["--task", "cub", "--results-dir", ""], "--results-dir '' is empty: give a path"),
    (["--table", "1", "--results-dir", " "], "--results-dir ' ' is empty"),
    (["--demo", "--results-dir", ""], "--results-dir '' is empty"),
    (["--task", "cub", "--data-dir", ""], "--data-dir '' is empty"),
    (["--task", "cub", "--checkpoint", ""], "--checkpoint '' is empty"),
])
def test_a_seed_numpy_cannot_take_and_empty_paths_are_refused_before_the_checkpoint(argv, message, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inputs, "checkpoint_for", lambda *a: pytest.fail("reached the checkpoint"))
    monkeypatch.setattr(classification, "run_classification", lambda *a: pytest.fail("trained"))
    code = reproduce.cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []   # nothing written into the working directory


def test_a_command_without_trust_pickle_never_advises_it(tmp_path, capsys):
    from test_reproduce import WritesAMarker
    base = gp.build_model("vit_base", "mae", "linear", num_classes=0, verbose=False,
                          vit_overrides=dict(TINY_VIT, patch_size=32)).eval()
    torch.save({"model": base.backbone_state_dict(), "extra": WritesAMarker(str(tmp_path / "ran"))},
               tmp_path / "odd.pth")
    model = gp.VisionTransformer(base.cfg, gp.prompt_config("gated+temp", num_classes=3, num_prompts=2))
    gp.load_backbone(model, base.backbone_state_dict())
    model.save_pack(tmp_path / "p.pack.pt", class_names=None, ssl="mae", task="t", transform={
        "kind": "vtab", "resize": 224, "crop": 224}, checkpoint=str(tmp_path / "odd.pth"))
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    code = reproduce.cli_main(["predict", "--pack", str(tmp_path / "p.pack.pt"), "--checkpoint",
                               str(tmp_path / "odd.pth"), str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    # predict takes --trust-pickle (test_predict), so its advice names it; the file never ran
    assert code == 2 and "odd.pth" in err and "On this command line: --trust-pickle" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ran").exists()


# --- stop signals in this process: the step finishes, then Stopped ------------------------------------------

@pytest.fixture
def stop_handlers():
    """The harness's stop handler in this process for one test; afterwards the signal is forgotten and the
    default handlers are back."""
    runtime.handle_stop_signals()
    yield
    runtime.handle_stop_signals()
    for signum in runtime.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def test_a_stop_signal_inside_a_step_lets_it_finish_and_stops_before_the_next(stop_handlers):
    done = []
    with pytest.raises(runtime.Stopped) as stopped:
        for i in runtime.step_points(range(10)):
            if i == 3:
                os.kill(os.getpid(), signal.SIGUSR1)   # arrives while step 3 runs
            time.sleep(0.01)
            done.append(i)
    assert done == [0, 1, 2, 3] and stopped.value.signum == signal.SIGUSR1
    runtime.handle_stop_signals()
    with pytest.raises(runtime.Stopped):   # outside a step loop (decoding, a save): at once, like Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert runtime.stop_requested()


def test_segmentation_stopped_mid_run_saves_that_iteration_and_resumes_bitwise(tmp_path, stop_handlers):
    """ADE20K saves every 2,000 iterations: a stop signal at iteration 5 (save_every 3) saves iteration 5 itself,
    and the resumed run ends with bitwise the prompts and metrics of an uninterrupted one (its loss log gains a
    record at the stop)."""
    import fixtures
    from harness import segmentation as seg
    from test_segmentation import TINY, TINY_VIT
    fixtures.write_ade_fixture(tmp_path / "ade", n_train=6, n_val=1, size=(64, 96), seed=0)
    torch.manual_seed(0)
    backbone = gp.build_model("vit_base", "mae", "linear", num_classes=0, vit_overrides=TINY_VIT)
    torch.save({"model": backbone.backbone_state_dict()}, tmp_path / "mae.pth")
    cfg, run = TINY.replace(iters=8), settings(tmp_path, data_dir=str(tmp_path / "ade"))
    full, model = seg.train_segmentation(cfg, run, tmp_path / "full.pt", tmp_path / "mae.pth", save_every=3,
                                         loader_workers=0)
    full_prompts = model.prompt_state_dict()
    iteration = seg.Training.iteration
    calls = []

    def signalled_at_5(self, images, labels):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return iteration(self, images, labels)
    seg.Training.iteration = signalled_at_5
    try:
        with pytest.raises(runtime.Stopped):
            seg.train_segmentation(cfg, run, tmp_path / "cut.pt", tmp_path / "mae.pth", save_every=3,
                                   loader_workers=0)
    finally:
        seg.Training.iteration = iteration
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["step"] == 5 and len(calls) == 5
    runtime.handle_stop_signals()
    resumed, model = seg.train_segmentation(cfg, dataclasses.replace(run, resume=True), tmp_path / "cut.pt",
                                            tmp_path / "mae.pth", save_every=3, loader_workers=0)
    assert resumed["final"] == full["final"]
    for name, tensor in full_prompts.items():
        assert torch.equal(model.prompt_state_dict()[name], tensor), name


# --- real processes: the local executor, two submissions at once, stop signals ------------------------------

def submitter(go, cells, argv, slow_steps=False):
    """A `python reproduce.py ARGV` process (see process_of) whose --table is `cells`: it says it is ready
    (creates go.ready-PID), then waits for the file `go`. slow_steps: each training step takes 20 ms more (a
    signal lands inside an epoch)."""
    runs.table_configs = lambda number, overrides: cells
    if slow_steps:
        real = runtime.make_train_step

        def slow(*args, **kwargs):
            step = real(*args, **kwargs)

            def slow_step(*batch):
                time.sleep(0.02)
                return step(*batch)
            slow_step.compiled = step.compiled
            return slow_step
        runtime.make_train_step = slow
    Path(f"{go}.ready-{os.getpid()}").touch()
    while not os.path.exists(go):
        time.sleep(0.01)
    return reproduce.cli_main(argv)


def test_two_local_submissions_at_once_train_each_cell_once_and_a_signalled_job_requeues_and_resumes(tmp_path):
    """Two real `--table 4 --run --slurm local` commands at the same moment on one results folder (3 tiny cells,
    two jobs at a time each: a command that holds all three queues one). One job gets submitit's signal (SIGUSR2:
    a time limit or a preemption) while it trains: it stops after its step, keeps its state, releases its claim,
    and submitit requeues it (the local controller restarts it), and the restarted job resumes. Every cell is trained by exactly one job, both
    commands end with every cell finished (exit 0), nothing is left behind, and the results are bitwise those of
    a serial run."""
    import threading
    go, r = tmp_path / "go", tmp_path / "r"
    # the first cell trains long enough (4 epochs of 96 steps) to be signalled while it trains
    cells = [tiny_demo(seed=0, epochs=4, batch_size=4)] + [tiny_demo(seed=s) for s in (1, 2)]
    argv = ["--table", "4", "--run", "--slurm", "local", "--slurm-gpus", "0", "--slurm-cpus", "1",
            "--slurm-array-limit", "2", "--results-dir", str(r)]
    logs = [tmp_path / f"command{i}.log" for i in range(2)]
    procs = [process_of(submitter, str(go), cells, argv, out=log, cwd=ROOT) for log in logs]
    long_run = final_files(r, cells)[0]

    def signal_the_long_run():
        while not long_run.state.exists():   # its first epoch is saved, three more to go
            time.sleep(0.02)
        os.kill(json.loads(long_run.claim.read_text())["pid"], signal.SIGUSR2)
    threading.Thread(target=signal_the_long_run, daemon=True).start()
    outs, reference = start_together(procs, go, logs, meanwhile=lambda: serial(tmp_path, cells))
    assert [p.exitcode for p in procs] == [0, 0], outs
    started = [line for out in outs for line in out.splitlines() if line.startswith("started job")]
    assert len(started) == 3 and len({line.split(": ")[1] for line in started}) == 3, outs
    jobs_say = "".join(p.read_text() for p in (r / "jobs").glob("*_log.*"))
    assert jobs_say.count("wrote ") == 3 and leftovers(r) == []
    assert f"stopped by SIGUSR2 after a finished step: {results.run_name(cells[0], 'final')}" in jobs_say
    assert "this job is requeued and continues it" in jobs_say and "Requeued job" in jobs_say
    assert "resumed from" in jobs_say
    same_runs(r, reference, cells)


def wait_for(path_glob, folder, timeout=300):
    """The first file under folder matching path_glob, once it exists."""
    wait_until(lambda: any(Path(folder).rglob(path_glob)), timeout, lambda: f"no {path_glob} under {folder}")
    return next(Path(folder).rglob(path_glob))


def test_sigterm_mid_epoch_saves_releases_says_how_to_resume_and_resumes_bitwise(tmp_path, cli, monkeypatch):
    """A real `--table 4 --run` process gets SIGTERM inside its second epoch: it finishes the step, exits 75 with
    one line naming the kept state and the command that continues, and leaves no claim. That command ends with
    bitwise the numbers of an uninterrupted run."""
    import threading
    go, r = tmp_path / "go", tmp_path / "r"
    go.touch()
    cells = tiny_cells(1, epochs=4, batch_size=8)
    argv = ["--table", "4", "--run", "--results-dir", str(r)]
    proc = process_of(submitter, str(go), cells, argv, True, out=tmp_path / "out.log", err=tmp_path / "err.log",
                      cwd=ROOT)

    def terminate_in_epoch_2():
        wait_for("*.state.pt", r)          # epoch 1 saved; epoch 2 (48 steps of 20 ms) under way
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
    threading.Thread(target=terminate_in_epoch_2, daemon=True).start()
    try:
        reference = serial(tmp_path, cells)   # meanwhile, here
        proc.join(300)
    finally:
        proc.kill()
    err = (tmp_path / "err.log").read_text()
    assert proc.exitcode == 75, (tmp_path / "out.log").read_text() + err
    state = final_files(r, cells)[0].state
    assert err.strip() == (f"stopped by SIGTERM after a finished step: {results.run_name(cells[0], 'final')} keeps "
                           f"its state at {state}; continue with: python reproduce.py {' '.join(argv)} --resume")
    assert leftovers(r) == [state.name] and not final_files(r, cells)[0].result.exists()
    monkeypatch.setattr(runs, "table_configs", lambda number, overrides: cells)
    resumed = cli(*argv, "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    assert leftovers(r) == []
    same_runs(r, reference, cells)
