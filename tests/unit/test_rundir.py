"""The run directory's rules: which checkpoints count, files written whole or not at all, what pruning
keeps, and one writer at a time (the lock, its heartbeat, taking over a lock a lost node left, and the
writers lock that keeps the run directory locked until an earlier attempt's last worker has exited)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from job.errors import RunLocked
from job.rundir import (MARKER, RunLock, RunPaths, apply_umask, atomic_dir, atomic_write, complete_checkpoints,
                        current_umask, data_fingerprint, holder_info, is_held, newest_complete, prune_checkpoints,
                        remove_partial_files, verify_checkpoint, write_marker)


def checkpoint(root, step, payload=b"weights", complete=True):
    d = root / f"step-{step:08d}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "model.pt").write_bytes(payload)
    if complete:
        write_marker(d, step=step, tokens=step * 10, epoch=0, world_size=2, data="x")
    return d


def test_only_checkpoints_with_an_intact_marker_count(tmp_path):
    a, b = checkpoint(tmp_path, 4), checkpoint(tmp_path, 8)
    checkpoint(tmp_path, 12, complete=False)  # torn: no marker
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [8, 4]
    marker = json.loads((b / MARKER).read_text())
    assert marker["files"]["ds/model.pt"]["bytes"] == 7 and marker["world_size"] == 2
    assert verify_checkpoint(b) is None
    (b / "ds" / "model.pt").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert verify_checkpoint(b) == "ds/model.pt checksum mismatch"
    assert newest_complete(tmp_path) == a  # the damaged newest one is skipped
    (a / "ds" / "model.pt").unlink()
    assert verify_checkpoint(a) == "missing ds/model.pt" and newest_complete(tmp_path) is None


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint(tmp_path, step)
    (tmp_path / ".tmp-step-00000010").mkdir()
    prune_checkpoints(tmp_path, keep=2, protect={"step-00000002"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000006", "step-00000008"]


def test_atomic_write_and_dir_leave_the_old_or_the_new(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise Boom()
    assert not (tmp_path / "final").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "config.json").write_text("{}")
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert (tmp_path / "final" / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "state.json"]


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request):
    """The process umask for one test (pytest workers are processes of their own)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root):
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]
            if not p.is_symlink()}


