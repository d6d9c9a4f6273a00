"""Result files and the paper's tables: one JSON per run, and each table defined once.

A run's file name says what it is: results/<task>/<ssl>/<arch>-<method>-p<prompts>-k<insert_at>-lr<lr>-s<seed>-
<protocol>, plus "-vpt" for VPT's recipe and "-<key><value>" for every setting that departs from the recipe
(e.g. "-epochs1"), so a shortened run never takes a full run's place. A table cell shows only runs of the
paper's exact recipe (the current recipe_version, no departures, the recipe's lr or one picked by the lr
sweep); everything else is listed apart with --all, marked as what it is.
"""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.data import datasets
import gated_prompt as gp
from harness import config
from harness import downloads
from harness.runtime import UserError, atomic_write, pid_alive, write_json

HPARAMS = config.HPARAMS
PAPER = HPARAMS["paper"]
FGVC_COLUMNS = ["cub", "flowers", "cars", "dogs", "nabirds"]  # the paper's column order (Tables 1, 7)
PAPER_SSL = ("mae", "mocov3")   # the backbones of the paper's tables; others get sections of their own, no paper number
BY_BACKBONE = ("1", "2", "3", "6")   # the tables with a section per backbone
TABLE_METHODS = ["vpt-shallow", "vpt-deep", "gated+temp"]   # the rows of Tables 1-3, 6, 8 (gp.METHODS: all six)
CELL_KEYS = ("task", "ssl", "method", "arch", "num_prompts", "insert_at")  # a cell apart from its recipe

# -----------------------------------------------------------------------------
# Files


