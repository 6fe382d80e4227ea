"""Triton kernels, installed as medvl.kernels. Import needs triton; medvl.ops imports these lazily."""
