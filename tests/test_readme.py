"""The README's shell commands run as written: bash reads every fenced ```bash block (so brace
expansion, quoting, `<…>` redirections and stray `...` behave as a user's shell makes them),
with `python`, `torchrun` and the repo's scripts replaced by functions that record their
arguments; each python main.py / torchrun main.py / fid.py / fid.py compare / bench.py command
must then parse with that entry point's own parser. No training, no torch needed."""
import re
import subprocess

import pytest

import parameter
import utils
from conftest import REPO

# What `python` and friends do inside the README's blocks: record their argv, NUL-separated,
# one command per line of the record file; anything else the blocks call is a no-op.
RECORDER = r"""
set -eu -o pipefail
record() { printf '%s\0' "$@" >> "$RECORD"; printf '\n' >> "$RECORD"; }
python() { record python "$@"; }
torchrun() { record torchrun "$@"; }
pip() { :; }
tools/slurm_local.sh() { :; }
cd() { :; }
"""


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def recorded_commands(block, tmp_path):
    record = tmp_path / "record"
    record.write_bytes(b"")
    r = subprocess.run(["bash", "-c", RECORDER + block], cwd=tmp_path, capture_output=True, text=True,
                       env={"RECORD": str(record), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, f"bash cannot run this README block as written:\n{block}\n{r.stderr}"
    return [[a.decode() for a in cmd.split(b"\0")] for cmd in record.read_bytes().split(b"\0\n") if cmd]


class Parsed(BaseException):
    """Raised by the entry points' parser once the flags parsed: stop before any work."""


def parses(argv, monkeypatch):
    """The entry point's own parser accepts argv (UserError otherwise)."""
    prog, *args = argv
    if prog == "torchrun":  # torchrun's own flags, then the script
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        prog, args = "python", args[script:]
    if args[:1] == ["-m"]:  # python -m pytest, -m torch.distributed.run: not ours
        return "skipped"
    script, *flags = args
    if script == "main.py":
        parameter.parse_flags(flags)
        return script
    original = utils.OneLineParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        original(self, a, namespace)
        raise Parsed
    monkeypatch.setattr(utils.OneLineParser, "parse_args", parse_then_stop)
    import bench
    import fid
    entry = {"fid.py": fid.main, "bench.py": bench.main}[script]
    with pytest.raises(Parsed):
        entry(flags)
    return script + (" compare" if flags[:1] == ["compare"] else "")


def test_every_readme_shell_command_runs_as_written(tmp_path, monkeypatch):
    blocks = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    seen = []
    for block in blocks:
        for argv in recorded_commands(block, tmp_path):
            try:
                seen.append(parses(argv, monkeypatch))
            except utils.UserError as e:
                pytest.fail(f"README command {' '.join(argv)!r} does not parse: {e}")
            except SystemExit:
                pytest.fail(f"README command {' '.join(argv)!r} does not parse (see stderr)")
            finally:
                monkeypatch.undo()
    # the README shows every entry point; a block that bash read into no command would hide one
    assert {"main.py", "fid.py", "fid.py compare", "bench.py"} <= set(seen), seen


def test_the_checker_catches_what_bash_would_break(tmp_path, monkeypatch):
    # braces in a flag's value expand into extra arguments, and <…> is a redirection
    with pytest.raises(utils.UserError):
        parses(recorded_commands("python main.py --diffaug {none,color} --span 2\n", tmp_path)[0], monkeypatch)
    with pytest.raises(AssertionError, match="as written"):
        recorded_commands("python fid.py a b --fid_weights <real weights>\n", tmp_path)
    with pytest.raises(utils.UserError):
        parses(["python", "main.py", "--parallel", "..."], monkeypatch)
