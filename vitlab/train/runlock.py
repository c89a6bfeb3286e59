"""One writer per run directory: an OS file lock, and run names made unique atomically.

`vitlab train` takes `<run>/.lock` (an exclusive `flock`) before it writes anything into a run
directory and holds it until the run ends, so a second trainer with the same `--out/--name`,
or a `--resume` of a run another process is still training, is refused with one line naming
that process instead of both writing into the same checkpoints and logs.

Why `fcntl.flock` and not a lock file that merely exists: the kernel drops a flock when its
holder dies (kill -9, power loss of a node aside), so a crashed run never leaves a stale lock
that blocks its own `--resume`. It is in the standard library (no dependency) and works on the
Linux and macOS machines vitlab trains on; on platforms without `fcntl` (Windows) runs are not
locked. flock is per open file, not per process, so two locks taken in one process (two API
calls on the same run from two threads) exclude each other too.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import ConfigError

try:  # pragma: no cover - the import fails only on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on one run directory, held until `release()` (or process exit)."""

    def __init__(self, run_dir: Path, fd: int | None, created: bool = False):
        self.run_dir = run_dir
        self._fd = fd
        self.created = created  # this process made the directory (it may remove it if nothing else lands there)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # the holder's details no longer apply
            except OSError:
                pass
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def discard_if_empty(self) -> None:
        """Release, and remove the directory this process created if the run never wrote
        anything into it (it failed before training: bad data, a refused option)."""
        empty = self.created and self._fd is not None and \
            [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]
        if empty:
            (self.run_dir / LOCK_NAME).unlink()  # still ours: the lock is held until release()
        self.release()
        if empty:
            try:
                self.run_dir.rmdir()
            except OSError:  # something appeared meanwhile: leave it
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(path: Path) -> str:
    """'process 1234 on host (started 06:30:01: vitlab train ...)' from the lock file, if readable."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    return f"process {info['pid']}{where} (started {info.get('started', '?')}: {info.get('command', '?')})"


def _os_error(what: str, path: Path, e: OSError) -> ConfigError:
    return ConfigError(f"cannot {what} {str(path)!r} ({e.strerror or type(e).__name__}); pass --out a folder "
                       f"you can write to (e.g. --out runs)")


def acquire(run_dir: Path, purpose: str = "train") -> RunLock:
    """Lock `run_dir` (created if needed) for this process; ConfigError naming the holder when
    another process has it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a regular file is in the way
        raise ConfigError(f"{str(e.filename or run_dir)!r} is a file, not a folder; pass --out a folder "
                          f"(e.g. --out runs)") from None
    except NotADirectoryError:
        raise ConfigError(f"cannot create the run directory {str(run_dir)!r}: a part of that path is a file, "
                          f"not a folder; pass --out a folder (e.g. --out runs)") from None
    except OSError as e:
        raise _os_error("create the run directory", run_dir, e) from None
    if fcntl is None:  # pragma: no cover - no flock on this platform: unlocked, as before
        return RunLock(run_dir, None)
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _os_error("write into", run_dir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if purpose == "resume":
            raise ConfigError(f"cannot resume {str(run_dir)!r}: it is in use by {_holder(path)}; wait for that "
                              f"run to finish (or stop it: it saves a checkpoint on SIGTERM)") from None
        raise ConfigError(f"cannot start a run in {str(run_dir)!r}: it is in use by {_holder(path)}; wait for "
                          f"that run to finish (or stop it: it saves a checkpoint on SIGTERM), or use another "
                          f"--name") from None
    except OSError as e:  # e.g. a file system without locks: say so rather than run unprotected silently
        os.close(fd)
        raise _os_error("lock", path, e) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["vitlab" if i == 0 else a for i, a in enumerate(sys.argv)])[:300]}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return RunLock(run_dir, fd)


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()


def new_run_dir(out: Path, name: str | None, base: str) -> RunLock:
    """Create and lock a fresh run directory under `out`: `out/name`, or `out/base`, `base-1`, ...
    The unnamed case claims its name with an exclusive mkdir (atomic: of two trainers started
    in the same second, exactly one gets each name), never by check-then-create."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; pass a folder for the run "
                          f"directories (e.g. --out runs)") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {str(out)!r} is under a file, not a folder; pass a folder for the run "
                          f"directories (e.g. --out runs)") from None
    except OSError as e:
        raise _os_error("create --out", out, e) from None
    if not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is not a folder; pass a folder for the run directories "
                          f"(e.g. --out runs)")
    if name:
        existed = (out / name).exists()
        lock = acquire(out / name)
        lock.created = not existed
        if holds_a_run(out / name):
            lock.release()
            raise ConfigError(f"run directory {str(out / name)!r} already holds a run; continue it with "
                              f"--resume {out / name} or choose another name (name=...)")
        return lock
    for i in range(10_000):
        run_dir = out / (base if i == 0 else f"{base}-{i}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise _os_error("create the run directory", run_dir, e) from None
        lock = acquire(run_dir)
        lock.created = True
        return lock
    raise ConfigError(f"10,000 runs named {base}* already exist in {str(out)!r}; pass --name")  # pragma: no cover


def ensure_free(resume: str | Path) -> None:
    """ConfigError naming the holder if the run `resume` points into is being trained now (the
    CLI reads the run's saved config before training starts; a live run may be mid-write)."""
    run_dir = run_dir_of(resume)
    path = run_dir / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: the trainer's own exclusive lock will decide
    try:
        # a shared lock: probes (every torchrun rank makes one) do not exclude each other, only a
        # live trainer's exclusive lock excludes them
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it is in use by {_holder(path)}; wait for that run "
                          f"to finish (or stop it: it saves a checkpoint on SIGTERM)") from None
    except OSError:
        pass
    finally:
        os.close(fd)


def run_dir_of(path: str | Path) -> Path:
    """The run directory a --resume argument points into (without reading any checkpoint file,
    which a live run may be replacing at this moment)."""
    p = Path(path)
    if p.is_file():
        d = p.parent
        return d.parent if d.name == "checkpoints" else d
    if p.name == "checkpoints" and not (p / "checkpoints").is_dir():
        return p.parent
    return p


def default_run_name(dataset: str, model: str) -> str:
    return f"{dataset}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
