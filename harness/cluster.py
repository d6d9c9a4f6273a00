"""Runs as cluster jobs: SLURM through submitit, one job per run, or the very same jobs as local processes.

    job_runs = cluster.plan(cfgs, sweep=True, seeds=3)              # every run a command needs, in order
    code = cluster.submit(job_runs, cluster.Options("slurm", partition="gpu"), job_settings)
    cluster.print_states(cfgs, "results")                           # queued / running / failed runs, per job

A job is a `Job` (pickled by submitit) that runs its runs through runs.run_queue in a fresh process on the node,
with the settings of the command (paths made absolute) and `resume` on: a requeued or resubmitted job continues a
run's saved state. `groups` gives each run its own job; a trainer of batched runs can group several runs there.

Every run submitted has a job record, <run>.job beside its result (results.RunFiles.job): created exclusively
before anything is submitted, so two submissions at once never queue one run twice, and removed when the run
finishes. A run that is finished, claimed by a live process or held by a live job is not submitted again; the
record of a job that ended without a result (failed) is replaced. Records say which job (SLURM's id, or the local
controller's pid) and where its log is; `print_states` reads them with SLURM's queue (results.slurm_states).

Stop signals in a job: SIGTERM, SIGUSR1 and submitit's signal (SIGUSR2, sent by SLURM `signal_delay_s` before the
time limit) stop the run after its current step with its state saved and its claim released (runtime.Stopped);
after SIGUSR1 or submitit's signal the job requeues itself through submitit's checkpoint mechanism (Job.checkpoint)
and its next start resumes the run where it stopped. SIGTERM (scancel, or a preemption that SLURM requeues by
itself) ends the job without requeueing: submitting the same command again continues it.

Dependencies: after `--sweep`, a cell's final runs pick their lr when their job starts (runs.run_swept_final), so
their jobs wait for the sweep's jobs (SLURM: --dependency=afterany; locally the controller waits).
"""
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from harness import config
from harness import results
from harness import runs
from harness import runtime
from harness.data import datasets
from harness.runtime import UserError, pid_alive, write_json

import gated_prompt as gp

EXIT_FAILED, EXIT_NOT_RUN, EXIT_STOPPED = 1, 4, 75   # reproduce.py's exit codes (see its cli_main)
MAX_TIMEOUTS = 20          # requeues after a time limit (submitit's countdown); preemptions do not count
SIGNAL_DELAY_S = 90        # submitit's signal comes this long before the time limit
REPO = Path(__file__).resolve().parents[1]   # on the jobs' PYTHONPATH: they import harness from this checkout


@dataclasses.dataclass(frozen=True)
class Options:
    """How jobs are submitted: the --slurm* flags."""
    executor: str = "slurm"      # "slurm", or "local": the same jobs as processes on this machine
    partition: str = None
    gpus: int = 1                # per job: 1, or 0 for CPU-only jobs (a run on several GPUs goes through torchrun)
    cpus: int = 8                # per job
    time_min: int = 1440         # the time limit per job, in minutes; a run that needs longer is requeued
    account: str = None
    qos: str = None
    array_limit: int = None      # jobs at once (SLURM: the array's %N; local: processes, default one per GPU)


@dataclasses.dataclass(frozen=True)
class JobRun:
    """One run a job trains: runs.run_one's (config, protocol, lr source), or protocol "swept": the final run at
    `seed` of cell `cfg` after its lr sweep (the lr is picked when the job starts)."""
    cfg: object
    protocol: str
    lr_source: str = "recipe"
    seed: int = None

    def files(self, results_dir):
        """The run's files; a swept run's record lives under the cell's name at its seed (its lr is not known)."""
        if self.protocol == "swept":
            return results.run_files(results_dir, self.cfg.replace(seed=self.seed), "swept")
        return results.run_files(results_dir, self.cfg, self.protocol)

    def identity(self):
        """What a job record keeps of the run (run_of reads it back)."""
        return {"config": self.cfg.identity(), "protocol": self.protocol, "lr_source": self.lr_source,
                "seed": self.seed}

    @property
    def name(self):
        cfg = self.cfg.replace(seed=self.seed) if self.protocol == "swept" else self.cfg
        return results.run_name(cfg, self.protocol) + (" (after its sweep)" if self.protocol == "swept" else "")


def run_of(record):
    """The JobRun a job record names, or None when the record is not one this code can read."""
    try:
        return JobRun(config.from_identity(record["config"]), record["protocol"], record["lr_source"],
                      record["seed"])
    except (UserError, KeyError, TypeError):
        return None


