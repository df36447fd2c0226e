"""lte_convert/atomic.py: a crash at any point keeps one complete version, data is on disk
before the rename, outputs get normal permissions, a killed writer's temporaries are cleaned
by the next run, and a full disk is a DiskFull error with nothing left behind."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lte_convert.atomic import atomic_path, leftovers
from lte_convert.errors import DiskFull

ROOT = Path(__file__).resolve().parents[2]


def _write_folder(path: Path, text: str):
    path.mkdir(exist_ok=True)
    (path / "weights.bin").write_text(text)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "more.txt").write_text(text)


def _run_killed(code: str, tmp_path: Path) -> int:
    """Run `code` in a fresh interpreter (which kills itself with SIGKILL somewhere)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, timeout=120,
                       capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r.returncode


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_crash_while_replacing_a_folder_keeps_the_old_one(tmp_path):
    final = tmp_path / "ckpt"
    _write_folder(final, "old")
    # killed at the moment the new folder would be renamed in: after the old one is gone
    # (deleted by a remove-then-rename, moved aside by move-aside-replace-delete)
    _run_killed("""
        import os, signal
        from pathlib import Path
        from lte_convert import atomic
        real = os.replace
        def replace(src, dst):
            if ".lte-tmp-" in str(src) and Path(dst).name == "ckpt":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        atomic.os.replace = replace
        final = Path(os.environ["OUT"]) / "ckpt"
        with atomic.atomic_path(final, is_dir=True) as tmp:
            (tmp / "weights.bin").write_text("new")
    """, tmp_path)
    assert leftovers(final), _hidden(tmp_path)
    with atomic_path(tmp_path / "ckpt", is_dir=True) as tmp:   # the next run of the command
        assert (final / "weights.bin").read_text() == "old"    # put back before it writes
        _write_folder(tmp, "new")
    assert (final / "weights.bin").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_a_folder_replaces_an_older_one_and_nothing_is_left_beside(tmp_path):
    final = tmp_path / "ckpt"
    _write_folder(final, "old")
    (final / "stale.txt").write_text("from the old version")
    with atomic_path(final, is_dir=True) as tmp:
        _write_folder(tmp, "new")
    assert sorted(p.name for p in final.iterdir()) == ["sub", "weights.bin"]
    assert (final / "sub" / "more.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_files_and_folder_are_flushed_before_the_rename(tmp_path, monkeypatch):
    from lte_convert import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    final = tmp_path / "ckpt"
    with atomic_path(final, is_dir=True) as tmp:
        _write_folder(tmp, "new")
    synced = [e[1] for e in events[:events.index(next(e for e in events if e[0] == "rename"))]]
    names = {Path(p).name for p in synced}
    assert {"weights.bin", "more.txt", "sub"} <= names, events
    assert any(".lte-tmp-" in Path(p).name for p in synced), events     # the folder itself
    assert events[-1] == ("fsync", str(tmp_path)), events              # then its parent

    events.clear()
    with atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"onnx")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"], events
    assert events[0][1].endswith("model.onnx") and events[2] == ("fsync", str(tmp_path))


def test_outputs_get_the_permissions_of_a_normal_save(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "ckpt", is_dir=True) as tmp:
            _write_folder(tmp, "new")
            os.chmod(tmp / "weights.bin", 0o600)           # as a mkstemp-based writer leaves it
        with atomic_path(tmp_path / "model.onnx") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777            # noqa: E731
    assert mode(tmp_path / "ckpt") == 0o755 and mode(tmp_path / "ckpt" / "sub") == 0o755
    assert mode(tmp_path / "ckpt" / "weights.bin") == 0o644
    assert mode(tmp_path / "ckpt" / "sub" / "more.txt") == 0o644
    assert mode(tmp_path / "model.onnx") == 0o644


def test_a_killed_writers_temporaries_are_cleaned_by_the_next_run(tmp_path):
    _run_killed("""
        import os, signal
        from pathlib import Path
        from lte_convert.atomic import atomic_path
        with atomic_path(Path(os.environ["OUT"]) / "model.onnx") as tmp:
            tmp.with_name("model.onnx.data").write_bytes(b"x" * 4096)   # half the weights
            os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    assert len(_hidden(tmp_path)) == 1 and leftovers(tmp_path / "model.onnx")
    other = tmp_path / "other.onnx"
    with atomic_path(other) as tmp:                      # another output: not its business
        tmp.write_bytes(b"other")
    assert len(_hidden(tmp_path)) == 1
    with atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"onnx")
    assert _hidden(tmp_path) == [] and (tmp_path / "model.onnx").read_bytes() == b"onnx"


def test_a_running_writers_temporaries_are_not_touched(tmp_path):
    with atomic_path(tmp_path / "model.onnx") as outer:
        outer.write_bytes(b"first")
        assert leftovers(tmp_path / "model.onnx") == []      # this process is alive
    assert (tmp_path / "model.onnx").read_bytes() == b"first"


def test_a_full_disk_is_a_disk_full_error_with_nothing_left(tmp_path):
    final = tmp_path / "ckpt"
    _write_folder(final, "old")
    with pytest.raises(DiskFull) as e:
        with atomic_path(final, is_dir=True) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "weights.bin"))
    assert e.value.exit_code == 3
    assert "disk is full" in str(e.value) and str(final) in str(e.value)
    assert os.listdir(tmp_path) == ["ckpt"] and (final / "weights.bin").read_text() == "old"


def test_a_real_full_disk(small_disk):
    disk = small_disk("1m")
    with pytest.raises(DiskFull, match="1.0 MB free"):
        with atomic_path(disk / "big.bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\0" * (2 << 20))
    assert os.listdir(disk) == []
