"""tests/conftest.py's hooks as someone running the suite meets them."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("how", [[], ["-p", "no:xdist"]], ids=["default", "one-process"])
def test_a_required_slurm_that_is_missing_stops_the_run_in_one_line_naming_the_fix(tmp_path, how):
    # no sinfo on PATH. Raised where pytest-xdist's workers collect, this error used to reach
    # the user as an INTERNALERROR naming an unrelated test, the cause nowhere in the output
    env = {**os.environ, "SAGAN_REQUIRE_SLURM": "1", "PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *how, "tests/test_slurm.py"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == pytest.ExitCode.USAGE_ERROR and "INTERNALERROR" not in out, out[-3000:]
    assert out.splitlines()[-1] == ("ERROR: SAGAN_REQUIRE_SLURM=1, but no Slurm commands on PATH: "
                                    "start one with tools/slurm_local.sh start"), out[-3000:]
