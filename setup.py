"""Build script. The native extension (CMake + pybind11) is added by the native-backend work."""

from setuptools import setup

setup()
