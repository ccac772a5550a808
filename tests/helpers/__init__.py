"""Code shared by the tests (and, for ``layers``, the kernel benchmarks); not shipped.

Importable as ``helpers.*`` because ``tests/`` is on ``sys.path`` (``pythonpath`` in
``pyproject.toml``). Fixtures live in ``tests/conftest.py``, not here. See tests/README.md.
"""
