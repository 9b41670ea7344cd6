"""The sweep on a Slurm cluster (`--launcher slurm`): every cell (span, seed) becomes one task
of a Slurm job array, submitted with submitit, running the command the local sweep runs
(sweep.cell_argv) into the same run folders. A job warned of its time limit (SIGUSR2,
SLURM_SIGNAL_DELAY_S before it) or preempted stops its cell at a checkpoint and is requeued
(submitit's checkpoint-and-requeue); its next start resumes the cell exactly. The same
command again submits only the cells that are neither finished nor queued or running, and
`--wait` waits for the jobs and ends with the report of the local sweep."""
import contextlib
import getpass
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from choices import SLURM_SIGNAL_DELAY_S
from files import atomic_open, file_lock
from sweep import cell_argv, cell_end, cell_settings, cell_state, check_start, grid, record_failure, report
from utils import REPO, UserError

# Requeues after a time limit (preemptions are not counted) before submitit gives a cell up:
# each resumes from the checkpoint saved at the signal, so only a runaway loop reaches this.
MAX_TIMEOUTS = 100


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install submitit") from None
    return submitit


def _stop_signal():
    """The signal submitit's jobs are warned with (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class CellJob:
    """One cell as what submitit pickles and runs on a node: the cell's command as a child
    process, with --resume when its run has begun (after a requeue, a resubmission, a node
    failure). checkpoint() is what submitit calls on the warning signal: the cell stops at
    a checkpoint, and the same CellJob is requeued."""

    def __init__(self, cfg, argv, main_py, g_span, d_span, seed, version):
        self.cfg, self.argv, self.main_py = cfg, list(argv), main_py
        self.g_span, self.d_span, self.seed, self.version = g_span, d_span, seed, version
        self.proc = None

    def __getstate__(self):  # the child process stays behind: a requeued job starts its own
        return {**vars(self), "proc": None}

    def __call__(self) -> str:
        """Run the cell; its result as the local sweep names it (sweep.cell_end)."""
        state = cell_state(self.cfg, self.version)
        if state == "done":
            return "ok"
        args = cell_argv(self.argv, self.g_span, self.d_span, self.seed, self.version, state == "started",
                         self.cfg.total_step)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if "OMP_NUM_THREADS" not in env and "SLURM_CPUS_PER_TASK" in env:  # the job's CPUs, not the node's
            env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
        print(f"sweep: {'continuing' if state == 'started' else 'starting'} {self.version}", flush=True)
        warning = _stop_signal()
        # Slurm signals every process of the job step: the cell ignores the warning, which is
        # this process's to act on (checkpoint), and stops on the SIGTERM it is sent then.
        self.proc = subprocess.Popen([sys.executable, self.main_py, *args], env=env,
                                     preexec_fn=lambda: signal.signal(warning, signal.SIG_IGN))
        return cell_end(self.cfg, self.version, self.proc.wait())

    def checkpoint(self):
        """submitit's hook, called in the signal handler: stop the cell (SIGTERM: it saves a
        checkpoint at the current step and exits) and wait for it; submitit then requeues
        this job, which resumes the cell."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            print(f"sweep: {self.version}: stopping at a checkpoint for the requeue", flush=True)
            proc.send_signal(signal.SIGTERM)
            try:  # leaves it to Popen to reap: the handler may have interrupted Popen.wait itself
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


