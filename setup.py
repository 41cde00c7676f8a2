"""setup.py only drives CMake; CMakeLists.txt is the one description of the native build.

Environment switches (see docs/building.md):
  DEVIT_CUDA=auto|0|1     CUDA kernels: auto = iff nvcc is found; 1 = required; 0 = CPU only
  DEVIT_CUDA_ARCHS=...    CUDA architectures (default "80;87;89;90")
  MAX_JOBS=N              parallel build jobs (default: all CPUs)
  DEVIT_DEBUG=1           Debug build of the native module
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "devit_ext" / "_version.py").read_text()
    return re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        try:  # the `cmake` build dependency (pyproject.toml) ships the binary
            import cmake

            exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise RuntimeError("building devit_ext needs CMake >= 3.18: pip install cmake") from None
    return exe


def _ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe is None:
        try:
            import ninja

            exe = os.path.join(ninja.BIN_DIR, "ninja")
        except ImportError:
            return None
    return exe


def _pybind11_cmakedir() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pybind11", "--cmakedir"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if (self.debug or os.environ.get("DEVIT_DEBUG", "0") not in ("", "0")) else "Release"
        cuda_mode = os.environ.get("DEVIT_CUDA", "auto") or "auto"
        archs = os.environ.get("DEVIT_CUDA_ARCHS") or "80;87;89;90"
        # One CMake tree per interpreter and switch setting: incremental rebuilds,
        # and no stale cache from another virtual environment or DEVIT_CUDA value.
        key = hashlib.sha1(f"{sys.executable}|{cuda_mode}|{archs}|{cfg}".encode()).hexdigest()[:10]
        build_temp = Path(self.build_temp).resolve() / f"{ext.name}-{key}"
        build_temp.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmakedir()}",
            f"-DDEVIT_VERSION={_version()}",
            f"-DDEVIT_CUDA={cuda_mode}",
            f"-DDEVIT_CUDA_ARCHS={archs}",
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        args.append(f"-DDEVIT_NVCC_THREADS={jobs}")
        ninja = _ninja()
        if ninja and not os.environ.get("CMAKE_GENERATOR"):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]

        cmake = _cmake()
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_temp), *args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "--config", cfg, "-j", jobs], check=True)


setup(
    # Every package under devit_ext/ is found, so a new subpackage cannot be left out of the wheel;
    # kernels/ sits at the top level (the design card) and installs as devit_ext.kernels.
    packages=find_packages(include=["devit_ext", "devit_ext.*"], exclude=["devit_ext.kernels"]) + ["devit_ext.kernels"],
    package_dir={"devit_ext": "devit_ext", "devit_ext.kernels": "kernels"},
    ext_modules=[CMakeExtension("devit_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
