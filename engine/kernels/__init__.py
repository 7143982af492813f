"""Triton kernels: compiled for CUDA, or run by Triton's interpreter on the CPU when TRITON_INTERPRET=1 was set
before these modules were imported (the tests do so)."""
