"""``qe-convert`` in which process ``RANK`` dies (``os._exit``) as it starts block ``DIE_AT_BLOCK``.

A stand-in for a process killed by the OOM killer or a lost node, for
tests/converters/test_distributed.py: ``python -m tests.helpers.dying_rank RANK
DIE_AT_BLOCK qe-convert-arguments...``, one per process, with the environment
torchrun would set (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import os
import sys

from qe_vllm.cli import convert as cli
from qe_vllm.converters import pipeline


def main() -> int:
    dying, at_block, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    real = pipeline.quantize_block

    def quantize_block(block, opts, device, acts, call, label, ranks):
        if ranks.rank == dying and label.endswith(f".{at_block}"):
            os._exit(17)
        return real(block, opts, device, acts, call, label, ranks)

    pipeline.quantize_block = quantize_block
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