def submit_sweep(cfg, argv, main_py) -> int:
    """Submit the cells of cfg.sweep that are neither finished nor in the queue, print
    their job ids and logs; with cfg.wait (or nothing left in the queue) wait for the jobs
    and end with sweep.report. Returns the exit code."""
    submitit = _submitit()
    missing = [tool for tool in ("sbatch", "squeue", "srun") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"--launcher slurm: no {'/'.join(missing)} on this machine's PATH; run the sweep where "
                        f"you submit Slurm jobs (a login node)")
    folder = Path(cfg.log_path).resolve() / f"{cfg.sweep_name}_slurm"
    record_path = folder / "sweep.json"
    with file_lock(folder / ".submit.lock"):  # two commands at once: the second sees the first's jobs
        record = _read_record(record_path)
        queue = _queue(cfg.sweep_name)
        done, waiting, todo = [], {}, []
        for cell in cfg.sweep:
            version = cell[-1]
            if record["jobs"].get(version) in queue:  # first: a job may still run after the last checkpoint
                waiting[version] = record["jobs"][version]
            elif cell_state(cfg, version) == "done":
                done.append(version)
            else:
                todo.append(cell)
        check_start(cfg, _queued_settings(cfg, record, waiting))
        print(f"sweep: {grid(cfg.sweep)} on Slurm, {len(done)} already finished, {len(waiting)} queued or "
              f"running, {len(todo)} to submit", flush=True)
        submitted = _submit(submitit, cfg, argv, main_py, folder, todo) if todo else {}
        if submitted:
            record["jobs"].update(submitted)
            record["submissions"].append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                          "folder": os.getcwd(), "command": shlex.join(["python", main_py, *argv]),
                                          "resources": _resources(cfg), "jobs": submitted})
            with atomic_open(record_path, "w") as f:
                json.dump(record, f, indent=1)
    jobs = {**waiting, **submitted}
    for version, job_id in jobs.items():
        print(f"  {version}: job {job_id}, {queue.get(job_id, 'submitted')}, log {_log(folder, job_id)}")
    if jobs:
        print(f"sweep: logs and the jobs' record in {folder}; watch with: squeue -u {getpass.getuser()} "
              f"-n {cfg.sweep_name}", flush=True)
        if not cfg.wait:
            print("sweep: the same command with --wait waits for them (submitting nothing new) and prints "
                  "the report", flush=True)
            return 0
    try:
        results = _wait(cfg, jobs, folder)
    except KeyboardInterrupt:
        print(f"sweep: stopped waiting; the jobs go on (scancel {' '.join(sorted(jobs.values()))} stops them "
              f"at a checkpoint). The same command with --wait waits again", flush=True)
        return 130
    failed = [f"{v}: {_log(folder, jobs[v])}" for v, r in results.items() if r.startswith("failed")]
    return report(cfg, [(v, "done before" if v in done else results[v]) for *_, v in cfg.sweep],
                  why="their logs: " + ", ".join(failed))


def _queued_settings(cfg, record, waiting) -> dict:
    """{version: (job id, its cell's settings)} of the queued cells, from the command that
    submitted each (sweep.json): a job queued under other settings would run them whatever
    this command says. Cells whose command no longer parses are left out."""
    from device import pick_device  # here: a job on its node imports this module without torch
    from parameter import parse_flags, resolve_device_defaults
    from run import with_config
    cells = {version: (g, d, seed) for g, d, seed, version in cfg.sweep}  # a cell's seed is in its name
    queued = {}
    for sub in record["submissions"]:
        for version, job_id in sub.get("jobs", {}).items():
            if waiting.get(version) != job_id:
                continue
            argv = shlex.split(sub["command"])[2:]  # python main.py ...
            try:
                then = with_config(parse_flags(argv), argv)
            except UserError:
                continue
            resolve_device_defaults(then, pick_device(then.device).type)
            queued[version] = (job_id, cell_settings(then, *cells[version]))
    return queued


def _read_record(path):
    if not path.is_file():
        return {"jobs": {}, "submissions": []}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); it records the sweep's jobs: move it away only when "
                        f"none of them is queued or running") from None


def _resources(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("slurm_partition", "slurm_time", "slurm_gpus", "slurm_cpus", "slurm_mem",
                                         "slurm_account", "slurm_qos", "slurm_sbatch", "slurm_setup")}


