"""vLLM plugin entry point (``vllm.general_plugins`` → ``quantease``).

vLLM calls ``register()`` once in every process (API server, engine core,
workers) before models are built. It only imports the module whose decorator
registers the ``quantease`` quantization method: no CUDA initialisation, no
Triton import, safe to call twice.
"""


def register() -> None:
    import qe_vllm.vllm_method  # noqa: F401  (registration happens at import)
