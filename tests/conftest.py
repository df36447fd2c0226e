import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CPU op plans with the fallback constants: measuring each tiny test shape would cost
# seconds each (tests/plugins/test_cpu_tuning.py turns calibration on where it is tested).
os.environ.setdefault("LTE_CONVERT_CPU_CALIBRATE", "0")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
