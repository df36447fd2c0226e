"""lte-convert: Learn-To-be-Efficient structured FFN sparsity for Hugging Face models.

The import root. The rooms live in folders at the repository root and are installed under
this package (pyproject.toml maps them):

    lte_convert.converter    converter/     adapters, grouping, routers, training, folding
    lte_convert.plugins      plugins/       the lte.SparseFFN op: spec, reference, CPU, Triton
    lte_convert.exporters    exporters/     ONNX export and validation
    lte_convert.trt_plugins  trt_plugins/   TensorRT plugin and engine builder

Above them, the application layer: `lte_convert.cli` (the `lte-convert` click group) and
`lte_convert.commands` (one module per command), plus `lte_convert.bench_decode`. The rooms
never import it.

Below them: `lte_convert.errors`, `lte_convert.atomic`, `lte_convert.checks` (path and option
checks), `lte_convert.loading` (a model folder to train) and `lte_convert.default` (the
embedded model and text).
"""
from pathlib import Path

_ROOMS = ("converter", "plugins", "exporters", "trt_plugins")


def _source_checkout() -> Path | None:
    """The repository root when this package runs from a source checkout (not installed),
    so `PYTHONPATH=.` works there too; None in an installed wheel."""
    here = Path(__file__).resolve().parent
    if (here / "plugins").is_dir():
        return None
    root = here.parent
    if all((root / room / "__init__.py").is_file() for room in _ROOMS) and (
            root / "pyproject.toml").is_file():
        return root
    return None


_root = _source_checkout()
if _root is not None:
    __path__.append(str(_root))  # noqa: F821  (the package's own __path__)
