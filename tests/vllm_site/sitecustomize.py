"""Hide AMX from vLLM's CPU attention in every process the tests start.

On the CI machine (a VM whose CPU reports amx_tile/amx_bf16), vLLM 0.32's CPU attention
picks its AMX kernel for bfloat16 (``vllm/v1/attention/backends/cpu_attn.py::_get_attn_isa``)
and that kernel returns wrong tokens even for the unquantized model (SmolLM2 answers
"L'Étoile, la Marseillaise…" to "What is the capital of France?") or kills the engine
with SIGILL. Without AMX the same vLLM picks its AVX-512 kernel and answers "Paris".
The bug is upstream and independent of our plugin (docs/SERVING.md, "AMX machines"), so
the tests route around it rather than weaken their oracles. ``tests/conftest.py`` puts
this directory on ``PYTHONPATH`` only when torch reports AMX.
"""

import torch

torch.cpu._is_amx_tile_supported = lambda: False
