"""The run directory, `<output_dir>/<name>/`, and everything that decides what its files mean.

One owner for: the layout (RunPaths), the stages (Stage), where a run stands (state.json), the JSON-lines
logs, who may write (RunLock), which checkpoints count (completion markers, the best-checkpoint pointer),
and the one way files and directories are written into it: to a temporary name, then renamed, so a reader
or a resumed run never sees half a file. Files only: `ftjob status`, the report and a login node use this
module without torch.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import RunLocked, VolumeError

log = logging.getLogger("ftjob")


class Stage(str, enum.Enum):
    """What state.json's "stage" says. A str, so it is written to and compared with JSON as is."""

    PREPARE = "prepare"
    TRAIN = "train"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    EXPORT = "export"
    TRAINED = "trained"
    GENERATE = "generate"
    DONE = "done"
    PREEMPTED = "preempted"
    DIVERGED = "diverged"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


FINISHED = frozenset({Stage.TRAINED, Stage.GENERATE, Stage.DONE})  # training is over
STOPPED = frozenset({Stage.PREEMPTED, Stage.DIVERGED, Stage.FAILED})  # the job ended before finishing


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def hostname() -> str:
    """This node's name; FTJOB_HOSTNAME overrides it (tests that play several hosts on one machine)."""
    return os.environ.get("FTJOB_HOSTNAME") or socket.gethostname()


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunPaths:
    root: Path

    spec = property(lambda self: self.root / "spec.yaml")  # the resolved spec (overrides applied)
    data = property(lambda self: self.root / "data")
    text_shards = property(lambda self: self.data / "text")  # one JSON document per line
    token_shards = property(lambda self: self.data / "tokens")  # fixed-size blocks of token ids
    manifest = property(lambda self: self.data / "manifest.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    best_pointer = property(lambda self: self.checkpoints / "best.json")
    final = property(lambda self: self.root / "final")  # Hugging Face format: the last weights
    best = property(lambda self: self.root / "best")  # Hugging Face format: the best validation loss
    samples = property(lambda self: self.root / "samples")
    metrics = property(lambda self: self.root / "metrics.jsonl")  # one record per logged step
    evals = property(lambda self: self.root / "eval.jsonl")  # one record per validation pass
    state = property(lambda self: self.root / "state.json")
    plan = property(lambda self: self.root / "plan.json")  # the estimate made before training
    lock = property(lambda self: self.root / ".lock")
    writers = property(lambda self: self.root / ".writers")  # shared-locked by every process that writes here
    report = property(lambda self: self.root / "report.md")
    loss_plot = property(lambda self: self.root / "loss.png")
    tensorboard = property(lambda self: self.root / "tensorboard")
    logs = property(lambda self: self.root / "logs")
    nodes = property(lambda self: self.root / "nodes")  # one heartbeat file per node of a multi-node run

    def log_file(self, node_rank: int) -> Path:
        """The full log of one node's attempts: ftjob's lines and every library's, never filtered."""
        return self.logs / ("ftjob.log" if node_rank == 0 else f"ftjob-node{node_rank}.log")


# ---------------------------------------------------------------- writing safely


VOLUME_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def atomic_write(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write to a temporary name beside `path`, then rename over it. On any error the temporary file is
    removed, so a full volume leaves the old file, not a stray one. durable: fsync before the rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise named(e, path)
        raise


def current_umask() -> int:
    """This process's umask, read from /proc without changing it: os.umask() can only read it by setting
    it, which would race with other threads creating files."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the mode a plain open() or mkdir() gets under this process's
    umask (0644 files and 0755 directories under 022, 0640/0750 under 027; executables keep their x bits).
    Some writers ignore the umask: transformers' save_pretrained writes model.safetensors 0600 whatever it
    is, and DeepSpeed copies its zero_to_fp32.py into checkpoints 0744; an export would be unreadable by a
    teammate, an evaluation job or an inference server running as another uid on the same volume.
    Symlinks are left alone."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def named(e: OSError, path: Path) -> OSError:
    """A failed write or flush names no file (only open does): the same error, naming the file written."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory `new` in place of `final` with renames: a kill leaves one or the other."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """`with atomic_dir(out) as tmp:` build the directory in tmp; it replaces `out` only if the block
    finishes, and a failure (a full volume included) removes the partial build. What the block wrote gets
    the umask's modes (apply_umask) before it is put in place."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_files(paths: RunPaths) -> list[Path]:
    """Temporary files and directories a killed or failed writer left (atomic_write, atomic_dir,
    checkpoint saves, data builds); only called by the run directory's lock holder."""
    patterns = [(paths.root, r"^\..+\.(tmp|old)-\d+$"), (paths.root, r"^\.data-building-\d+$"),
                (paths.checkpoints, r"^\.tmp-step-\d+$"), (paths.checkpoints, r"^\..+\.tmp-\d+$"),
                (paths.samples, r"^\..+\.tmp-\d+$"), (paths.data, r"^\..+\.tmp-\d+$")]
    removed = []
    for directory, pattern in patterns:
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            if re.match(pattern, p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- state and logs


def read_state(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(paths: RunPaths, **fields) -> None:
    """Merge fields into state.json; a reader (`ftjob status`, other nodes) never sees half a file."""
    state = read_state(paths)
    state.update(fields, updated=now_iso())
    atomic_write(paths.state, json.dumps(state, indent=1))


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:
        raise named(e, path)


def read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill; the rest of the file is still good
    return out


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records up to `last_step`: a resumed run trains the later steps again."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_manifest(paths: RunPaths) -> dict | None:
    return read_json(paths.manifest)


def data_fingerprint(manifest: dict) -> str:
    """What the training data is, by content: the token shards' sha256 in order, block size and dtype.
    Checkpoints record it, so a resume can tell whether its data is the data the run started with."""
    parts = [str(manifest.get("block_size")), str(manifest.get("dtype"))]
    for split in ("train", "valid"):
        parts += [s.get("tokens_sha256", "") for s in manifest["splits"][split]["shards"]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints

MARKER = "COMPLETE.json"
DS_TAG = "ds"  # DeepSpeed's own files live in <checkpoint>/ds/
UNIVERSAL_TAG = "ds_universal"  # ... and their universal form, when a resume needed one
_CHECKPOINT = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints that carry a completion marker, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / MARKER).exists()]
    return sorted(found, reverse=True)


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def verify_checkpoint(path: Path) -> str | None:
    """None if every file the marker lists is there with its size and sha256, else what is wrong."""
    try:
        marker = read_marker(path)
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable marker: {e}"
    for rel, info in marker["files"].items():
        f = path / rel
        if not f.exists():
            return f"missing {rel}"
        if f.stat().st_size != info["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, expected {info['bytes']}"
        if sha256_file(f) != info["sha256"]:
            return f"{rel} checksum mismatch"
    return None


def newest_complete(root: Path, verify: bool = True) -> Path | None:
    for _, path in complete_checkpoints(root):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying an older one", path, problem)
    return None


def write_marker(directory: Path, **fields) -> dict:
    """Fsync every file in `directory`, then write COMPLETE.json listing each with its size and sha256.
    Written last: a checkpoint without it does not count."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(directory))] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    marker = {**fields, "time": now_iso(), "files": files}
    atomic_write(directory / MARKER, json.dumps(marker, indent=1), durable=True)
    fsync_dir(directory)
    return marker


def checkpoint_bytes(marker: dict) -> int:
    return sum(f.get("bytes", 0) for f in marker.get("files", {}).values())


def newest_checkpoint_info(paths: RunPaths) -> dict | None:
    """Name, path, size and marker fields of the newest checkpoint with a completion marker."""
    for step, path in complete_checkpoints(paths.checkpoints):
        try:
            marker = read_marker(path)
        except (OSError, ValueError):
            continue  # marker being replaced or damaged; an older one still counts
        return {"name": path.name, "path": str(path), **{k: v for k, v in marker.items() if k != "files"},
                "bytes": checkpoint_bytes(marker), "step": step}
    return None


def measured_figures(paths: RunPaths, metrics: list[dict] | None = None) -> dict:
    """The figures a plan estimates, as the run measured them (peaks over the run, speed over its last
    ten metrics records, the newest checkpoint's size)."""
    metrics = read_jsonl(paths.metrics) if metrics is None else metrics
    recent = [m["tokens_per_s"] for m in metrics[-10:] if m.get("tokens_per_s")]
    gpu = [m["peak_mem_gib"] for m in metrics if m.get("peak_mem_gib") is not None]
    rss = [m["peak_rss_mib"] for m in metrics if m.get("peak_rss_mib") is not None]
    ckpt = newest_checkpoint_info(paths)
    counted = read_state(paths).get("state_bytes") or {}  # the worker's count at its first step (rank 0)
    return {"peak_gpu_gib": max(gpu) if gpu else None, "peak_rss_mib": max(rss) if rss else None,
            "tokens_per_s": sum(recent) / len(recent) if recent else None,
            "checkpoint_bytes": ckpt["bytes"] if ckpt else None,
            "state_bytes": sum(v for k, v in counted.items() if k != "rank") or None}


def read_best(paths: RunPaths) -> dict | None:
    """{"checkpoint": name, "step": N, "loss": x} of the best evaluation so far, if it has a checkpoint."""
    best = read_json(paths.best_pointer)
    return best if best and (paths.checkpoints / best.get("checkpoint", "?") / MARKER).exists() else None


def point_latest(root: Path, final: Path) -> None:
    atomic_write(root / "latest", final.name + "\n", durable=True)
    fsync_dir(root)


def prune_checkpoints(root: Path, keep: int, protect: set[str]) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never one in `protect`: the best) and torn
    temporary ones; called right after a save completed, so a newer complete one always exists."""
    for _, path in complete_checkpoints(root)[keep:]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- the lock


class RunLock:
    """One writer per run directory: an flock on <run>/.lock, whose content says who holds it (host,
    pid) and a heartbeat the holder bumps every `heartbeat_s`.

    On one host the flock is exact: the kernel drops it when the holder dies. On network storage a lock
    can outlive a dead node (the server holds it until the client's lease runs out), so a lock held from
    another host whose heartbeat has not moved for 3 x its interval is taken over, with a warning. A live
    holder, anywhere, gives RunLocked (exit 3).

    The holder's workers can outlive it for a moment (they die with it, but a process takes time to end),
    so the lock also covers them: every worker holds a shared flock on <run>/.writers (hold_writers), and a
    new holder first takes it exclusively, waiting up to 3 heartbeats for an earlier attempt's processes to
    exit (exit 3 naming them if they do not), before it writes anything; it then keeps it shared, beside
    its own workers."""

    STALE_AFTER = 3  # missed heartbeats

    def __init__(self, paths: RunPaths, heartbeat_s: float = 30.0):
        self.paths, self.heartbeat_s = paths, heartbeat_s
        self.fd: int | None = None
        self.writers_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict = {}

    def acquire(self) -> "RunLock":
        self.paths.root.mkdir(parents=True, exist_ok=True)
        fd = self._try_flock()
        if fd is None:
            holder = holder_info(self.paths)
            if holder.get("host") == hostname() or not self._wait_for_stale(holder):
                raise RunLocked(f"run directory {self.paths.root} is in use by {describe_holder(holder)}; wait "
                                "for it to finish, or point this job at another spec name / output_dir")
            stale = f"stale-{holder.get('host')}-{holder.get('pid')}"
            log.warning("taking over run directory %s from %s: its heartbeat stopped (node lost?); the old "
                        "lock file is kept as .lock.%s", self.paths.root, describe_holder(holder), stale)
            os.replace(self.paths.lock, self.paths.lock.with_name(f".lock.{stale}"))
            # The lost node's writers lock is taken over with it (its flocks live on until its lease ends).
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.paths.writers, self.paths.writers.with_name(f".writers.{stale}"))
            fd = self._try_flock()
            if fd is None:
                raise RunLocked(f"run directory {self.paths.root}: another job took it over at the same time")
        try:
            self.writers_fd = self._wait_for_writers()
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._info = {"pid": os.getpid(), "host": hostname(), "since": now_iso(), "interval_s": self.heartbeat_s,
                      "beat": 0}
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="ftjob-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _try_flock(self) -> int | None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    def _wait_for_writers(self) -> int:
        """The writers lock, taken exclusively once no process of an earlier attempt holds it, then kept
        shared. Waits up to STALE_AFTER heartbeats (the time a lost holder is given, too)."""
        fd = os.open(self.paths.writers, os.O_RDWR | os.O_CREAT, 0o644)
        wait_s = self.STALE_AFTER * self.heartbeat_s
        deadline = time.monotonic() + wait_s
        noted = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            who = describe_processes(lock_holders(self.paths.writers))
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunLocked(f"run directory {self.paths.root} is still in use by an earlier attempt's "
                                f"{who} after waiting {wait_s:.0f}s (3 x resources.lock_heartbeat_s); end it "
                                "(kill -9 PID) if its job is gone, then run again")
            if not noted:
                log.warning("run directory %s: waiting up to %.0fs for an earlier attempt's %s to exit",
                            self.paths.root, wait_s, who)
                noted = True
            time.sleep(0.2)
        fcntl.flock(fd, fcntl.LOCK_SH)  # this job's own workers hold it shared beside it
        return fd

    def _wait_for_stale(self, holder: dict) -> bool:
        """True if the holder's heartbeat does not move for STALE_AFTER of its intervals. Judged by watching
        the counter with this host's own clock, so clock skew between nodes does not matter; an old
        wall-clock stamp only shortens the wait."""
        interval = float(holder.get("interval_s") or self.heartbeat_s)
        window = self.STALE_AFTER * interval
        age = time.time() - float(holder.get("time", time.time()))
        deadline = time.monotonic() + max(0.0, min(window, window - age))
        while time.monotonic() < deadline:
            time.sleep(min(1.0, interval / 4))
            now = holder_info(self.paths)
            if now.get("beat") != holder.get("beat") or now.get("pid") != holder.get("pid"):
                return False
        return True

    def _beat(self) -> None:
        self._info.update(beat=self._info["beat"] + 1, time=time.time())
        data = json.dumps(self._info).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # a full volume must not kill the job over its lock file; the next beat tries again

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.fd is not None:
                self._beat()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for fd in (self.writers_fd, self.fd):
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self.fd = self.writers_fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def hold_writers(paths: RunPaths) -> int | None:
    """In a process that writes into the run directory beside the lock holder (a worker): a shared flock
    on <run>/.writers, held until this process exits (the fd is never closed), so that a new lock holder
    waits for it. Blocks only while a new holder checks that no earlier writer is left. None where the
    filesystem has no flock."""
    fd = os.open(paths.writers, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return fd


def lock_holders(path: Path) -> list[int]:
    """This host's processes that hold an flock on `path` (from /proc/locks; those on other hosts of a
    network filesystem are not listed there)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in lines:
        # "3: FLOCK  ADVISORY  READ  1234 00:2d:5678 0 EOF"; a waiting request reads "3: -> FLOCK ..."
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and int(fields[4]) > 0:
            pids.add(int(fields[4]))
    return sorted(pids)


def describe_processes(pids: list[int]) -> str:
    """`processes pid 12 (python -u -m job.train.worker ...), pid 13 (...)`, from /proc."""
    if not pids:
        return "process (on another host, or outside this container)"
    names = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            command = " ".join([os.path.basename(argv[0])] + argv[1:]).strip()
        except OSError:
            command = "gone"
        names.append(f"pid {pid} ({command[:160]})")
    return f"process{'es' if len(pids) > 1 else ''} " + ", ".join(names)


def holder_info(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another job"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def is_held(paths: RunPaths) -> bool:
    """True while a live process holds the lock (checked by trying to take it, never by pid files)."""
    if not paths.lock.exists():
        return False
    fd = os.open(paths.lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- a full or failing volume


def volume_of(path: Path) -> Path:
    """The mount point `path` lives on (the volume a user can name, resize or remount)."""
    p = Path(path).resolve()
    while not p.exists() or (not os.path.ismount(p) and p != p.parent):
        p = p.parent
    return p


def describe_volume(path: Path) -> str:
    mount = volume_of(path)
    try:
        usage = shutil.disk_usage(mount)
        return f"volume {mount} ({usage.free / 1e6:,.1f} MB free of {usage.total / 1e6:,.1f} MB)"
    except OSError:
        return f"volume {mount}"


def looks_like_volume_failure(exc: BaseException, path: Path) -> bool:
    """Whether `exc`, raised while writing under `path`, is the volume's fault. torch.save's C++ writer
    reports a full disk as `RuntimeError: basic_ios::clear: iostream error`, so when the exception itself
    does not say, try writing a small file there."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in VOLUME_ERRNOS:
            return True
    probe = Path(path) / f".ftjob-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in VOLUME_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def volume_error(path: Path, what: str, exc: BaseException, paths: RunPaths | None = None) -> VolumeError:
    """The one line for a volume that could not hold `what` (at `path`): the volume and its free space, the
    error, the last complete checkpoint."""
    where = Path(path) if Path(path).is_dir() else Path(path).parent
    last = newest_complete(paths.checkpoints, verify=False) if paths else None
    tail = f"; last complete checkpoint: {last.name if last else 'none yet'}" if paths else ""
    return VolumeError(f"{describe_volume(where)} could not hold {what} ({path}): {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else ''}; partial files removed{tail}; free "
                       "space or move output_dir, then run again")


def volume_error_of(exc: BaseException, paths: RunPaths) -> VolumeError:
    """volume_error for an error raised by any write under the run directory, naming the file the error
    names, as the run knows it (atomic_write's `.state.json.tmp-123` is state.json)."""
    name = getattr(exc, "filename", None)
    if not name:
        return volume_error(paths.root, "the run's files", exc, paths)
    path = Path(os.fsdecode(name))
    m = re.match(r"^\.(.+)\.tmp-\d+$", path.name)
    path = path.with_name(m.group(1)) if m else path
    return volume_error(path, path.name, exc, paths)


@contextlib.contextmanager
def writing(path: Path, what: str, paths: RunPaths | None = None):
    """`with writing(path, "the report"):` turns a full, read-only or failing volume under `path` into one
    VolumeError line: the volume and its free space, what was being written, the last complete checkpoint."""
    try:
        yield
    except VolumeError:
        raise
    except Exception as e:
        where = Path(path) if Path(path).is_dir() else Path(path).parent
        if not looks_like_volume_failure(e, where):
            raise
        raise volume_error(path, what, e, paths) from None
