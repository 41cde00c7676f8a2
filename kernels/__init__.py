"""Triton kernels of devit_ext (installed as devit_ext.kernels)."""