def sweep_points(cell):
    """The sweep runs of a cell (its grid points at its seed)."""
    return [JobRun(cell.replace(**point), "sweep", "sweep grid") for point in config.sweep_grid(cell)]


def plan(cfgs, sweep=False, seeds=1, lr_source="recipe"):
    """Every run of a command, in order: with `sweep`, each cell's sweep points and then its final runs
    ("swept"; ADE20K's fixed recipe has no sweep), else the final runs of every seed."""
    swept = [c for c in cfgs if sweep and not isinstance(c, config.SegmentationConfig)]
    job_runs = [p for c in swept for p in sweep_points(c)]
    for c in cfgs:
        job_runs += [JobRun(c, "swept", "sweep", seed) if c in swept else JobRun(c.replace(seed=seed), "final",
                                                                                    lr_source)
                     for seed in config.seeds_of(c, seeds)]
    return job_runs


def groups(job_runs):
    """The runs of each job: one run per job. (A trainer of batched runs groups the runs it trains together.)"""
    return [[r] for r in job_runs]


def job_settings(settings, fp32=False, no_compile=False):
    """Settings.for_device's arguments for a job (which picks its node's GPU, bf16 and compile unless fp32 /
    no_compile): the command's paths made absolute (a job may start elsewhere) and resume on (a requeued or
    resubmitted job continues its run's saved state). tqdm shows no bars in a log file."""
    absolute = {k: None if getattr(settings, k) is None else os.path.abspath(getattr(settings, k))
                for k in ("results_dir", "data_dir", "cache_dir", "checkpoint", "checkpoint_dir")}
    return dict(absolute, fp32=fp32, no_compile=no_compile, trust_pickle=settings.trust_pickle,
                mirror=settings.mirror, resume=True)

# --- the job ----------------------------------------------------------------------------------------