def _submit(submitit, cfg, argv, main_py, folder, cells) -> dict:
    """One job array for `cells` [(g_span, d_span, seed, version)]; {version: job id}."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    setup = [cfg.slurm_setup] if cfg.slurm_setup else []
    # the node unpickles CellJob: this repository on its path, whatever the job's folder
    setup.append(f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}")
    optional = {"partition": cfg.slurm_partition, "mem": cfg.slurm_mem, "account": cfg.slurm_account,
                "qos": cfg.slurm_qos, "gpus_per_node": cfg.slurm_gpus or None}
    executor.update_parameters(job_name=cfg.sweep_name, time=cfg.slurm_time, cpus_per_task=cfg.slurm_cpus,
                               signal_delay_s=SLURM_SIGNAL_DELAY_S, setup=setup, stderr_to_stdout=True,
                               additional_parameters={"requeue": True, **cfg.slurm_sbatch},
                               **{k: v for k, v in optional.items() if v is not None})
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), executor.batch():  # submitit prints sbatch's complaint
            jobs = [executor.submit(CellJob(cfg, argv, main_py, *cell)) for cell in cells]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        why = (str(e).strip() or errors.getvalue().strip() or type(e).__name__).splitlines()[-1]
        raise UserError(f"Slurm refused the sweep's jobs ({why}); check the --slurm_* flags") from None
    return {cell[-1]: job.job_id for cell, job in zip(cells, jobs)}


def _log(folder, job_id) -> Path:
    """Where a cell's job writes (submitit's file for the job's first task, appended to after a requeue)."""
    from submitit.core.utils import JobPaths
    return JobPaths(folder, job_id=job_id, task_id=0).stdout


def _queue(name) -> dict:
    """{job id: "state" or "state (why)"} of this user's jobs named `name` that Slurm still
    holds (pending, running, completing, requeued, ...), one per array task; why a job
    waits, as squeue says it (Resources, Priority, PartitionConfig, ...)."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--name", name,
                              "--format", "%i %T %r"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise UserError("squeue did not answer in 2 minutes; is the Slurm controller reachable?") from None
    if out.returncode:
        raise UserError(f"squeue failed: {(out.stderr.strip() or 'no message').splitlines()[-1]}")
    queue = {}
    for job_id, state, *why in (line.split(maxsplit=2) for line in out.stdout.splitlines() if line.strip()):
        why = why[0].strip() if why and why[0].strip() not in ("None", "") else ""
        queue[job_id] = state.lower() + (f" ({why})" if why and state == "PENDING" else "")
    return queue


def _wait(cfg, jobs, folder) -> dict:
    """Wait until every job of {version: job id} has left the queue, printing their state
    changes and results; {version: result}."""
    results, states, start = {}, {}, time.monotonic()
    while len(results) < len(jobs):
        queue = _queue(cfg.sweep_name)
        if any(j not in queue for v, j in jobs.items() if v not in results):
            time.sleep(2)  # gone twice in a row: ended, not between two states of a requeue
            queue = {**queue, **_queue(cfg.sweep_name)}
        for version, job_id in jobs.items():
            if version in results:
                continue
            if job_id not in queue:
                results[version] = _outcome(cfg, version, job_id, folder)
                print(f"sweep: {version} {results[version]}", flush=True)
            elif queue[job_id] != states.get(version):
                states[version] = queue[job_id]
                print(f"sweep: {version} {queue[job_id]} (job {job_id})", flush=True)
        if len(results) < len(jobs):  # polls a tenth as often as waited so far: ends <= ~10% late
            time.sleep(min(30.0, max(1.0, (time.monotonic() - start) / 10)))
    return results


def _outcome(cfg, version, job_id, folder) -> str:
    """What became of a cell whose job has ended: what the job returned (sweep.cell_result),
    or, where it returned nothing, what its run folder shows."""
    from submitit.core.utils import JobPaths
    path = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if path.is_file():
        with open(path, "rb") as f:
            kind, value = pickle.load(f)
        result = value if kind == "success" else "failed (an error in the job)"  # success: cell_end recorded it
        if kind != "success" and cell_state(cfg, version) != "done":
            record_failure(cfg, version, result)
    elif cell_state(cfg, version) == "done":
        result = "ok"
    else:  # the job could not record the cell's end
        result = "failed (the job ended without a result: cancelled, out of time or memory, or its node failed)"
        record_failure(cfg, version, result)
    return f"{result[:-1]}; log {_log(folder, job_id)})" if result.startswith("failed") else result
