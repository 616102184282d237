"""Build script: the Cython extension is added here by the Cython backend."""
from setuptools import setup

setup()
