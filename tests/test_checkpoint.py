"""Opening a .pt never runs code (issue 20, item 2): every entry point that reads a
checkpoint loads it with weights_only=True; a file that is not a checkpoint is one line;
checkpoints of versions before 0.2 load only behind --trust_checkpoint."""
import random
import re

import numpy as np
import pytest
import torch

import checkpoint
import fid
import main
from conftest import TINY, one_line_exit_2, out_dirs
from checkpoint import rng_state, set_rng_state
from utils import UserError


def train(tmp_path, *extra):
    return [*TINY, *out_dirs(tmp_path), "--log_step", "1", "--sample_step", "100", "--model_save_step", "2", *extra]


class Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the load runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_checkpoint(path, marker):
    """A .pt with every entry a checkpoint has, one of them code."""
    ck = {"G": Payload(marker), "D": {}, "config": {"imsize": 32}, "step": 2, "g_opt": {}, "d_opt": {}, "rng": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)


def test_the_hostile_file_does_run_code_when_unpickled(tmp_path):
    """The payload is real: a plain (unsafe) load creates the marker."""
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("extra", [["--resume"], ["--pretrained_model", "2"], ["--train", "false"]],
                         ids=["resume", "pretrained_model", "train_false"])
def test_main_never_unpickles_code(tmp_path, capsys, extra):
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "models" / "v" / "2.pt", marker)
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "v", "--total_step", "4", *extra))
    assert not marker.exists()
    assert "pickled Python objects" in err and "--trust_checkpoint" in err
    assert "weights_only" not in err  # torch's own advice is not passed on


def test_fid_never_unpickles_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "evil.pt", marker)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    err = one_line_exit_2(capsys, fid.main, [tmp_path / "evil.pt", tmp_path / "ref.npz"])
    assert not marker.exists()
    assert "pickled Python objects" in err and "weights_only" not in err


@pytest.mark.parametrize("content", [b"random bytes, not a checkpoint", "dict", "list", "config_not_dict"])
def test_files_that_are_not_checkpoints_are_one_line(tmp_path, capsys, content):
    path = tmp_path / "models" / "x" / "2.pt"
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"dict": {"weights": torch.zeros(2)}, "list": [1, 2],
                    "config_not_dict": {"G": {}, "D": {}, "config": 3, "step": 2}}[content], path)
    for extra in (["--resume"], ["--train", "false"], ["--pretrained_model", "2"]):
        err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "x", "--total_step", "4", *extra))
        assert str(path) in err and ("cannot read checkpoint" in err or "not a training checkpoint" in err), err
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    err = one_line_exit_2(capsys, fid.main, [path, tmp_path / "ref.npz"])
    assert str(path) in err


