"""The sweep on a Slurm cluster (`--launcher slurm`): its flags here; and, marked `slurm`, against
a real Slurm (tools/slurm_local.sh start: one node, this machine): a sweep that ends as the local
one does, a cell requeued on its time-limit signal that resumes exactly, a second command that
submits nothing while the jobs are queued, a failed cell with its log, and the README's command."""
import json
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from choices import slurm_time
from conftest import REPO, TINY, one_line, out_dirs, read_csv, run_main, small_data
from sweep import cell_argv

SWEEP = [a for a in TINY if a not in ("--seed", "3")]
# what the local node has: no GPU, 2 CPUs (one per job, so two cells run at once)
SLURM = ["--launcher", "slurm", "--slurm_gpus", "0", "--slurm_cpus", "1", "--slurm_time", "30"]
TIMING = {"seconds", "it_per_s", "images_per_s"}  # columns that differ between any two runs


@pytest.mark.parametrize("text, minutes", [
    ("240", 240), ("30:00", 30), ("4:00", 4), ("3:01", 4), ("4:00:00", 240), ("1-0", 1440),
    ("1-2:30", 1590), ("2-00:00:01", 2881)])
def test_slurm_times_read_as_sbatch_reads_them(text, minutes):
    # sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; rounded up to whole minutes
    assert slurm_time(text) == minutes


@pytest.mark.parametrize("args, message", [
    (["--slurm_time", "3"], "too short: a job is told to stop 3 minutes before"),
    (["--slurm_time", "1:2:3:4"], "is not a Slurm time"),
    (["--slurm_time", "0-0"], "too short"),
    (["--slurm_mem", "32GB"], "as sbatch --mem takes it"),
    (["--slurm_sbatch=--time=5"], "--time is set by --slurm_time"),
    (["--slurm_sbatch=--array=0-3"], "--array is set by the launcher"),
    (["--slurm_sbatch", "--constraint a100"], "'a100': write each option as --name=value"),
    (["--slurm_gpus", "-1"], "must be at least 0"),
    (["--jobs", "2"], "--jobs is for --launcher local"),
])
def test_slurm_flag_mistakes_are_one_line(tmp_path, args, message):
    r = run_main([*SWEEP, "--span", "0,3", *SLURM, *args], cwd=tmp_path)
    assert message in one_line(r)


@pytest.mark.parametrize("args, message", [
    (["--span", "0,3", "--slurm_gpus", "2"], "--slurm_gpus: for a sweep on Slurm; add --launcher slurm"),
    (["--span", "0,3", "--wait"], "--wait: for a sweep on Slurm"),
    (["--span", "3", "--launcher", "slurm"], "--launcher slurm runs the cells of a sweep"),
])
def test_launcher_flags_that_cannot_apply_are_one_line(tmp_path, args, message):
    assert message in one_line(run_main([*SWEEP, *args], cwd=tmp_path))


def test_a_cell_runs_without_the_launcher_flags():
    argv = ["--span", "0,3", "--launcher", "slurm", "--slurm_time", "1-0", "--wait", "--slurm_sbatch=--hold",
            "--d_lr", "1e-4", "--slurm_setup", "module load cuda", "--slurm_gpus=0", "--seed", "1,2"]
    assert cell_argv(argv, 3, 3, 2, "v", resume=False, total_step=9) == ["--d_lr", "1e-4", "--span", "3", "--version", "v",
                                                       "--seed", "2"]


def test_without_submitit_or_sbatch_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    args = [*SWEEP, *out_dirs(tmp_path), "--span", "0,3", *SLURM]
    assert "--launcher slurm needs submitit: pip install submitit" in one_line(run_main(args))
    monkeypatch.undo()
    pytest.importorskip("submitit")  # a test dependency (requirements-dev.txt)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    assert "no sbatch/squeue/srun on this machine's PATH" in one_line(run_main(args))


