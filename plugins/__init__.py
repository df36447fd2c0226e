"""The structured-sparse FFN op for PyTorch. Importing this package registers
torch.ops.lte.sparse_ffn, lte.sparse_ffn_up and lte.sparse_ffn_down (plugins/ops.py)."""
from lte_convert.plugins import ops  # noqa: F401  (registers the custom ops)