@pytest.mark.slow
def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "w", "--total_step", "2"))
    path = tmp_path / "models" / "w" / "2.pt"
    ck = torch.load(path, weights_only=True)
    ck["config"]["g_conv_dim"] = 32  # the stored G has 16 channels per unit
    torch.save(ck, path)
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "w", "--total_step", "4", "--resume"))
    assert "does not fit" in err
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    err = one_line_exit_2(capsys, fid.main, [path, tmp_path / "ref.npz"])
    assert "does not fit" in err


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.slow
def test_a_checkpoint_from_before_0_2_loads_only_when_trusted_and_resumes_exactly(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "new", "--total_step", "2"))
    ck = torch.load(tmp_path / "models/new/2.pt", weights_only=True)
    n = ck["rng"]["numpy"]  # the format of 0.1: numpy's state tuple, pickled with its ndarray
    ck["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    (tmp_path / "models/old").mkdir(parents=True)
    torch.save(ck, tmp_path / "models/old/2.pt")
    capsys.readouterr()
    err = one_line_exit_2(capsys, main.main, train(tmp_path, "--version", "old", "--total_step", "4", "--resume"))
    assert "--trust_checkpoint" in err and "before version 0.2" in err
    assert main.main(train(tmp_path, "--version", "old", "--total_step", "4", "--resume", "--trust_checkpoint")) in (0, None)
    assert main.main(train(tmp_path, "--version", "new", "--total_step", "4", "--resume")) in (0, None)
    old = torch.load(tmp_path / "models/old/4.pt", weights_only=True)  # saved in the current format
    new = torch.load(tmp_path / "models/new/4.pt", weights_only=True)
    for net in ("G", "D"):
        for k, v in new[net].items():
            assert torch.equal(old[net][k], v), (net, k)


@pytest.mark.slow
def test_fid_reads_a_pre_0_2_checkpoint_only_when_trusted(tmp_path, capsys):
    main.main(train(tmp_path, "--version", "n", "--total_step", "2"))
    path = tmp_path / "models/n/2.pt"
    ck = torch.load(path, weights_only=True)
    n = ck["rng"]["numpy"]
    ck["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    torch.save(ck, path)
    capsys.readouterr()
    import metrics
    metrics.save_stats(tmp_path / "ref.npz", np.zeros(3), np.eye(3))  # what it is measured against: there
    err = one_line_exit_2(capsys, fid.main, [path, tmp_path / "ref.npz"])
    assert "--trust_checkpoint" in err
    G, cfg = checkpoint.generator_from_checkpoint(path, trust=True)  # what fid.py --trust_checkpoint builds
    assert cfg.imsize == 32
    assert all(torch.equal(v, ck["G"][k]) for k, v in G.state_dict().items())
    with pytest.raises(UserError, match=re.escape(f"{path} has no EMA generator (trained without --ema_decay); drop "
                                                  f"--ema (in the API: ema=False)")):
        checkpoint.generator_from_checkpoint(path, ema=True, trust=True)  # fid.py --ema, api.generate(ema=True)


@pytest.mark.slow
def test_a_checkpoint_written_before_the_redesign_resumes_bit_exactly(tmp_path):
    """tests/data/ckpt_0.2.pt is step 2 of a run written by the code of commit cb8fc5b
    (before the modules were split), with these flags; resumed there to step 4 its G, D
    and EMA G hash to the digest below and metrics.csv logs the losses below."""
    import hashlib
    import shutil
    from conftest import REPO
    flags = ["--imsize", "32", "--batch_size", "8", "--num_workers", "0", "--g_conv_dim", "8", "--d_conv_dim", "8",
             "--z_dim", "8", "--device", "cpu", "--seed", "5", "--span", "2", "--ema_decay", "0.9", "--log_step", "1",
             "--sample_step", "100", "--model_save_step", "2", "--version", "old", *out_dirs(tmp_path)]
    (tmp_path / "models/old").mkdir(parents=True)
    shutil.copy(REPO / "tests/data/ckpt_0.2.pt", tmp_path / "models/old/2.pt")
    assert main.main([*flags, "--total_step", "4", "--resume"]) in (0, None)
    ck = torch.load(tmp_path / "models/old/4.pt", weights_only=True)
    h = hashlib.sha256()
    for net in ("G", "D", "G_ema"):
        for k, v in sorted(ck[net].items()):
            h.update(k.encode())
            h.update(v.contiguous().numpy().tobytes())
    assert h.hexdigest() == "c487bdc247f2917a0b28fe9de818b98b1f1db3bf1d45da2024e41a2ef8729554"
    import csv
    rows = list(csv.DictReader(open(tmp_path / "logs/old/metrics.csv")))
    assert [(r["step"], r["d_loss"], r["g_loss"]) for r in rows] == [("3", "1.89838", "-0.0214987"),
                                                                     ("4", "1.91674", "-0.0493473")]


def test_configs_of_older_versions_read_in_today_s_terms():
    from checkpoint import migrate_config
    old = migrate_config({"imsize": 64, "metrics": ["kid", "fid"]})  # before 15ff3b8: the order given
    assert old["metrics"] == ["fid", "kid"] and (old["fully_masked"], old["diffaug"]) == ("skip", "")
    assert migrate_config({"diffaug": "color", "metrics": ["fid"]})["diffaug"] == "color"  # what it says stays
    assert migrate_config({"metrics": "is, fid"})["metrics"] == ["fid", "is"]  # before af542ff: the flag's text