def test_atomic_dir_gives_what_was_written_the_umasks_modes(tmp_path, umask):
    """What atomic_dir puts in place has the modes a plain write gets: 0644/0755 under umask 022,
    0640/0750 under 027, an executable keeping its x bits; a file written 0600 whatever the umask (as
    transformers' save_pretrained writes model.safetensors) included. Symlinks are not followed. The
    real writers, in real runs: test_e2e.py (027) and test_resume.py (022)."""
    assert current_umask() == umask
    outside = tmp_path / "outside"
    outside.write_text("")
    outside.chmod(0o600)
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "config.json").write_text("{}")
        fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "tool.py").write_text("")
        (tmp / "sub" / "tool.py").chmod(0o744)  # as DeepSpeed copies zero_to_fp32.py into a checkpoint
        (tmp / "link").symlink_to(outside)
    f, d = oct(0o666 & ~umask), oct(0o777 & ~umask)
    assert modes(tmp_path / "final") == {".": d, "config.json": f, "model.safetensors": f, "sub": d,
                                         "sub/tool.py": d}
    assert outside.stat().st_mode & 0o777 == 0o600
    apply_umask(outside)  # a single file
    assert oct(outside.stat().st_mode & 0o777) == f


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("job.rundir.os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_partial_files_of_a_stopped_attempt_are_found(tmp_path):
    paths = RunPaths(tmp_path)
    (paths.checkpoints / ".tmp-step-00000020").mkdir(parents=True)
    (tmp_path / ".state.json.tmp-123").write_text("{")
    (tmp_path / ".final.tmp-99").mkdir()
    (tmp_path / ".data.tmp-7").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    removed = remove_partial_files(paths)
    assert sorted(p.name for p in removed) == [".data.tmp-7", ".final.tmp-99", ".state.json.tmp-123",
                                               ".tmp-step-00000020"]
    assert (tmp_path / "keep.txt").exists()


def test_data_fingerprint_is_the_token_content():
    m = {"block_size": 64, "dtype": "uint16", "splits": {"train": {"shards": [{"tokens_sha256": "a"}]},
                                                         "valid": {"shards": [{"tokens_sha256": "b"}]}}}
    same = json.loads(json.dumps(m)) | {"created": "another day"}
    other = json.loads(json.dumps(m))
    other["splits"]["valid"]["shards"][0]["tokens_sha256"] = "c"
    assert data_fingerprint(m) == data_fingerprint(same) != data_fingerprint(other)


HOLDER = """
import sys, time
from pathlib import Path
from job.rundir import RunLock, RunPaths
RunLock(RunPaths(Path(sys.argv[1])), heartbeat_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(run, host, heartbeat_s):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(heartbeat_s)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, FTJOB_HOSTNAME=host))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_keeps_the_lock_wherever_it_runs(tmp_path, monkeypatch):
    run = RunPaths(tmp_path / "run")
    same_host = hold(run.root, os.uname().nodename, 0.5)
    try:
        with pytest.raises(RunLocked, match=f"pid {same_host.pid}") as e:
            RunLock(run).acquire()
        assert e.value.exit_code == 3
    finally:
        same_host.kill()
        same_host.wait()
    other_host = hold(run.root, "node-a", 0.5)  # on "another host", beating every 0.5 s
    try:
        monkeypatch.setenv("FTJOB_HOSTNAME", "node-b")
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match="on node-a"):
            RunLock(run).acquire()
        assert time.monotonic() - t0 < 3  # it saw the heartbeat move well within 3 intervals
    finally:
        other_host.kill()
        other_host.wait()


def test_a_lock_whose_holder_stopped_beating_on_another_host_is_taken_over(tmp_path, monkeypatch, caplog):
    """A node lost with its lock still held on network storage: here a holder on "node-a" that is stopped
    (SIGSTOP), so its flock stays held and its heartbeat stops, as a dead node's would."""
    run = RunPaths(tmp_path / "run")
    lost = hold(run.root, "node-a", 0.5)
    lost.send_signal(signal.SIGSTOP)
    try:
        monkeypatch.setenv("FTJOB_HOSTNAME", "node-b")
        caplog.set_level("WARNING", logger="ftjob")
        t0 = time.monotonic()
        lock = RunLock(run, heartbeat_s=0.5).acquire()
        waited = time.monotonic() - t0
        try:
            assert holder_info(run)["host"] == "node-b" and holder_info(run)["pid"] == os.getpid()
            assert "taking over run directory" in caplog.text and "node-a" in caplog.text
            assert 0.5 <= waited < 5  # up to 3 x 0.5 s without a beat, judged by this host's clock
            assert list(run.root.glob(".lock.stale-node-a-*"))  # the old lock file is kept, not deleted
        finally:
            lock.release()
    finally:
        lost.send_signal(signal.SIGCONT)
        lost.kill()
        lost.wait()


WRITER = """
import sys, time
from pathlib import Path
from job.rundir import RunPaths, hold_writers
hold_writers(RunPaths(Path(sys.argv[1])))
print("writing", flush=True)
time.sleep(float(sys.argv[2]))
"""


def writer(run, seconds):
    """A process that writes into the run directory beside its job (a worker), for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run.root), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_the_lock_covers_every_writer_until_the_last_has_exited(tmp_path, caplog):
    """A worker of an earlier attempt still alive (its job gone): the next job waits for it, bounded by 3
    heartbeats, then exits 3 naming it, having written nothing; one that exits within the wait is waited
    for. The holder's own workers hold the writers lock beside it."""
    run = RunPaths(tmp_path / "run")
    RunLock(run, heartbeat_s=0.3).acquire().release()  # an earlier attempt's job, ended
    before = run.lock.read_bytes()
    lingering = writer(run, 600)
    try:
        caplog.set_level("WARNING", logger="ftjob")
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match=f"earlier attempt's process pid {lingering.pid} \\(python") as e:
            RunLock(run, heartbeat_s=0.3).acquire()
        assert 0.9 <= time.monotonic() - t0 < 5
        assert e.value.exit_code == 3 and "after waiting 1s (3 x resources.lock_heartbeat_s)" in str(e.value)
        assert f"waiting up to 1s for an earlier attempt's process pid {lingering.pid}" in caplog.text
        assert run.lock.read_bytes() == before and not is_held(run)  # nothing written, the lock let go
    finally:
        lingering.kill()
        lingering.wait()

    brief = writer(run, 1.0)
    t0 = time.monotonic()
    lock = RunLock(run, heartbeat_s=2).acquire()  # waits up to 6 s: the writer ends after 1
    try:
        assert brief.poll() is not None and 0.5 <= time.monotonic() - t0 < 5
        own = writer(run, 0)  # the holder's own worker: not blocked
        own.wait()
    finally:
        lock.release()
