"""metrics.csv and the stop signals: rows of an uninterrupted run after a stop between log
steps, r_t per interval, a rewrite that never loses rows, broken lines dropped, another
network's log refused, a signal during FID; status.json, how a run ended."""
import contextlib
import csv
import errno
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest

import trainer
from conftest import one_line, out_dirs, read_csv, run_main, small_data, step_args, TINY, train_args


@pytest.mark.slow
def test_a_stop_between_log_steps_leaves_the_metrics_of_an_uninterrupted_run(tmp_path, monkeypatch):
    import trainer
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = train_args(tmp_path, "--total_step", "12", "--log_step", "4", "--sample_step", "100", "--model_save_step",
                      "100", "--version", "v")
    assert run_main([*args, *out_dirs(a)], cwd=a).returncode == 0
    step = trainer.Trainer.train_step

    def signalled_at_6(self, batches):
        if self.step == 5:  # the step that makes it 6: between the rows of steps 4 and 8
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", signalled_at_6)
    stopped = run_main([*args, *out_dirs(b)], cwd=b)
    assert stopped.returncode == 0 and "stopped by signal at step 6" in stopped.stdout
    assert json.loads((b / "logs/v/status.json").read_text())["status"] == "stopped"
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    assert run_main([*args, *out_dirs(b), "--resume"], cwd=b).returncode == 0
    keys = ["step", "d_loss", "g_loss", "d_real", "d_fake", "rt", "g_attn8_gamma", "d_attn4_gamma"]
    ra, rb = ([[r[k] for k in keys] for r in read_csv(d / "logs/v/metrics.csv")] for d in (a, b))
    assert [r[0] for r in ra] == ["4", "8", "12"] and ra == rb


