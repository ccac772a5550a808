"""QuantEase for vLLM.

Import-light on purpose: ``qe_vllm`` itself never imports vLLM. The vLLM
method lives in ``qe_vllm.vllm_method`` and is registered through the
``vllm.general_plugins`` entry point (``qe_vllm.plugin:register``).
"""

__version__ = "0.1.0"
