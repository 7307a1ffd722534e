"""Build hotpatch._native (the C core) with cffi; everything else is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["hotpatch/_build.py:ffibuilder"])
