"""Builds dlrm_ops with CMake + ninja (see CMakeLists.txt).

Environment: DEBUG=1 for a debug build, SANITIZE=1 for ASan/UBSan,
MAX_JOBS=N to cap build parallelism, CUDA_ARCHS="80;90" for the GPU
architectures of the CUDA kernels (built when torch has CUDA).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # One CMake project builds every extension of the package.
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).parent.resolve()
        debug = os.environ.get("DEBUG", "0") == "1"
        sanitize = os.environ.get("SANITIZE", "0") == "1"
        build_type = "Debug" if debug else "Release"
        build_dir = ROOT / "build" / (build_type.lower() + ("-asan" if sanitize else ""))
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
            f"-DDLRM_OPS_SANITIZE={'ON' if sanitize else 'OFF'}",
            f"-DDLRM_OPS_VERSION={VERSION}",
        ]
        if os.environ.get("CUDA_ARCHS"):  # e.g. "90" to build for the H100 alone
            cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCHS']}")
        subprocess.check_call(cfg)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        # Each configuration builds in its own folder; the package gets a copy,
        # so switching between release, debug and sanitizer builds is exact.
        out_dir.mkdir(parents=True, exist_ok=True)
        for lib in (build_dir / "lib").glob("*.so"):
            shutil.copyfile(lib, out_dir / lib.name)


setup(
    name="dlrm_ops",
    version=VERSION,
    description="Native CPU/CUDA kernels for DLRM-style recommendation models on PyTorch",
    packages=find_packages(include=["dlrm_ops", "dlrm_ops.*"]),
    ext_modules=[CMakeExtension("dlrm_ops._C"), CMakeExtension("dlrm_ops._kernels")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.13", "numpy", "scikit-learn", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "matplotlib"],
        "plot": ["matplotlib"],
        "fbgemm": ["fbgemm-gpu-cpu==1.8.0"],
    },
    entry_points={"console_scripts": ["dlrm-ops=dlrm_ops.__main__:main"]},
    zip_safe=False,
)
