"""One run per run directory: an exclusive lock file naming its holder.

``RUN_DIR/run.lock`` holds the holder's host, boot id, pid (and that
process's start time), Ray job id and cluster. It is created by linking a
complete temporary file to that name, which fails if the name exists, on
local disks and NFS alike, so a reader never sees a half-written lock.

A lock whose holder is gone is *stale* and is taken over, with a log line:
on the same host, the pid is dead, reused by another process, or the host
has rebooted since; on another host, the holder's Ray job is dead in the
same Ray cluster. A holder that cannot be checked (another host, another
cluster) counts as alive: the message says how to remove the lock by hand.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from topology.errors import ConfigError
from trainer import storage

log = logging.getLogger("ringleader")

LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    host: str
    pid: int
    pid_start: str | None = None
    """The process's start time in clock ticks since boot (/proc/PID/stat): tells a reused pid apart."""
    boot_id: str | None = None
    job_id: str | None = None
    """Ray job id of the driver (``ray.get_runtime_context().get_job_id()``)."""
    cluster: str | None = None
    """GCS address of the Ray cluster the job runs on."""
    since: float = 0.0
    submission_id: str | None = None
    """``ray job submit``'s id of the job, what ``ray job stop`` takes (None for a driver started by hand)."""

    @classmethod
    def me(cls, job_id: str | None = None, cluster: str | None = None) -> "Holder":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_time(pid), _boot_id(), job_id, cluster, time.time(), _submission_id())

    def describe(self) -> str:
        job = f", Ray job {self.job_id}" if self.job_id else ""
        job += f" (submission {self.submission_id})" if self.submission_id else ""
        return f"pid {self.pid} on {self.host}{job} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


def alive(holder: Holder) -> bool | None:
    """Whether ``holder`` still runs: True, False, or None when this process cannot tell."""
    if holder.host == socket.gethostname():
        if holder.boot_id and holder.boot_id != _boot_id():
            return False  # the host rebooted since
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        return not (holder.pid_start and _start_time(holder.pid) not in (None, holder.pid_start))
    return _job_alive(holder)


def _job_alive(holder: Holder) -> bool | None:
    """On another host, the holder's Ray job tells, if this driver is on the same cluster."""
    try:
        import ray

        if not (holder.job_id and ray.is_initialized() and holder.cluster == ray.get_runtime_context().gcs_address):
            return None
        from ray._private.state import jobs  # the GCS job table; no public API lists drivers of non-submitted jobs

        for job in jobs():
            if job.get("JobID") == holder.job_id:
                return not job.get("IsDead", False)
        return False
    except Exception:  # noqa: BLE001 - unknown is the safe answer
        return None


class RunLock:
    """The held lock of one run directory; ``release`` (or leaving the ``with`` block) removes it."""

    def __init__(self, path: Path | None, holder: Holder):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, run_dir: str | Path, job_id: str | None = None, cluster: str | None = None) -> "RunLock":
        """Take the lock of ``run_dir`` (created if missing).

        Raises
        ------
        ConfigError
            Another live run holds it (named, with how to stop it).
        """
        me = Holder.me(job_id, cluster)
        if storage.is_uri(run_dir):
            # An object store has no create-if-absent here (pyarrow.fs), so no lock can be atomic there.
            log.warning("run directory %s is on an object store: it is not locked; run one job on it at a time", run_dir)
            return cls(None, me)
        path = Path(run_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if _create(path, me):
                return cls(path, me)
            held = read_holder(path)
            if held is None:
                continue  # released meanwhile
            if alive(held) is not False:
                raise _in_use(path, held)
            if _take_over(path, held):
                log.warning("run directory %s: took over the stale lock of %s (no longer running)", path.parent, held.describe())
        raise ConfigError(f"run directory {path.parent}: could not take {path}; another run is starting there")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.path is not None and read_holder(self.path) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_free(run_dir: str | Path) -> None:
    """Raise the ``acquire`` error now if a live run holds ``run_dir`` (a check before Ray starts; takes nothing)."""
    if storage.is_uri(run_dir):
        return  # not lockable (see ``RunLock.acquire``)
    path = Path(run_dir) / LOCK_FILE
    held = read_holder(path)
    if held is not None and alive(held) is not False:
        raise _in_use(path, held)


def _in_use(path: Path, held: Holder) -> ConfigError:
    stop = f"ray job stop {held.submission_id}" if held.submission_id else f"kill {held.pid} on {held.host}"
    return ConfigError(f"run directory {path.parent} is in use by {held.describe()}; wait for that run, stop it "
                       f"({stop}), or, if it is gone, remove {path}")


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Holder(host="?", pid=-1)  # not ours to judge: counts as alive elsewhere
    return Holder(**{k: v for k, v in data.items() if k in Holder.__dataclass_fields__})


def _create(path: Path, me: Holder) -> bool:
    """Link a complete temporary file to ``path``; False if ``path`` exists."""
    tmp = path.with_name(f".{path.name}.{me.host}.{me.pid}.tmp")
    tmp.write_text(json.dumps(asdict(me)) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: Holder) -> bool:
    """Move a stale lock aside; only one of several racing takers moves the lock it judged."""
    aside = path.with_name(f".{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_holder(aside) != stale:  # another taker's fresh lock: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _submission_id() -> str | None:
    """The submission id Ray's job supervisor hands its driver (in the job config it passes by environment)."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
