"""Files that survive kills, full disks and parallel writers: atomic writes, file locks,
checks that an output can be written, log CSVs read back without their broken lines, a run's
status.json; NumPy files checked before numpy reads them (it would offer to run code from them)."""
import csv
import json
import os
import re
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from folders import run_lock_path
from utils import UserError, warn


@contextmanager
def atomic_open(path, mode="wb", **kwargs):
    """Write through a hidden temp file beside `path`, renamed over it when the block ends
    without error: readers, crashes and parallel writers never see half a file. On error
    the temp file is removed and `path` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # durable before it takes the name, not only atomic
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # and the rename itself survives a power cut (POSIX; best effort where folders cannot be opened)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created if missing) for the block, waiting for
    other processes that hold it. The OS drops the lock when its process dies, so a lock
    file left by a killed process never blocks anyone."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases it


def check_writable(folder, flag: str) -> None:
    """UserError (one line naming the flag) unless `folder` exists as a writable folder or
    can be created as one; creates nothing."""
    path = Path(folder).absolute()
    probe = path
    while not os.path.exists(probe):  # os.path: no PermissionError from an unreadable parent
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag}: {probe} is a file, so {path} cannot be a folder; pick another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot write to {probe} (permission denied or read-only); pick another {flag}")


def check_output_file(path, flag) -> Path:
    """Before the work: UserError (one line) if `path` cannot become a file, because it is
    a folder or its folder cannot be created or written, or if it is a file of a run (one in
    a folder holding a config.json): a report never writes over a run's logs."""
    if not str(path).strip():  # Path("") would be the current folder
        raise UserError(f"{flag} is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.is_file() and (path.parent / "config.json").is_file():
        raise UserError(f"{flag} {path} is a file of the run in {path.parent}; give another file name")
    check_writable(path.parent, flag)
    return path


def remove_stale_temp_files(folder) -> int:
    """Remove the temp files atomic_open leaves behind when its process is killed mid-write
    (kill -9), and the temp folders of --train false's samples: those whose writing process
    is gone. Returns how many."""
    removed = 0
    for p in Path(folder).glob(".*.tmp*"):
        m = re.fullmatch(r"\..+\.tmp(\d+)", p.name)
        if m and not _process_alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def csv_rows_until(path: Path, step: int) -> list:
    """The rows (dicts) of a log CSV up to `step`: a resumed run drops what was logged
    after its checkpoint. Lines a kill or a full disk left broken (NUL bytes, cut short, a
    step that is not a number) are dropped with one warning, never kept as rows."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    good = [line for line in lines if "\x00" not in line]
    reader = csv.DictReader(good)
    rows, broken = [], len(lines) - len(good)
    for r in reader:
        try:
            ok = None not in r and None not in r.values() and int(r["step"]) >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            broken += 1
        elif int(r["step"]) <= step:
            rows.append(r)
    if broken:
        warn(f"{path}: dropped {broken} broken line(s) (a write cut short by a kill or a full disk)")
    return rows


def csv_header(path: Path):
    """The column names of a CSV file, or None if it is missing or empty."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, newline="", errors="replace") as f:
        return next(csv.reader(line for line in f if "\x00" not in line), None)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty one


def _npy_dtype(f):
    """The dtype in the header of the .npy stream f (ValueError when it has none)."""
    version = np.lib.format.read_magic(f)
    # version 3.0 only allows utf8 field names in the header: 2.0's reader parses what images use
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)[2]


def check_array_file(path):
    """UserError (one line) unless `path` is a .npy, or an .npz of .npy members, holding no
    Python objects: checked from the headers, before np.load sees the file. For random
    bytes, a pickle or an object array np.load's own message advises allow_pickle=True,
    i.e. running code from the file; that advice must never reach the user."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head == _NPY_MAGIC:
                f.seek(0)
                dtypes = {"": _npy_dtype(f)}
            elif head[:4] in _ZIP_MAGICS:
                with zipfile.ZipFile(f) as z:
                    dtypes = {}
                    for name in z.namelist():
                        with z.open(name) as m:
                            dtypes[name] = _npy_dtype(m)
            else:
                raise UserError(f"{path} is not a NumPy .npy/.npz file (random bytes, a pickle or another "
                                f"format); save arrays with numpy.save / numpy.savez")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path} as a NumPy .npy/.npz file ({first}); re-save or re-copy it") from None
    objects = [name.removesuffix(".npy") for name, dtype in dtypes.items() if dtype.hasobject]
    if objects:
        where = f" (array {', '.join(objects)})" if objects != [""] else ""
        raise UserError(f"{path} holds Python objects{where}, not numbers, and is not loaded (unpickling them "
                        f"could run code from the file); save a numeric array instead")


# status.json in a run's log folder: how the last process that trained the run ended. Written by
# runlog.RunStatus from inside the run; by a sweep (record_unseen_end) for a cell it saw die
# without a word; read by the compare report.
STATUS_FILE = "status.json"
STATUSES = ("running", "finished", "stopped", "diverged", "failed")


def write_status(log_folder, status, step, total_step, reason=""):
    record = {"status": status, "step": step, "total_step": total_step, "reason": reason}
    with atomic_open(Path(log_folder) / STATUS_FILE, "w") as f:
        f.write(json.dumps(record, indent=2))


def read_status(log_folder) -> dict:
    """The run's status.json, or {} if it has none (a run from before the file existed, or
    one that never trained) or it cannot be read."""
    try:
        record = json.loads((Path(log_folder) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    ok = isinstance(record, dict) and record.get("status") in STATUSES and isinstance(record.get("step"), int)
    return record if ok else {}


def record_unseen_end(log_folder, reason):
    """A run whose process died without recording its end (kill -9, out of memory: its
    status.json still says "running") becomes "failed" with `reason`, at its last logged
    step, as whoever saw the process end knows. A run that recorded its own end, or that a
    live process holds (its run lock), is left as it is."""
    log_folder = Path(log_folder).resolve()
    try:
        import fcntl
    except ImportError:  # no run locks here (run.lock_run): no way to tell a live run from a dead one
        return
    with open(run_lock_path(log_folder.parent, log_folder.name), "a+") as lock:  # the run's lock (run.lock_run)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live process trains the run (another start, a resumed job): its status is its own
            return
        status = read_status(log_folder)
        if status.get("status") != "running":
            return
        logged = [int(r["step"]) for r in csv_rows_until(log_folder / "metrics.csv", 2 ** 62)]
        write_status(log_folder, "failed", max([status["step"], *logged]), status.get("total_step"), reason[:300])
