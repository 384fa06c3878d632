"""Builds lopt_kernels._C from csrc/ when a CUDA toolkit and a CUDA build of torch are present."""

from setuptools import setup

setup()
