"""Fused Triton kernels (installed as ``uhc_fast.kernels``)."""
