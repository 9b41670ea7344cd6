"""What every module shares and nothing else: the package's version, the one error type
for user mistakes, the parser that reports them in one line, warnings. No torch here:
`--help` must answer without importing it."""
import argparse
import errno
import json
import math
import re
import subprocess
import sys
from pathlib import Path

__version__ = "0.2.0"  # 0.2: checkpoints load with weights_only (no pickled numpy)
REPO = Path(__file__).resolve().parent
# the flag that lets main.py and fid.py load a checkpoint of a version before 0.2 (checkpoint.load)
TRUST_FLAG = "--trust_checkpoint"


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """The parser of every entry point. A bad flag raises UserError, the one error type: the
    entry point prints it as one line naming the fix, exactly as a mistake found later
    (argparse would print a usage dump and exit)."""

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        raise UserError(f"{message}{self._dash_value_hint(message)} (see python {self.prog} --help)")

    def _dash_value_hint(self, message):
        """argparse reads a word starting with '-' as a flag unless it is one plain negative
        number, so `--seed -1,2` says only "expected one argument": name the spelling it takes."""
        flag = re.fullmatch(r"argument (\S+): expected one argument", message)
        words = getattr(self, "_words", [])
        for word, value in zip(words, words[1:]):
            if flag and word in flag[1].split("/") and value[:1] == "-" and value[1:2].isdigit():
                return f"; {value} reads as a flag: write {word}={value}"
        return ""


_warned = set()


def warn(message: str, once: bool = False) -> None:
    """A one-line warning on stderr (no source line, unlike warnings.warn)."""
    if once and message in _warned:
        return
    _warned.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def finite_float(text):
    """argparse type: a finite number (a target of nan or inf is never reached, nor missed)."""
    value = float(text)  # a ValueError: argparse says "invalid float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


finite_float.__name__ = "float"  # what argparse calls it in messages


def int_at_least(low):
    """argparse type: an integer >= low (0 steps, splits or subsets would divide by zero or
    print nan as a result)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # what argparse calls it in messages
    return parse


def write_failed(what, path, error) -> UserError:
    """The one line for an output file that could not be written (a full disk, a read-only
    or missing folder): the path, why, and the fix. Writes go through atomic_open, so an
    earlier file at the path is as it was."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "part of its folder is a file",
               errno.EEXIST: "its folder is a file", errno.EISDIR: "it is a folder", errno.ENOENT: "its folder is gone"}
    why = reasons.get(getattr(error, "errno", None), getattr(error, "strerror", None) or type(error).__name__)
    fix = "free some space or pick another" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "pick another"
    return UserError(f"cannot write {what} {path}: {why}; {fix} {what} (any earlier file there is unchanged)")


def is_tty() -> bool:
    return sys.stderr.isatty()




def json_line(result) -> str:
    """`result` (dicts, lists, numbers, strings) as one line of strict JSON: a number that
    is not finite (no FID of a diverged run) becomes null, which every JSON reader takes."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # a numpy scalar
            v = v.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps(plain(result), allow_nan=False)
