"""Offline conversion: calibration, solvers, packing and checkpoint writing (no vLLM import)."""