# ---------------------------------------------------------------------------- metrics.csv
@pytest.mark.slow
def test_a_write_error_while_resuming_keeps_every_row(tmp_path, monkeypatch):
    assert run_main(step_args(tmp_path, "--version", "m", "--total_step", "6"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/m/metrics.csv"
    before = metrics.read_bytes()
    for step in (4, 6):
        (tmp_path / f"models/m/{step}.pt").unlink()  # resume from step 2: rows 3-6 are to go

    def disk_full(self, rowdicts):
        raise OSError(errno.ENOSPC, "No space left on device", str(metrics))

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    err = one_line(run_main(step_args(tmp_path, "--version", "m", "--total_step", "6", "--resume"), cwd=tmp_path))
    assert "No space left on device" in err and str(metrics) in err
    assert metrics.read_bytes() == before  # today's truncate-then-write lost every row here


@pytest.mark.slow
def test_broken_last_lines_are_dropped_with_a_warning(tmp_path):
    assert run_main(step_args(tmp_path, "--version", "b", "--total_step", "4"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/b/metrics.csv"
    good = read_csv(metrics)
    with open(metrics, "ab") as f:  # a kill mid-line, then a crash's NUL-filled tail
        f.write(b"5,0.1,2\n" + b"\x00" * 64)
    r = run_main(step_args(tmp_path, "--version", "b", "--total_step", "6", "--resume"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dropped 2 broken line(s)" in r.stderr
    after = read_csv(metrics)
    assert [int(x["step"]) for x in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == good and "\x00" not in metrics.read_text()


@pytest.mark.slow
def test_a_metrics_csv_of_another_network_is_refused_before_anything_is_touched(tmp_path):
    assert run_main(step_args(tmp_path, "--version", "c", "--total_step", "2"), cwd=tmp_path).returncode == 0
    metrics = tmp_path / "logs/c/metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0] + ",d_attn2_gamma"] + [x + ",0.5" for x in lines[1:]]) + "\n")
    before = {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()}
    err = one_line(run_main(step_args(tmp_path, "--version", "c", "--total_step", "4", "--resume"), cwd=tmp_path))
    assert "columns of another network" in err
    assert {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()} == before
    # a damaged file (here: binary garbage where the header was) is no other network's log
    metrics.write_bytes(b"\x8f\x02garbage;;\n" + "\n".join(lines[1:]).encode() + b"\n")
    before = {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()}
    err = one_line(run_main(step_args(tmp_path, "--version", "c", "--total_step", "4", "--resume"), cwd=tmp_path))
    assert "is not a metrics.csv main.py wrote" in err and "another network" not in err
    assert {p: p.read_bytes() for p in (tmp_path / "logs/c").iterdir()} == before


def test_a_slow_interval_prints_seconds_per_step_not_zero_it_s():
    from runlog import rate_text
    # the first interval of --compile default on a CPU: 1 step in 48 s was "0.0 it/s"
    assert rate_text(1 / 48) == "48.0 s/it" and rate_text(0.4) == "2.5 s/it"
    assert rate_text(18.44) == "18.4 it/s" and rate_text(1.0) == "1.0 it/s"


def test_a_signal_during_fid_says_the_fid_is_finished_first(capsys):
    with trainer.StopSignals() as stop:
        with stop.busy("the FID of step 10"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert stop.received
    assert "finishing the FID of step 10 first, then saving a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_rt_is_logged_per_interval(tmp_path, monkeypatch):
    """metrics.csv's rt is the mean over the interval's steps of the mean sign of D's logits
    on the real images, recomputed here from the logits D gave in each D step."""
    import csv
    import gan_step
    signs = []
    real_forward = gan_step.GANStep.d_step

    def recording(self, real):
        logits = []
        hook = self.D.register_forward_hook(lambda m, inp, out: logits.append(out.detach()[:len(real)]))
        try:
            return real_forward(self, real)
        finally:
            hook.remove()
            signs.append(logits[0].sign().mean().item())

    monkeypatch.setattr(gan_step.GANStep, "d_step", recording)
    r = run_main([*TINY, *out_dirs(tmp_path), *small_data(), "--total_step", "6", "--log_step", "3", "--version", "v",
                  "--sample_step", "100"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "logs/v/metrics.csv")))
    assert [r["step"] for r in rows] == ["3", "6"] and len(signs) == 6
    for row, interval in zip(rows, (signs[:3], signs[3:])):
        assert float(row["rt"]) == pytest.approx(sum(interval) / 3, abs=1e-5)


def test_status_json_records_how_the_run_ended(tmp_path):
    from files import read_status
    from runlog import Diverged, RunStatus
    t = SimpleNamespace(dirs={"log": tmp_path}, is_main=True, step=4, cfg=SimpleNamespace(total_step=10))
    ends = []
    for error, step in ((None, 10), (None, 6), (Diverged("a loss became NaN/inf by step 7; ..."), 7),
                        (OSError(28, "No space left on device"), 8)):
        with pytest.raises(type(error)) if error else contextlib.nullcontext():
            with RunStatus(t):
                assert read_status(tmp_path)["status"] == "running"  # what a kill -9 leaves
                t.step = step
                if error:
                    raise error
        ends.append(read_status(tmp_path))
    assert [(e["status"], e["step"], e["total_step"]) for e in ends] == [
        ("finished", 10, 10), ("stopped", 6, 10), ("diverged", 7, 10), ("failed", 8, 10)]
    assert ends[2]["reason"] == "a loss became NaN/inf by step 7; ..." and "No space left" in ends[3]["reason"]
    t.is_main = False  # other ranks write nothing
    (tmp_path / "status.json").unlink()
    with RunStatus(t):
        pass
    assert not (tmp_path / "status.json").exists() and read_status(tmp_path) == {}
    (tmp_path / "status.json").write_text("{not json")
    assert read_status(tmp_path) == {}


def test_attention_log_continues_an_older_file_and_compare_reads_both(tmp_path):
    # attention.csv files from before the share and fixed columns: a resumed run keeps their
    # rows (the new columns empty) and the report reads old and new rows alike
    import fid
    from runlog import AttentionLog
    from sagan_models import LayerAttention
    from test_compare import make_run
    d = make_run(tmp_path, "r", {10: 50.0, 20: 40.0})
    (d / "attention.csv").write_text("step,network,layer,map,distance,uniform\n10,G,attn8,8x8,2.5,3\n"
                                     "20,G,attn8,8x8,9,9\n")
    log = AttentionLog(d / "attention.csv", 10)  # resumed at step 10: the step-20 row goes
    log.write(20, {"G": [LayerAttention("attn8", "8x8", 2.75, 3.0, 0.125, 0.0)],
                   "D": [LayerAttention("attn4", "4x4", float("nan"), float("nan"), 0.0, 1.0)]})
    rows = read_csv(d / "attention.csv")
    assert [(r["step"], r["layer"], r["distance"], r["share"], r["fixed"]) for r in rows] == [
        ("10", "attn8", "2.5", "", ""), ("20", "attn8", "2.75", "0.125", "0"), ("20", "attn4", "nan", "0", "1")]
    r = run_main(["compare", d, "--out", tmp_path / "c.png"], entry=fid.main)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c_attention.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- TensorBoard
def _board(folder):
    """The run's events as TensorBoard itself reads them back (every event kept)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def _written(text):
    """The number a CSV cell holds, up to the rounding of its written digits (and float32)."""
    digits = text.split("e")[0].split(".")
    return pytest.approx(float(text), rel=1e-5, abs=0.5 * 10.0 ** -len(digits[1]) if len(digits) > 1 else 0)


def _png(data):
    import io
    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_tensorboard_holds_losses_metrics_attention_pictures_and_config(tmp_path, fid_weights):
    import json
    import metrics
    fid = ["--fid_step", "4", "--fid_samples", "10", "--fid_batch_size", "10", "--fid_ref_samples", "10",
           "--fid_weights", fid_weights, "--metrics", ",".join(metrics.METRICS)]  # every metric of the registry
    r = run_main(train_args(tmp_path, "--version", "tb", "--total_step", "4", "--log_step", "2", "--sample_step", "2",
                            "--ema_decay", "0.9", "--use_tensorboard", *fid), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    logs = tmp_path / "logs/tb"
    acc = _board(logs)
    scalars = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]
    # metrics.csv: every column after step and seconds, at every row's step
    rows = read_csv(logs / "metrics.csv")
    for column in list(rows[0])[2:]:
        assert scalars(column) == [(int(x["step"]), _written(x[column])) for x in rows], column
    # fid.csv: every column of every metric of the registry, of G and of its EMA
    (fid_row,) = read_csv(logs / "fid.csv")
    columns = [c + s for m in metrics.METRICS for c in metrics.METRICS[m].columns for s in ("", "_ema")]
    assert len(columns) == 18  # fid 1, is 2, kid 2, prdc 4 columns; each of G and of its EMA
    for c in columns:
        assert scalars(f"metrics/{c}") == [(4, _written(fid_row[c]))], c
    # attention.csv: the distance (and its uniform reference) of every layer of G and D, at each sample step
    attention = read_csv(logs / "attention.csv")
    assert {x["network"] for x in attention} == {"G", "D"}
    for x in attention:
        for kind in ("distance", "uniform"):
            (value,) = [v for s, v in scalars(f"attention_{kind}/{x['network']}_{x['layer']}") if s == int(x["step"])]
            assert value == _written(x[kind])
    # the pictures, at each sample step: the very pixels of the PNGs on disk
    for tag, path in (("samples/fixed_z", "samples/tb/{}_fake.png"), ("samples/fixed_z_ema", "samples/tb/{}_fake_ema.png"),
                      ("samples/attention", "attn/tb/{}_attn.png")):
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4], tag
        for e in events:
            on_disk = _png(tmp_path / path.format(e.step))
            assert (e.height, e.width) == on_disk.shape[:2] and (_png(e.encoded_image_string) == on_disk).all(), tag
    # the config, as config.json holds it
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in shown.splitlines())) == json.loads((logs / "config.json").read_text())


@pytest.mark.slow
def test_a_resumed_run_hides_what_tensorboard_got_after_the_checkpoint(tmp_path):
    args = step_args(tmp_path, "--version", "tbr", "--total_step", "4", "--use_tensorboard")
    assert run_main(args, cwd=tmp_path).returncode == 0
    (tmp_path / "models/tbr/4.pt").unlink()  # resumes from step 2: steps 3 and 4 are trained again
    assert run_main([*args, "--resume"], cwd=tmp_path).returncode == 0
    rows = read_csv(tmp_path / "logs/tbr/metrics.csv")
    logged = [(e.step, e.value) for e in _board(tmp_path / "logs/tbr").Scalars("d_loss")]
    assert logged == [(int(x["step"]), _written(x["d_loss"])) for x in rows]
    assert [s for s, _ in logged] == [1, 2, 3, 4]


def test_without_tensorboard_installed_one_warning_and_nothing_written(tmp_path, monkeypatch, capsys):
    import sys
    import numpy as np
    import runlog
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with runlog.TensorBoard(tmp_path, 0) as board:
        board.scalars(1, {"d_loss": 0.5})
        board.image("samples/fixed_z", np.zeros((4, 4, 3), np.uint8), 1)
        board.text("config", "{}", 0)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "pip install tensorboard" in err
    assert list(tmp_path.iterdir()) == []