def test_a_slurm_job_unpickles_its_cell_without_importing_torch(tmp_path):
    # the job's wrapper process only decides --resume and starts main.py, which imports torch itself
    from run import configure
    from slurm import CellJob
    cfg = configure([*SWEEP, *out_dirs(tmp_path), "--span", "0,3", *SLURM])
    job = tmp_path / "job.pkl"
    job.write_bytes(pickle.dumps(CellJob(cfg, [], str(REPO / "main.py"), *cfg.sweep[0])))
    code = (f"import pickle, sys; sys.path.insert(0, {str(REPO)!r})\n"
            f"cell = pickle.loads(open({str(job)!r}, 'rb').read())\n"
            f"from sweep import cell_state; cell_state(cell.cfg, cell.version)\n"
            f"print(sorted(m for m in ('torch', 'matplotlib', 'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---------------------------------------------------------------------------- a real Slurm
def _record(tmp):
    return json.loads((Path(tmp) / "logs" / "sagan_emoji_sweep_slurm" / "sweep.json").read_text())


def _slurm(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=True).stdout


def _wait_for(condition, seconds, what):
    import time
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _rows(path, drop=()):
    return [{k: v for k, v in r.items() if k not in drop} for r in read_csv(path)]


@pytest.fixture
def one_thread(monkeypatch):
    """The jobs get this process's environment (sbatch exports it): one thread per cell."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slurm
def test_a_submission_the_cluster_refuses_is_one_line_with_sbatch_s_reason(tmp_path):
    args = [*SWEEP, *out_dirs(tmp_path), "--span", "0,3", *SLURM, "--slurm_partition", "no_such_partition"]
    error = one_line(run_main(args, cwd=tmp_path))
    assert "Slurm refused the sweep's jobs (sbatch: error: " in error and "partition" in error.lower()
    assert not (tmp_path / "logs/sagan_emoji_sweep_slurm/sweep.json").exists()  # nothing was submitted


@pytest.mark.slow
@pytest.mark.slurm
def test_a_sweep_on_slurm_ends_with_the_metrics_and_report_of_the_local_sweep(tmp_path, fid_weights, one_thread):
    args = [*SWEEP, *small_data(), "--span", "0,2", "--seed", "0", "--total_step", "4", "--log_step", "2",
            "--sample_step", "4", "--model_save_step", "4", "--fid_step", "4", "--fid_samples", "4",
            "--fid_batch_size", "8", "--fid_ref_samples", "4", "--fid_weights", fid_weights]
    local = run_main([*args, *out_dirs(tmp_path / "local"), "--jobs", "2"], cwd=tmp_path)
    on_slurm = run_main([*args, *out_dirs(tmp_path / "slurm"), *SLURM, "--wait"], cwd=tmp_path)
    assert local.returncode == 0, local.stdout + local.stderr
    assert on_slurm.returncode == 0, on_slurm.stdout + on_slurm.stderr
    cells = [f"sagan_emoji_span{span}_32px_seed0" for span in (0, 2)]
    jobs = _record(tmp_path / "slurm")["jobs"]
    assert sorted(jobs) == sorted(cells) and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array
    for cell in cells:
        assert f"{cell}: job {jobs[cell]}, submitted, log " in on_slurm.stdout
        for name, drop in (("metrics.csv", TIMING), ("fid.csv", {"seconds"}), ("attention.csv", ())):
            ours, theirs = (_rows(tmp_path / where / "logs" / cell / name, drop) for where in ("slurm", "local"))
            assert ours == theirs and ours, (cell, name)

    def the_report(out):  # from the summary to the plot: the table and its statistics
        return out[out.index("sweep: 2/2 cells finished"):out.index("plot: ")]
    assert "best fid" in the_report(on_slurm.stdout)
    assert the_report(on_slurm.stdout) == the_report(local.stdout)
    assert (tmp_path / "slurm/logs/sagan_emoji_sweep_fid_compare.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.slurm
def test_a_cell_warned_of_its_time_limit_is_requeued_and_resumes_exactly(tmp_path, one_thread):
    args = [*SWEEP, *small_data(), "--span", "2", "--total_step", "60", "--log_step", "1", "--sample_step", "1000",
            "--model_save_step", "1000"]
    cell = "sagan_emoji_span2_32px_seed5"
    command = [*args, *out_dirs(tmp_path / "slurm"), "--seed", "5,6", *SLURM]
    first = run_main(command, cwd=tmp_path)
    assert first.returncode == 0 and "2 to submit" in first.stdout, first.stdout + first.stderr
    job = _record(tmp_path / "slurm")["jobs"][cell]
    metrics = tmp_path / "slurm" / "logs" / cell / "metrics.csv"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 3, 300, "the cell to train")
    _slurm("scancel", "--signal=USR2", job)  # what Slurm sends SLURM_SIGNAL_DELAY_S before the time limit
    # the same command, waiting: nothing new submitted, the requeued job ends the cell
    waited = run_main([*command, "--wait"], cwd=tmp_path)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "0 to submit" in waited.stdout and "2/2 cells finished" in waited.stdout
    log = (tmp_path / "slurm/logs/sagan_emoji_sweep_slurm" / f"{job}_0_log.out").read_text()
    # Slurm's own count of the job's requeues (submitit's "Requeued job" line is not a witness:
    # under load Slurm's stop of the job can end submitit's scontrol call before it logs)
    assert re.search(r"\bRestarts=1\b", _slurm("scontrol", "show", "job", job)), _slurm("scontrol", "show", "job", job)
    assert "continuing " + cell in log, log
    saved = sorted(int(p.stem) for p in (tmp_path / "slurm/models" / cell).glob("*.pt"))
    assert len(saved) == 2 and 3 <= saved[0] < 60 and saved[1] == 60, saved  # stopped mid-run, then finished
    # the same cell uninterrupted, as one ordinary run
    ref = run_main([*args, *out_dirs(tmp_path / "ref"), "--seed", "5", "--version", cell], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    done, uninterrupted = (torch.load(tmp_path / where / "models" / cell / "60.pt", weights_only=False)
                           for where in ("slurm", "ref"))
    for net in ("G", "D"):
        assert all(torch.equal(done[net][k], uninterrupted[net][k]) for k in uninterrupted[net])
    assert _rows(metrics, TIMING) == _rows(tmp_path / "ref/logs" / cell / "metrics.csv", TIMING)


@pytest.mark.slow
@pytest.mark.slurm
def test_the_same_command_submits_nothing_while_its_jobs_are_queued_nor_after_they_end(tmp_path, one_thread):
    # --hold keeps the jobs queued until released: a rerun meets them there for certain
    command = [*SWEEP, *small_data(), *out_dirs(tmp_path), "--span", "0,2", "--seed", "4", "--total_step", "2",
               "--log_step", "1", "--model_save_step", "2", "--sample_step", "2", *SLURM, "--slurm_sbatch=--hold"]
    first = run_main(command, cwd=tmp_path)
    assert first.returncode == 0 and "2 to submit" in first.stdout, first.stdout + first.stderr
    jobs = _record(tmp_path)["jobs"]
    array = next(iter(jobs.values())).split("_")[0]
    queued = lambda: sorted(_slurm("squeue", "--noheader", "--array", "--jobs", array, "--format", "%i").split())
    assert queued() == sorted(jobs.values())
    shown = _slurm("scontrol", "show", "job", jobs["sagan_emoji_span0_32px_seed4"])  # the resources asked for
    assert "TimeLimit=00:30:00" in shown and "Requeue=1" in shown and re.search(r"\bNumCPUs=1\b", shown)
    assert _record(tmp_path)["submissions"][0]["resources"]["slurm_time"] == 30

    again = run_main(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 already finished, 2 queued or running, 0 to submit" in again.stdout
    assert f"sagan_emoji_span2_32px_seed4: job {jobs['sagan_emoji_span2_32px_seed4']}, pending (JobHeldUser), log " \
        in again.stdout
    assert queued() == sorted(jobs.values()) and len(_record(tmp_path)["submissions"]) == 1
    # the same sweep with another setting while its jobs wait: they would run the old one
    other = run_main([*command, "--g_lr", "3e-4"], cwd=tmp_path)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stdout + other.stderr
    assert (f"its cell sagan_emoji_span0_32px_seed4 is queued (job {jobs['sagan_emoji_span0_32px_seed4']}) with "
            f"--g_lr 0.0001, where this command gives --g_lr 0.0003") in other.stderr
    assert queued() == sorted(jobs.values()) and len(_record(tmp_path)["submissions"]) == 1
    _slurm("scontrol", "release", array)
    waited = run_main([*command, "--wait"], cwd=tmp_path)
    assert waited.returncode == 0 and "0 to submit" in waited.stdout and "2/2 cells finished" in waited.stdout

    after = run_main(command, cwd=tmp_path)  # everything done: the report, nothing submitted
    assert after.returncode == 0 and "2 already finished, 0 queued or running, 0 to submit" in after.stdout
    assert "sweep: 2/2 cells finished" in after.stdout and "compare again with" in after.stdout
    assert len(_record(tmp_path)["submissions"]) == 1 and queued() == []


@pytest.mark.slow
@pytest.mark.slurm
def test_a_cell_that_fails_is_reported_with_its_log_and_the_others_finish(tmp_path, one_thread):
    bad, good = "sagan_emoji_span2_32px_seed0", "sagan_emoji_span0_32px_seed0"
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / bad).write_text("a file where the cell's sample folder goes")
    r = run_main([*SWEEP, *small_data(), *out_dirs(tmp_path), "--span", "0,2", "--seed", "0", "--total_step", "2",
                  "--log_step", "1", "--model_save_step", "2", "--sample_step", "2", *SLURM, "--wait"], cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    log = tmp_path / "logs/sagan_emoji_sweep_slurm" / f"{_record(tmp_path)['jobs'][bad]}_0_log.out"
    assert f"sweep: {bad} failed (exit 2; log {log})" in r.stdout
    assert f"sweep: 1/2 cells finished; failed: 1 ({bad}), their logs: {bad}: {log}" in r.stdout
    assert "--sample_path" in log.read_text()  # the cell's own one-line error
    assert (tmp_path / "models" / good / "2.pt").is_file()


def _readme_slurm_command():
    """The command of the README's "On a Slurm cluster" section, as words."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## On a Slurm cluster"):]
    block = section[section.index("```bash\n") + 8:section.index("```", section.index("```bash\n") + 8)]
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.slow
@pytest.mark.slurm
def test_the_readme_slurm_command_runs_on_the_local_slurm_shrunk_to_tiny_sizes(tmp_path, one_thread):
    words = _readme_slurm_command()
    assert words[:2] == ["python", "main.py"] and "--launcher" in words
    partition = next(p[:-1] for p in _slurm("sinfo", "--noheader", "--format", "%P").split() if p.endswith("*"))
    # Later flags win: sizes shrunk (2 cells, tiny networks and steps, the small emoji set for CelebA)
    # and what this node lacks (a GPU, 32G, a partition named gpu); every other word as written.
    shrunk = [*SWEEP, *small_data(), *out_dirs(tmp_path), "--dataset", "emoji", "--span", "0,2", "--seed", "0",
              "--total_step", "2", "--log_step", "1", "--model_save_step", "2", "--sample_step", "2",
              "--slurm_partition", partition, "--slurm_gpus", "0", "--slurm_cpus", "1", "--slurm_mem", "1G", "--wait"]
    r = subprocess.run([sys.executable, str(REPO / "main.py"), *words[2:], *map(str, shrunk)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 to submit" in r.stdout and "sweep: 2/2 cells finished" in r.stdout
    submitted = _record(tmp_path)["submissions"][0]
    assert submitted["resources"]["slurm_time"] == 480 and submitted["command"].endswith(" --wait")
    for cell in ("sagan_emoji_span0_32px_seed0", "sagan_emoji_span2_32px_seed0"):
        assert (tmp_path / "models" / cell / "2.pt").is_file()
