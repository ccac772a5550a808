"""``tests/helpers/layers.py`` for the benchmarks: random packed layers and their error bound.

That file is test code, not shipped in the package. It is loaded by its path rather
than by putting ``tests/`` on ``sys.path``, where the ``tests/qe_vllm`` directory would
shadow an editable install of ``qe_vllm``. Benchmarks run as ``python benchmarks/X.py``,
so this module sits on their path.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

TEST_LAYERS = Path(__file__).resolve().parent.parent / "tests" / "helpers" / "layers.py"


@functools.cache
def layer_helpers() -> ModuleType:
    """The module ``tests/helpers/layers.py`` (``random_layer``, ``error_bound``), loaded once."""
    spec = importlib.util.spec_from_file_location("qe_test_layers", TEST_LAYERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
