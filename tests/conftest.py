import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CPU op plans with the fallback constants: measuring each tiny test shape would cost
# seconds each (tests/plugins/test_cpu_tuning.py turns calibration on where it is tested).
os.environ.setdefault("LTE_CONVERT_CPU_CALIBRATE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def small_disk(tmp_path):
    """small_disk("1m") -> an empty tmpfs of that size (a full disk for real). Needs root to
    mount; skips elsewhere (tests/lte_convert/test_atomic.py simulates ENOSPC everywhere)."""
    mounted = []

    def make(size: str):
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                           capture_output=True)
        if r.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(disk)
        return disk
    yield make
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)