class Job:
    """What a cluster job runs: its runs, in a process of its own. submitit calls it, and calls checkpoint() when
    the job is to be requeued."""

    def __init__(self, job_runs, settings, threads):
        self.job_runs, self.settings, self.threads = list(job_runs), dict(settings), threads

    def __call__(self):
        import torch
        torch.set_num_threads(self.threads)   # the job's CPUs, not the node's (torch's default)
        requeue = _submitit_requeue()
        settings = runtime.Settings.for_device(None, **self.settings)   # the node's GPU, bf16 and compile
        runs.start(settings)
        skipped = []
        try:
            for r in self.job_runs:
                if r.protocol == "swept":
                    if runs.run_swept_final(r.cfg, r.seed, settings, skipped) is not None:
                        r.files(settings.results_dir).job.unlink(missing_ok=True)
                else:
                    runs.run_queue([(r.cfg, r.protocol, r.lr_source)], settings, skipped)
        except runtime.Stopped as e:
            again = requeue is not None and e.signum != signal.SIGTERM
            print(stopped_line(e, "this job is requeued and continues it" if again else
                               "not requeued: submit the same command again to continue it"),
                  file=sys.stderr, flush=True)
            if again:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)   # SLURM's SIGTERM to the requeued job's old life
                requeue(e.signum, None)   # submitit: checkpoint(), requeue, exit
            sys.exit(EXIT_STOPPED)
        except (UserError, datasets.DataError, gp.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(runtime.EXIT_BAD_INPUT)
        except runtime.NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(3)
        if skipped:
            print(f"not run, held by another process: {', '.join(skipped)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_NOT_RUN)

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook: the same job again (its runs resume from their saved states)."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def _submitit_requeue():
    """submitit's handler of its own signal (checkpoint and requeue) when this process is a submitit job, else
    None. Read before runs.start replaces it with the stop handler."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit.core.job_environment import JobEnvironment
    handler = signal.getsignal(JobEnvironment._usr_sig())
    return handler if callable(handler) else None


def stopped_line(e, then):
    """One line: which signal stopped the run, what is saved where, and what happens next (`then`)."""
    state, run = getattr(e, "state_path", None), getattr(e, "run", None)
    name = signal.Signals(e.signum).name
    if getattr(e, "summary", None):
        return f"stopped by {name}: {e.summary}; {then}"
    if state is None:
        return f"stopped by {name} between runs; nothing is lost; {then}"
    if Path(state).is_file():
        return f"stopped by {name} after a finished step: {run} keeps its state at {state}; {then}"
    return f"stopped by {name} before {run} saved any state (its first epoch had not finished); {then}"

# --- records: which job holds which run -------------------------------------------------------------


def read_record(path):
    """A job record (a dict), or None when there is none or it cannot be read."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_state(record):
    """"queued", "running", "ended" or "unknown" (it cannot be checked from here) of a run's job record."""
    if record is None:
        return "ended"
    job, host, pid = record.get("job"), record.get("host"), record.get("pid")
    if job is None:   # being submitted, or waiting in a local submission's queue
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return "ended"
        return "unknown" if host != socket.gethostname() else "queued" if pid_alive(pid) else "ended"
    if record.get("cluster") == "slurm":
        states = results.slurm_states()
        if states is None:
            return "unknown"
        state = states.get(str(job))
        return "ended" if state is None else "queued" if state.startswith(("PENDING", "REQUEUE")) else "running"
    if host != socket.gethostname():
        return "unknown"
    return "running" if str(job).isdigit() and pid_alive(int(job)) else "ended"


def reserve(job_run, results_dir, executor):
    """Create the run's job record exclusively (O_EXCL), naming this process as its submitter. Returns None when
    this process holds it now, else the record of the live job that holds it. A record whose job ended (and a
    record this harness did not write) is replaced."""
    return results.take_exclusively(job_run.files(results_dir).job, lambda: _record(executor, None, None, job_run),
                                    read_record, lambda record: record_state(record) != "ended",
                                    {"job": None, "cluster": executor})


def _record(executor, job, log, job_run):
    return {"cluster": executor, "job": job, "log": log, "host": socket.gethostname(), "pid": os.getpid(),
            "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "run": job_run.identity()}


def run_state(job_run, results_dir):
    """(state, detail) of a run: "finished", "running" (a live claim or job), "queued", "failed" (its job ended
    without a result: detail is the log), "submitted" (its job cannot be checked from here) or None (never
    submitted, or finished and its record gone)."""
    files = job_run.files(results_dir)
    if job_run.protocol != "swept" and files.result.is_file():
        return "finished", None
    claim = results.read_claim(files) if job_run.protocol != "swept" else None
    if claim is not None and not results.claim_is_stale(claim):
        return "running", f"{claim.get('holder')} pid {claim.get('pid')}"
    record = read_record(files.job)
    if record is None:
        return None, None
    state = record_state(record)
    where = f"job {record.get('job') or '(not started)'}"
    if state == "ended":
        return "failed", f"{where}, log {record.get('log')}"
    return ("submitted" if state == "unknown" else state), where

# --- submitting -------------------------------------------------------------------------------------


def _submitit(options):
    try:
        import submitit
    except ImportError:
        raise UserError("--slurm needs submitit: pip install submitit") from None
    return submitit


def folder_of(results_dir):
    """The one folder of every job's log, submission script and pickle: <results-dir>/jobs."""
    return Path(results_dir).resolve() / "jobs"


def submit(job_runs, options, settings, results_dir):
    """Submit every run of `job_runs` that is not finished or held (one job per group); print what is submitted
    with its job id. SLURM: returns 0 once submitted. Local: runs the jobs (at most options.array_limit at once)
    and waits; returns 0 when every run finished, EXIT_FAILED when a job failed, EXIT_NOT_RUN when a run stayed
    held by a process this machine cannot check."""
    submitit = _submitit(options)
    folder = folder_of(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    job_runs = [_resolved(r, results_dir) for r in job_runs]
    if options.executor == "local":
        return _LocalQueue(submitit, options, settings, results_dir, folder).run(job_runs)
    return _submit_slurm(submitit, options, settings, results_dir, folder, job_runs)


def _resolved(job_run, results_dir):
    """A swept run whose sweep is stored already becomes the final run at the picked lr (its result is known)."""
    if job_run.protocol != "swept":
        return job_run
    best = runs.stored_pick(job_run.cfg, runtime.Settings(results_dir=results_dir))
    return job_run if best is None else JobRun(job_run.cfg.replace(**best, seed=job_run.seed), "final", "sweep")


def _slurm_executor(submitit, options, folder, dependency=None):
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError:
        raise UserError("--slurm: SLURM's srun is not found on this machine; --slurm local runs the same jobs as "
                        "local processes") from None
    params = dict(job_name="gated-prompt", time=options.time_min, cpus_per_task=options.cpus, nodes=1,
                  ntasks_per_node=1, signal_delay_s=min(SIGNAL_DELAY_S, options.time_min * 15),
                  setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"],
                  partition=options.partition, account=options.account, qos=options.qos,
                  gpus_per_node=options.gpus or None, dependency=dependency,
                  array_parallelism=options.array_limit or 256)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _submit_slurm(submitit, options, settings, results_dir, folder, job_runs):
    """Two arrays: the runs that need nothing first, then the final runs of swept cells, after every job that runs
    a sweep point of theirs (new or queued before)."""
    todo, held = _reserve_all(job_runs, results_dir, "slurm")
    first = [r for r in todo if r.protocol != "swept"]
    later = [r for r in todo if r.protocol == "swept"]
    try:
        ids = _submit_array(submitit, options, settings, results_dir, folder, first)
        if later:   # after this submission's array and the live jobs of their sweep points queued before
            queued = {(read_record(p.files(results_dir).job) or {}).get("job") for r in later
                      for p in sweep_points(r.cfg) if p.name not in ids}
            waits = sorted({j.split("_")[0] for j in ids.values()}
                           | {j for j in queued if j and (results.slurm_states() or {}).get(j)})
            _submit_array(submitit, options, settings, results_dir, folder, later,
                          dependency="afterany:" + ":".join(waits) if waits else None)
    except BaseException:
        for r in todo:   # nothing half-submitted blocks the next try
            if (read_record(r.files(results_dir).job) or {}).get("job") is None:
                r.files(results_dir).job.unlink(missing_ok=True)
        raise
    _print_held(held)
    print(f"{len(todo)} run(s) submitted; logs in {folder}")
    return 0


def _submit_array(submitit, options, settings, results_dir, folder, job_runs, dependency=None):
    """Submit one job per group as one SLURM array; write each run's record; print the ids. {run name: job id}."""
    if not job_runs:
        return {}
    executor = _slurm_executor(submitit, options, folder, dependency)
    batches = groups(job_runs)
    try:
        with executor.batch():
            jobs = [executor.submit(Job(group, settings, options.cpus)) for group in batches]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        lines = str(e).strip().splitlines() or ["no message"]
        raise UserError(f"sbatch refused the jobs: {lines[-1][:300]}") from None
    ids = {}
    for job, group in zip(jobs, batches):
        for r in group:
            ids[r.name] = job.job_id
            write_json(r.files(results_dir).job, _record("slurm", job.job_id, str(job.paths.stderr), r))
        print(f"submitted job {job.job_id}: {', '.join(r.name for r in group)}"
              + (f"; starts after job(s) {dependency.split(':', 1)[1].replace(':', ', ')}" if dependency else ""))
    return ids


def _reserve_all(job_runs, results_dir, executor):
    """(runs this submission now holds, [(run, why another holds it)]): finished runs and runs held by a live
    claim or a live job are left out."""
    todo, held = [], []
    for r in job_runs:
        state, detail = run_state(r, results_dir)
        if state in ("finished", "running", "queued", "submitted"):
            held.append((r, f"{state}{': ' + detail if detail else ''}"))
            continue
        record = reserve(r, results_dir, executor)
        if record is None:
            todo.append(r)
        else:
            held.append((r, f"held by job {record.get('job') or '(being submitted)'}"))
    return todo, held


def _print_held(held):
    finished = [r for r, why in held if why == "finished"]
    for r, why in held:
        if why != "finished":
            print(f"not submitted: {r.name}: {why}")
    if finished:
        print(f"not submitted: {len(finished)} finished run(s)")


class _LocalQueue:
    """The jobs as processes on this machine, through submitit's LocalExecutor (the same Job, the same signal and
    requeue handling): at most `array_limit` at once, each with a GPU of its own; a swept cell's final runs start
    once its sweep points ended; runs held by another live process are waited for and run here if they end
    without a result."""

    def __init__(self, submitit, options, settings, results_dir, folder):
        import torch
        self.submitit, self.options, self.settings, self.results_dir = submitit, options, settings, results_dir
        self.executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
        gpus = torch.cuda.device_count() if options.gpus else 0
        if options.gpus and not gpus:
            raise UserError("--slurm local: no GPU is visible here for --slurm-gpus 1 (the default); --slurm-gpus 0 "
                            "runs CPU-only jobs")
        self.slots = min(options.array_limit or gpus, gpus) if gpus else options.array_limit or 1
        self.free_gpus = list(range(gpus))
        self.running = {}   # LocalJob -> (runs, gpu)

    def run(self, job_runs):
        runtime.handle_stop_signals()
        todo, held = _reserve_all(job_runs, self.results_dir, "local")
        waiting = [r for r, _ in held if run_state(r, self.results_dir)[0] in ("running", "queued")]
        not_run = [(r, why) for r, why in held if r not in waiting and run_state(r, self.results_dir)[0]
                   != "finished"]
        failed = []
        try:
            while todo or waiting or self.running:
                failed += self._reap()
                for r in list(waiting):   # held elsewhere: ours once it ends without a result
                    state = run_state(r, self.results_dir)[0]
                    if state not in ("running", "queued"):
                        waiting.remove(r)
                        if state != "finished" and reserve(r, self.results_dir, "local") is None:
                            todo.append(r)
                for r in [r for r in todo if self._ready(r, todo + waiting)]:
                    if len(self.running) >= self.slots:
                        break
                    todo.remove(r)
                    self._start([r])
                time.sleep(0.2)
        except (runtime.Stopped, KeyboardInterrupt) as e:
            stopped = self._stop(e, todo)
            e.summary = (f"{stopped} running job(s) stopped after their current step, their states kept" if stopped
                         else "no job was running")
            raise
        _print_held(not_run)
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}")
            return EXIT_FAILED
        return EXIT_NOT_RUN if not_run else 0

    def _ready(self, job_run, unfinished):
        """A swept run is ready once no sweep point of its cell is queued or running (here or elsewhere)."""
        if job_run.protocol != "swept":
            return True
        return not any(p in unfinished or run_state(p, self.results_dir)[0] in ("running", "queued")
                       for p in sweep_points(job_run.cfg))

    def _start(self, group):
        gpu = self.free_gpus.pop(0) if self.free_gpus else None
        self.executor.update_parameters(timeout_min=self.options.time_min, gpus_per_node=int(gpu is not None),
                                        visible_gpus=() if gpu is None else (gpu,),
                                        signal_delay_s=min(SIGNAL_DELAY_S, self.options.time_min * 15),
                                        setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"])
        job = self.executor.submit(Job(group, self.settings, self.options.cpus))
        for r in group:
            write_json(r.files(self.results_dir).job, _record("local", job.job_id, str(job.paths.stderr), r))
        print(f"started job {job.job_id}: {', '.join(r.name for r in group)}", flush=True)
        self.running[job] = (group, gpu)

    def _reap(self):
        """The runs of jobs that ended without a result (each job's end printed)."""
        failed = []
        for job in [j for j in self.running if j.done()]:
            group, gpu = self.running.pop(job)
            if gpu is not None:
                self.free_gpus.append(gpu)
            states = [run_state(r, self.results_dir)[0] for r in group]
            bad = [r for r, s in zip(group, states) if s not in ("finished", None)]
            failed += bad
            last = _last_line(job.paths.stderr)
            print(f"job {job.job_id} " + (f"failed: {', '.join(r.name for r in bad)} ({last or 'no message'}; "
                                          f"log {job.paths.stderr})" if bad else "finished"), flush=True)
        return failed

    def _stop(self, e, todo):
        """A stop signal or Ctrl-C: the jobs stop after their current step (their states kept), the runs not
        started are released."""
        signum = getattr(e, "signum", signal.SIGINT)
        stopped = len(self.running)
        for job in self.running:
            if job._process is not None and job._process.poll() is None:
                job._process.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)
        for job in list(self.running):
            try:
                job._process.wait(timeout=120)
            except Exception:   # noqa: BLE001 - still running: it holds its claim and record, taken over later
                pass
        for r in todo:
            r.files(self.results_dir).job.unlink(missing_ok=True)
        return stopped


def _last_line(path):
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None

# --- states for --table N ---------------------------------------------------------------------------


def print_states(cells, results_dir):
    """Under a printed table: every submitted run of its cells (`cells`: configs) that is queued, running or
    failed, with its job, and how many of each; nothing when no run of these cells is submitted."""
    keys = {results.cell_of(c) for c in cells}
    rows = []
    for path in sorted(Path(results_dir).rglob("*.job")):
        record = read_record(path)
        run = run_of((record or {}).get("run") or {})
        if run is None or results.cell_of(run.cfg) not in keys:
            continue
        state, detail = run_state(run, results_dir)
        if state not in (None, "finished"):
            rows.append((state, run.name, detail))
    if rows:
        counts = {s: sum(r[0] == s for r in rows) for s in ("queued", "running", "failed", "submitted")}
        print("JOBS (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "; finished runs are in the "
              f"table; logs in {folder_of(results_dir)}):")
        for state, name, detail in sorted(rows):
            print(f"  {state:<9} {name}   {detail or ''}")
