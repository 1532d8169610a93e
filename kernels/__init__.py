"""Triton kernels of ride_fast, installed as `ride_fast_kernels` (PyPI has a project named `kernels`).

Launchers and autograd Functions import torch and triton only; they never see a config object.
"""
