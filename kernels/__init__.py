"""Linear-layer kernels for QuantEase weights: torch reference and Triton (no vLLM import)."""
