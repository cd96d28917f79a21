"""Build script: setuptools drives CMake (CMakeLists.txt) to compile the native backends.

``pip install .`` (or ``-e .``, or ``--no-build-isolation``) configures CMake once and builds the
pybind11 modules ``uhc_fast._native_cpu`` and, where nvcc is found, ``uhc_fast._native_cuda``
into the package directory. Environment switches:

- ``UHC_FAST_CUDA=1`` forces the CUDA backend on (the build fails without nvcc), ``=0`` skips it;
  unset, it is built when CMake finds a CUDA compiler.
- ``UHC_FAST_CUDA_ARCHS`` overrides the CUDA architectures (default ``80;90``).
- ``UHC_FAST_NATIVE=0`` skips the native build entirely (a pure-Python install: torch backend only).
- ``CMAKE_BUILD_PARALLEL_LEVEL`` sets the parallel jobs (default: all cores).
- ``CMAKE_ARGS`` adds arguments to the CMake configure step.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
_SWITCH = {
    "1": "ON",
    "on": "ON",
    "true": "ON",
    "yes": "ON",
    "0": "OFF",
    "off": "OFF",
    "false": "OFF",
    "no": "OFF",
    "": "AUTO",
    "auto": "AUTO",
}


class CMakeExtension(Extension):
    """A module CMake builds; the sources live in CMakeLists.txt, not here."""

    def __init__(self, name: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """Configure and build the CMake project once, writing every module next to the first one."""

    def build_extension(self, ext: Extension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        if getattr(self, "_uhc_built_into", None) == extdir:
            return
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("UHC_FAST_CUDA", "auto").strip().lower()
        if cuda not in _SWITCH:
            raise ValueError(f"UHC_FAST_CUDA={cuda!r}: expected 0, 1 or auto")
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DUHC_FAST_CUDA={_SWITCH[cuda]}",
        ]
        if os.environ.get("UHC_FAST_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['UHC_FAST_CUDA_ARCHS']}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)
        self._uhc_built_into = extdir

    def get_outputs(self) -> list[str]:
        # the CUDA module exists only where it was built: list what is there
        return [path for path in super().get_outputs() if Path(path).exists() or not self._is_optional(path)]

    def _is_optional(self, path: str) -> bool:
        return any(ext.optional and Path(path).name.startswith(ext.name.rsplit(".", 1)[-1]) for ext in self.extensions)

    def copy_extensions_to_source(self) -> None:
        # in-place / editable builds: skip the modules CMake did not build (no nvcc)
        kept = self.extensions
        built = lambda ext: (Path(self.build_lib) / self.get_ext_filename(ext.name)).exists()
        self.extensions = [ext for ext in kept if built(ext) or not ext.optional]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = kept


if os.environ.get("UHC_FAST_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
    ext_modules = []
else:
    ext_modules = [CMakeExtension("uhc_fast._native_cpu"), CMakeExtension("uhc_fast._native_cuda", optional=True)]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