def _text(value):
    """A config value as it appears in a file name."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return str(value)


def run_name(cfg, protocol):
    """<task>[/<dataset>]/<ssl>/<arch>-<method>-p<P>-k<k>-lr<lr>-s<seed>-<protocol>[-vpt][-<key><value>...]
    (dataset: a user's image folder, --task folder)."""
    dataset = getattr(cfg, "dataset", None)
    name = (f"{cfg.task}{'/' + dataset if dataset else ''}/{cfg.ssl}/{cfg.arch}-{cfg.method}-p{cfg.num_prompts}-k{cfg.insert_at}"
            f"-lr{_text(cfg.lr)}-s{cfg.seed}-{protocol}")
    if cfg.recipe == "vpt":
        name += "-vpt"
    return name + "".join(f"-{k}{_text(v)}" for k, v in config.deviations(cfg).items())


@dataclass
class RunFiles:
    result: Path    # the JSON, written last: its presence means the run finished
    prompts: Path   # what training changed (prompt_state_dict), for figures and reuse; written before the JSON
    state: Path     # resumable training state, removed when the run finishes
    claim: Path     # who is training this cell now (claim_cell)
    pack: Path      # the prompt pack (gated_prompt.read_pack): prompts + settings + backbone fingerprint
    job: Path       # the cluster job submitted for this run (cluster.py), removed when the run finishes


def run_files(results_dir, cfg, protocol):
    """A run's files, worked out once per run (runs.run_one) and passed down to what writes them."""
    base = Path(results_dir) / run_name(cfg, protocol)
    return RunFiles(*(base.with_name(base.name + suffix) for suffix in (".json", ".prompts.pt", ".state.pt",
                                                                           ".claim", ".pack.pt", ".job")))


class BadResultFile(UserError):
    """A result file of this harness that cannot be used as it is (truncated, edited, implausible)."""


def read_result(path):
    """A result JSON as a dict; BadResultFile naming the file and what to do when it does not parse."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadResultFile(f"{path} is not a readable result file ({type(e).__name__}: {str(e)[:80]}; truncated "
                            "or edited?): delete it to run its cell again") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise BadResultFile(f"{path} is not a result file of this harness (no 'config'): move it out of the "
                            "results folder")
    return run


def stored_result(files, cfg, backbone=None):
    """The finished result of this config on this backbone (backbone_identity; None for the demo), or None.
    A file of another recipe version, other settings or another backbone under the same name is refused with
    what to do, never reused or overwritten."""
    if not files.result.is_file():
        return None
    stored = read_result(files.result)
    if stored.get("recipe_version") != config.RECIPE_VERSION:
        raise UserError(f"{files.result} was written by recipe version {stored.get('recipe_version', 1)} "
                        f"(now {config.RECIPE_VERSION}: the training code changed since); move or delete it to "
                        "run this cell again")
    current = cfg.identity()
    changed = sorted(k for k in set(stored["config"]) | set(current) if stored["config"].get(k) != current.get(k))
    if changed:
        raise UserError(f"{files.result} holds a run with other settings ({', '.join(changed)}); delete it or "
                        "pass another --results-dir")
    if backbone is not None:
        theirs = stored.get("backbone") or {}
        if theirs.get("sha256") != backbone["sha256"]:
            was = (f"{theirs.get('path')} (sha256 {str(theirs.get('sha256'))[:12]})" if theirs
                   else "a backbone it does not record")
            raise UserError(f"{files.result} was trained on {was}, this run's backbone is {backbone['path']} "
                            f"(sha256 {backbone['sha256'][:12]}); delete it or pass another --results-dir")
    final = stored.get("final")
    if not isinstance(final, dict):
        raise BadResultFile(f"{files.result} has no 'final' metrics: delete it to run its cell again")
    for metric in final:
        if stored.get("failed") is None:
            final_metric(dict(stored, path=str(files.result)), metric)  # BadResultFile if not a plausible number
    return stored


def new_result(cfg, protocol, lr_source, settings, body, code_version, backbone=None):
    """The JSON of one run: what ran (config, recipe version, where the lr came from, the backbone file's
    SHA-256 and format), how (settings), and `body` (history, final metrics, learned gates, timings)."""
    return {"config": cfg.identity(), "protocol": protocol, "recipe_version": config.RECIPE_VERSION,
            "lr_source": lr_source, "deviations": json.loads(json.dumps(config.deviations(cfg))),
            "backbone": backbone, "code_version": code_version, "runtime": settings.record(), **body}


def write_run(files, result, prompt_state=None, pack=None):
    """Every output of a run, the one writer: the trained prompts (prompt_state), the prompt pack (pack = (model,
    info): gated_prompt's save_pack of the model with `info`), then the result JSON last, each written atomically,
    so a kill at any moment leaves either no result or a result whose prompts and pack are complete. Then the
    resumable state and the job record are removed."""
    import torch  # only writing needs it
    files.result.parent.mkdir(parents=True, exist_ok=True)
    if prompt_state is not None:
        atomic_write(files.prompts, lambda f: torch.save(prompt_state, f))
    if pack is not None:
        model, info = pack
        model.save_pack(files.pack, **info)
    write_json(files.result, result)
    files.state.unlink(missing_ok=True)
    files.job.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Backbone identity: which file a run's numbers come from


def ssl_of_wrapper(raw):
    """The self-supervised method a raw checkpoint's wrapper names: MAE files are {'model': sd} (timm names, no
    classifier: DeiT's {'model': sd} has one), MoCo v3 files {'state_dict': sd} with 'module.' keys; None when the
    layout does not say (timm, Hugging Face, npz state dicts, DeiT, DINO)."""
    if isinstance(raw.get("model"), dict) and any(k.startswith(("blocks.", "patch_embed.")) for k in raw["model"]) \
            and "head.weight" not in raw["model"]:
        return "mae"
    if isinstance(raw.get("state_dict"), dict) and any(k.startswith("module.") for k in raw["state_dict"]):
        return "mocov3"
    return None


def backbone_identity(path, memo_dir, trust_pickle=False):
    """{path, bytes, sha256, format, ssl} of a backbone file. Hashing and reading a 340 MB file takes seconds, so
    the answer is remembered in <memo_dir>/backbones.json by absolute path + size + mtime. The first read also
    checks every floating tensor for NaN / inf (UserError naming the file)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise gp.CheckpointError(f"checkpoint not found: {path}") from None
    memo_file = Path(memo_dir) / "backbones.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except FileNotFoundError:
        memo = {}
    except (OSError, ValueError):
        memo = None
    if not isinstance(memo, dict):
        print(f"note: {memo_file} is not a file this harness wrote (edited or damaged?); it is rebuilt")
        memo = {}
    if key in memo:
        if _memo_entry_fits(memo[key], st.st_size):
            return dict(memo[key], path=str(path))
        print(f"note: {memo_file} holds an entry for {path} that this harness did not write (edited?); the file "
              "is hashed and read again")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    raw, _ = gp.read_checkpoint(path, trust_pickle)
    state, fmt, _ = gp.detect_format(raw, str(path))
    bad = [k for k, v in state.items() if _non_finite(v)]
    if bad:
        raise UserError(f"{path}: {len(bad)} backbone tensor(s) hold NaN or inf (e.g. {bad[0]}); the file is "
                        "damaged: download it again")
    downloads.check_floating_weights(state, str(path))
    record = {"bytes": st.st_size, "sha256": h.hexdigest(), "format": fmt, "ssl": ssl_of_wrapper(raw)}
    memo[key] = record
    try:
        write_json(memo_file, memo)
    except OSError:
        pass  # only a speed-up
    return dict(record, path=str(path))


def _memo_entry_fits(entry, size):
    """An entry of backbones.json as backbone_identity writes it: the file's size, a SHA-256, a format name and the
    ssl its wrapper names, consistent with that format."""
    if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256", "format", "ssl"}:
        return False
    sha, fmt, ssl = entry["sha256"], entry["format"], entry["ssl"]
    return (entry["bytes"] == size and isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None
            and isinstance(fmt, str) and (ssl is None or (ssl == "mae" and fmt == "timm / MAE")
                                          or (ssl == "mocov3" and fmt.startswith("MoCo v3"))))


def _non_finite(value):
    import numpy as np
    import torch
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return not bool(np.isfinite(value).all())
    return False


SSL_NAMES = {"mae": "MAE", "mocov3": "MoCo v3"}


def check_backbone_fits(backbone, ssl):
    """UserError when the file's wrapper says it is another method's checkpoint than --ssl."""
    if backbone and backbone.get("ssl") and backbone["ssl"] != ssl:
        raise UserError(f"{backbone['path']} is a {SSL_NAMES[backbone['ssl']]} checkpoint (its layout: "
                        f"{backbone['format']}), but --ssl {ssl} asks for {SSL_NAMES.get(ssl, ssl)}: pass "
                        f"--ssl {backbone['ssl']} or the {SSL_NAMES.get(ssl, ssl)} file")


# -----------------------------------------------------------------------------
# Claims: one process trains a cell; others skip it


def scheduler_job():
    """(job, task) of the scheduler job this process runs in: ("slurm:<id>", "<step>.<rank>") under SLURM (an
    array task's id as <array id>_<index>, which a requeued job keeps), ("local:<host>:<id>", "0") in submitit's
    local executor, (None, None) elsewhere."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
               else env["SLURM_JOB_ID"])
        return f"slurm:{job}", f"{env.get('SLURM_STEP_ID', '')}.{env.get('SLURM_PROCID', '0')}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{socket.gethostname()}:{env['SUBMITIT_LOCAL_JOB_ID']}", env.get("SUBMITIT_LOCAL_GLOBALID", "0")
    return None, None


_SQUEUE = {"at": 0.0, "states": None}


def slurm_states(max_age=5.0):
    """{job id: state} of every job SLURM's queue lists (squeue; array tasks as <array id>_<index>), remembered for
    `max_age` seconds; None where squeue is not installed or fails."""
    if time.time() - _SQUEUE["at"] > max_age:
        states = None
        if shutil.which("squeue"):
            try:
                out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True,
                                     timeout=60)
                if out.returncode == 0:
                    states = dict(line.split(None, 1) for line in out.stdout.splitlines() if " " in line.strip())
            except (OSError, subprocess.SubprocessError):
                pass
        _SQUEUE.update(at=time.time(), states=states)
    return _SQUEUE["states"]


def _holder():
    import getpass
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    job, task = scheduler_job()
    return {"holder": f"{user}@{socket.gethostname()}", "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "job": job, "task": task}


def claim_cell(files):
    """Claim a cell before training it: create files.claim exclusively (O_EXCL) holding who, pid, host, start time
    and scheduler job. Returns None when claimed, else the live holder's record. A claim nobody holds any more
    (claim_is_stale) is taken over; a claim from another host that cannot be checked is taken as live (delete the
    .claim file if that machine died)."""
    return take_exclusively(files.claim, _holder, _read_claim, lambda holder: not claim_is_stale(holder),
                            {"holder": "another process", "pid": None, "host": None, "started": "?"})


def take_exclusively(path, record, read, live, unknown):
    """Create `path` exclusively (O_EXCL) holding the JSON of record(): None when this process holds it now, else
    the record of its live holder (read(path), live(that record)). A file still being written is looked at again;
    one whose holder is gone is taken over (renamed away first, so one process wins). `unknown`: the holder to
    return when the file cannot be read after five tries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            held = read(path)
            if held is None and _age(path) < 10:
                time.sleep(0.05)
                continue   # being written or just released: look again
            if held is not None and live(held):
                return held
            stale = path.with_name(f"{path.name}.stale{os.getpid()}")
            try:
                os.rename(path, stale)   # only one process wins the takeover
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record(), f)
        return None
    return read(path) or unknown


def read_claim(files):
    """The record of a cell's claim, or None when there is none (or it cannot be read)."""
    return _read_claim(files.claim) if files.claim.exists() else None


def _read_claim(path):
    try:
        holder = json.loads(Path(path).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        time.sleep(0.05)
        return None


def _age(path):
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def claim_is_stale(holder):
    """True when nobody holds a claim any more: a record this harness did not write (a pid that is not a positive
    whole number, no host), a dead process on this host, an earlier life of this very scheduler job (requeued,
    perhaps onto another node), or a SLURM job that SLURM's queue no longer lists."""
    pid, host, job = holder.get("pid"), holder.get("host"), holder.get("job")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or not isinstance(host, str) or \
            not isinstance(job, (str, type(None))):
        return True
    if host == socket.gethostname():
        return pid != os.getpid() and not pid_alive(pid)
    if job is not None and (job, holder.get("task")) == scheduler_job():
        return True
    if job is not None and job.startswith("slurm:"):
        states = slurm_states()
        return states is not None and job[len("slurm:"):] not in states
    return False


def release_cell(files):
    """Remove this process's claim."""
    holder = _read_claim(files.claim)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        files.claim.unlink(missing_ok=True)


def load_runs(results_dir, protocol="final", problems=None, **filters):
    """Every run JSON under results_dir (recursively) whose config matches the filters (a value, a list of
    allowed values, or None for any). Only runs of `protocol` (None: all). Files that are not run JSONs are
    skipped; with a `problems` list, unreadable ones are appended to it as (path, what is wrong). Each run gets
    "path" and "mtime"."""
    if not os.path.isdir(results_dir):
        raise UserError(f"results folder not found: {results_dir}")
    runs = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if path.name == "backbones.json" or path.name.endswith(".check.json"):
            continue   # the cache's own files
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            if problems is not None:
                problems.append((str(path), f"unreadable ({type(e).__name__}; truncated?): delete it and run its "
                                            "cell again"))
            continue
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            continue
        if protocol is not None and run.get("protocol", "final") != protocol:
            continue
        if all(_matches(run["config"].get(key), want) for key, want in filters.items()):
            run["path"], run["mtime"], run["cfg"] = str(path), path.stat().st_mtime, config_of(run)
            runs.append(run)
    return runs


def config_of(run):
    """A stored run's config as its typed config, or None where this code cannot build it (a file of another
    harness version, an edited file)."""
    try:
        return config.from_identity(run.get("config"))
    except UserError:
        return None


def _matches(value, want):
    if want is None:
        return True
    if isinstance(want, (list, tuple, set, frozenset)):
        return value in want
    return value == want


PERCENT_METRICS = ("acc", "miou")   # metrics in percent: a stored value outside [0, 100] is not a result


def final_metric(run, metric="test_acc"):
    """run["final"][metric] as a float, or None when the run has not finished (or failed). BadResultFile naming
    the file when the stored value is not a number, not finite, or a percentage outside [0, 100]."""
    value = (run.get("final") or {}).get(metric)
    if value is None:
        return None
    where = run.get("path", "a result file")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadResultFile(f"{where}: final {metric} is {value!r}, not a number (edited?): delete it and run its "
                            "cell again")
    if any(m in metric for m in PERCENT_METRICS) and not 0.0 <= value <= 100.0:
        raise BadResultFile(f"{where}: final {metric} = {value} is not a percentage in [0, 100] (edited?): delete "
                            "it and run its cell again")
    return float(value)


def newest_lr_runs(runs):
    """The runs of one cell at a single learning rate: the lr of the newest file, so re-running a cell at another
    lr (e.g. after a sweep) replaces it instead of mixing."""
    lr = max(runs, key=lambda r: r["mtime"])["cfg"].lr
    return [r for r in runs if r["cfg"].lr == lr]


def summary(values):
    """(mean, sample std -- 0 for one value --, count) of a list of numbers."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n

# -----------------------------------------------------------------------------
# Which runs are the paper's recipe


def is_paper_run(run, lr=None):
    """A finished run of the current recipe version with no departure from the recipe, trained at the recipe's
    lr (or `lr`, e.g. Figure 1's) or at the lr the sweep picked."""
    cfg = config_of(run)
    if run.get("recipe_version") != config.RECIPE_VERSION or cfg is None or cfg.recipe != "paper":
        return False   # of another version, or a config this code cannot build (renamed task, ...)
    if config.deviations(cfg):
        return False
    return run.get("lr_source") == "sweep" or cfg.lr == (lr if lr is not None else config.recipe_of(cfg).lr)


def how_it_differs(run):
    """One line: why a run is not a paper cell."""
    if run.get("recipe_version") != config.RECIPE_VERSION:
        return f"stale: recipe version {run.get('recipe_version', 1)}, now {config.RECIPE_VERSION}"
    cfg = config_of(run)
    if cfg is None:
        return "a config this code cannot build"
    parts = [f"{k}={v}" for k, v in (run.get("deviations") or {}).items()]
    if cfg.recipe == "vpt":
        parts.insert(0, "VPT's recipe")
    if not parts and run.get("lr_source") != "sweep":
        parts.append(f"lr={cfg.lr} ({run.get('lr_source', 'set by hand')})")
    return ", ".join(parts) or "?"


def cell_key(spec):
    """What identifies a cell apart from its recipe: task, backbone, method, size, prompts, insertion block."""
    return cell_of(config.resolve(**{k: v for k, v in spec.items() if k != "lr"}))


def cell_of(cfg):
    return tuple(getattr(cfg, name) for name in CELL_KEYS)


def runs_of(runs, spec):
    """(paper-recipe runs, other runs) of one cell."""
    key = cell_key(spec)
    mine = [r for r in runs if tuple(r["config"].get(k) for k in CELL_KEYS) == key]
    paper = [r for r in mine if is_paper_run(r, spec.get("lr"))]
    return paper, [r for r in mine if r not in paper]


def cell_value(runs, metric):
    """mean, std, n over the seeds of the newest lr; None without a finished run."""
    runs = [r for r in runs if final_metric(r, metric) is not None]
    if not runs:
        return None
    return summary([final_metric(r, metric) for r in newest_lr_runs(runs)])


def paper_value(result, metric):
    """The paper's number for a run's cell when the run is of the paper's exact recipe, else None."""
    cfg = config_of(result)
    if cfg is None or isinstance(cfg, config.DemoConfig) or not is_paper_run(result):
        return None
    for number in ("1", "3", "4", "6", "7", "8"):
        for section in table(number):
            for row in section.rows:
                for i, (spec, cell_metric) in enumerate(row.cells):
                    if cell_metric == metric and cell_key(spec) == cell_of(cfg) and i < len(row.paper):
                        return row.paper[i]
    return None  # e.g. a single VTAB task: Table 2 reports group means only

# -----------------------------------------------------------------------------
# The tables: each defined once; printing and `--table N --run` both read these definitions


@dataclass
class Row:
    label: str
    cells: list                 # measured cells: (spec, metric); spec = resolve()'s arguments
    paper: list                 # the paper's number per printed column
    combine: object = None      # measured values -> printed values (default: as measured)


@dataclass
class Section:
    title: str
    columns: list
    rows: list
    notes: list = field(default_factory=list)
    per_cell_lines: bool = False   # also print each measured cell (Table 2's 19 tasks)
    in_paper: bool = True          # False: a backbone the paper did not test (no paper numbers)


def _mean(values):
    """The plain mean of cells' means, only when every cell has a value."""
    if not values or any(v is None for v in values):
        return None
    return sum(v[0] for v in values) / len(values), 0.0, 1


def _with_mean(values):
    return list(values) + [_mean(values)]


def _prompts(method, arch, total):
    """Prompt count per run for a table's total (VPT-deep: per block)."""
    return total // gp.ARCHS[arch][2] if method == "vpt-deep" else total


VPT_NOTE = ("our VPT rows run Table 5's batch size and lr of the paper's method (the paper lists none for the "
            "baselines); --recipe vpt --sweep runs VPT's own recipe, listed with --all")


def _fgvc_section(title, ssl, methods, paper, total=None):
    """One FGVC block: a row per method, a column per dataset and their mean. total: prompts in all (Table 7).
    paper None: a backbone outside the paper (no paper numbers)."""
    def spec(task, method):
        return dict(task=task, ssl=ssl, method=method,
                    **({"num_prompts": _prompts(method, "vit_base", total)} if total else {}))
    rows = [Row(m, [(spec(t, m), "test_acc") for t in FGVC_COLUMNS],
                [paper[m][t] for t in FGVC_COLUMNS] + [paper[m]["mean"]] if paper else [None] * 6, _with_mean)
            for m in methods]
    return _outside(Section(title, FGVC_COLUMNS + ["mean"], rows, [VPT_NOTE]), ssl)


def _outside(section, ssl):
    """A section of a backbone the paper did not test marked as such; a paper backbone's section unchanged."""
    if ssl in PAPER_SSL:
        return section
    column = config.HPARAMS["beyond_paper"]["ssl_column"]
    return Section(f"{section.title} -- {ssl}: NOT IN THE PAPER", section.columns, section.rows,
                   [f"{ssl} is not a backbone of the paper: each cell runs Table 5's {column} values for its task "
                    f"(paper_hparams.yaml beyond_paper); there is no paper number to compare with"]
                   + section.notes[:1], section.per_cell_lines, in_paper=False)


def table(number, other_ssl=()):
    """The sections of paper table `number` (1, 2, 3, 4, 6, 7, 8). other_ssl: backbones outside the paper; the
    tables with a section per backbone (BY_BACKBONE) add one for each, the same rows without paper numbers."""
    backbones = PAPER_SSL + tuple(s for s in other_ssl if s not in PAPER_SSL)
    if number == "1":
        return [_fgvc_section(f"Table 1 - FGVC, {ssl}, ViT-B/16, top-1 test accuracy (%)", ssl, TABLE_METHODS,
                              PAPER["table1"].get(ssl)) for ssl in backbones]
    if number == "2":
        groups = {g: [t for t, info in datasets.VTAB_TASKS.items() if info.group == g]
                  for g in ("natural", "specialized", "structured")}
        tasks = list(datasets.VTAB_TASKS)

        def combine(values):   # group means, then the plain mean of the 19 tasks (the paper's "mean")
            by_task = dict(zip(tasks, values))
            return [_mean([by_task[t] for t in ts]) for ts in groups.values()] + [_mean(values)]
        sections = []
        for ssl in backbones:
            paper = PAPER["table2"].get(ssl)
            rows = [Row(m, [(dict(task=t, ssl=ssl, method=m), "test_acc") for t in tasks],
                        [paper[m][c] for c in ("natural", "specialized", "structured", "mean")] if paper else [None] * 4,
                        combine) for m in TABLE_METHODS]
            sections.append(_outside(Section(f"Table 2 - VTAB-1k, {ssl}, ViT-B/16, top-1 test accuracy (%)",
                                             ["natural", "specialized", "structured", "19-task mean"], rows,
                                             ["the paper's VPT rows are VPT's own reported numbers (VPT's recipe); "
                                              + VPT_NOTE], per_cell_lines=True), ssl))
        return sections
    if number in ("3", "6"):
        sections = []
        for ssl in backbones:
            paper = PAPER[f"table{number}"].get(ssl)
            ref = paper or PAPER[f"table{number}"]["mae"]   # the prompt counts, the same for every backbone
            rows = [Row(m, [(dict(task="ade20k", ssl=ssl, method=m, num_prompts=ref[m]["prompts"]), metric)
                            for metric in ("miou_ss", "miou_ms")],
                        [ref[m]["miou_ss"], ref[m]["miou_ms"]] if paper else [None, None])
                    for m in TABLE_METHODS]
            total = 100 if number == "3" else 24
            sections.append(_outside(Section(f"Table {number} - ADE20K, SETR-PUP, {ssl}, {total} prompts, mIoU (%)",
                                             ["mIoU (SS)", "mIoU (MS)"], rows), ssl))
        return sections
    if number == "4":
        rows = [Row(m, [(dict(task=t, ssl="mae", method=m, num_prompts=100), "test_acc") for t in ("cub", "flowers")],
                    [PAPER["table4"][m][t] for t in ("cub", "flowers")]) for m in ("vpt-shallow", "gated-hard",
                                                                                   "gated+temp")]
        return [Section("Table 4 - hard vs soft gates, MAE, 100 prompts, top-1 (%)", ["cub", "flowers"], rows)]
    if number == "7":
        return [_fgvc_section(f"Table 7 - FGVC, MAE, {total} prompts in total, top-1 (%)", "mae",
                              ["vpt-deep", "gated+temp"], PAPER["table7"][total], total) for total in (24, 48, 96)]
    if number == "8":
        sections = []
        for arch, ref in PAPER["table8"].items():
            rows = [Row(m, [(dict(task=t, ssl=ref["ssl"], method=m, arch=arch, num_prompts=_prompts(m, arch, 48)),
                             "test_acc") for t in ("cub", "flowers")], [ref[m][t] for t in ("cub", "flowers")])
                    for m in TABLE_METHODS]
            sections.append(Section(f"Table 8 - {arch} ({ref['ssl']}), 48 prompts, top-1 (%)", ["cub", "flowers"], rows))
        return sections
    raise UserError(f"no table {number}; the paper's tables are 1, 2, 3, 4, 6, 7, 8")


def table_cells(number):
    """Every distinct cell (resolve()'s arguments) of a table, in order: what `--table N --run` runs."""
    cells, seen = [], set()
    for section in table(number):
        for row in section.rows:
            for spec, _ in row.cells:
                key = tuple(sorted(spec.items()))
                if key not in seen:
                    seen.add(key)
                    cells.append(spec)
    return cells


def fmt(value, paper=None):
    ours = "-" if value is None else (f"{value[0]:.2f}" + (f"±{value[1]:.2f}" if value[2] > 1 else ""))
    return ours if paper is None else f"{ours} ({paper:.2f})"


def print_table(number, results_dir, show_all=False):
    """A paper table from stored runs: `ours (paper)` per cell, only runs of the paper's exact recipe. Other runs
    of the same cells are counted, and listed with show_all (--all)."""
    problems = []
    runs = _plausible(load_runs(results_dir, problems=problems), problems) if Path(results_dir).is_dir() else []
    others = {}
    for section in table(number, other_backbones(number, runs)):
        print(section.title)
        printed = []
        for row in section.rows:
            values = []
            for spec, metric in row.cells:
                paper_runs, other_runs = runs_of(runs, spec)
                values.append(cell_value(paper_runs, metric))
                for r in other_runs:
                    if final_metric(r, metric) is not None:
                        others.setdefault(r["path"], (r, metric))
            shown = row.combine(values) if row.combine else values
            done = sum(v is not None for v in values)
            label = row.label + (f" [{done}/{len(values)}]" if section.per_cell_lines else "")
            printed.append((label, shown, row.paper, values, row))
        width = max(len(p[0]) for p in printed) + 2
        print(" " * width + "".join(f"{c:>18}" for c in section.columns))
        for label, shown, paper, values, row in printed:
            print(f"{label:<{width}}" + "".join(f"{fmt(v, p):>18}" for v, p in zip(shown, paper)))
            if section.per_cell_lines and any(values):
                print("  " + row.label + " per task: " + ", ".join(
                    f"{spec['task']} {fmt(v)}" for (spec, _), v in zip(row.cells, values) if v))
        for note in section.notes:
            print(f"note: {note}")
        print("cells: ours (paper); '-' = no run of the paper's exact recipe yet; ± = std over seeds\n"
              if section.in_paper else "cells: ours (no paper number); '-' = no run of the recipe yet; ± = std over "
                                       "seeds\n")
    if others and show_all:
        print("OTHER SETTINGS - runs of these cells that are NOT the paper's recipe (not comparable to the paper):")
        for path, (r, metric) in sorted(others.items()):
            print(f"  {final_metric(r, metric):7.2f}  {Path(path).relative_to(results_dir)}  ({how_it_differs(r)})")
    elif others:
        print(f"{len(others)} stored run(s) of these cells use other settings or an older recipe version and are "
              f"not shown; --all lists them")
    if problems:
        print(f"NOT SHOWN - {len(problems)} file(s) in {results_dir} could not be used:")
        for path, what in problems:
            print(f"  {path}: {what}")


def other_backbones(number, runs):
    """The backbones outside the paper with a stored run of one of table `number`'s tasks (for the tables with a
    section per backbone): the sections print_table adds after the paper's."""
    if number not in BY_BACKBONE:
        return []
    tasks = {spec["task"] for spec in table_cells(number)}
    return sorted({r["config"].get("ssl") for r in runs if r["config"].get("task") in tasks}
                  & (set(gp.SSL) - set(PAPER_SSL)))


def summary_note(run):
    """What a single run's printed number is beside the paper: "" for a run of a paper cell's exact recipe (its
    paper number is printed instead), else "   (...)": outside the paper (which Table 5 values it ran), and / or
    not the paper's recipe (how it differs)."""
    parts = []
    cfg = config_of(run)
    if cfg is not None and config.outside_paper(cfg):
        parts.append(f"outside the paper: {config.outside_paper(cfg)}")
    if not is_paper_run(run):
        parts.append(f"not the paper's recipe: {how_it_differs(run)}")
    return f"   ({'; '.join(parts)})" if parts else ""


def _plausible(runs, problems):
    """The runs whose stored metrics are numbers (percentages in [0, 100]); the others go to `problems`."""
    keep = []
    for run in runs:
        try:
            for metric in run.get("final") or {}:
                final_metric(run, metric)
        except BadResultFile as e:
            problems.append((run["path"], str(e).split(": ", 1)[1]))
            continue
        keep.append(run)
    return keep
