"""Triton kernels, one op per file (shipped in the wheel as ``calm_fast.kernels``).

Each module holds the ``@triton.jit`` kernel, its launcher and a pure-torch reference;
import them through ``calm_fast.ops``, which picks the kernel, the CPU path or the
reference. Importing this package never requires triton.
"""
