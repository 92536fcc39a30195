"""Builds rlkernels._C.

CPU kernels are always compiled. CUDA kernels (csrc/cuda/*.cu) are compiled when torch was built with
CUDA and nvcc is found, unless RLKERNELS_SKIP_CUDA_BUILD=1; RLKERNELS_FORCE_CUDA_BUILD=1 makes a missing
toolkit an error instead of a silent CPU-only build. TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX") picks the
GPU architectures, MAX_JOBS the number of parallel compile jobs.

The compiled library links against libtorch's C++ API, which has no stable ABI across torch releases: the
build pins the wheel's torch requirement to the release it was compiled against (torch==X.Y.*) and writes
rlkernels/_build_info.py, which the package reads to say which torch it needs when the library fails to
load. Objects go to build/temp.<platform>-<python> for every kind of build (editable installs included, which
setuptools would otherwise compile in a throwaway directory), so a wheel built after an editable install of
the same tree only links: ninja skips the unchanged objects.
"""

import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME as set, else the toolkit that owns nvcc (torch guesses /usr/local for /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        return os.path.dirname(os.path.dirname(real))
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

TORCH_VERSION = torch.__version__.split("+")[0]  # "2.14.1" of "2.14.1+cu130"
TORCH_RELEASE = ".".join(TORCH_VERSION.split(".")[:2])  # "2.14"


def _pip_cuda_include_dirs():
    """Headers such as cusparse.h that ATen/cuda pulls in ship only with the pip CUDA wheels."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cusparse/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _want_cuda(cu_sources):
    if _truthy("RLKERNELS_SKIP_CUDA_BUILD"):
        return False
    force = _truthy("RLKERNELS_FORCE_CUDA_BUILD")
    reasons = []
    if not cu_sources:
        reasons.append("no csrc/cuda/*.cu sources")
    if torch.version.cuda is None:
        reasons.append("torch was built without CUDA")
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons and force:
        sys.exit("RLKERNELS_FORCE_CUDA_BUILD=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        print("rlkernels: building CPU kernels only: " + "; ".join(reasons))
    return not reasons


def write_build_info(with_cuda: bool) -> None:
    """rlkernels/_build_info.py: what the compiled library was built against (read at import time)."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    text = (
        '"""Written by setup.py at build time: what rlkernels._C was compiled against. Not in git."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_RELEASE = {TORCH_RELEASE!r}\n"
        f"TORCH_CUDA = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch!r}\n"
    )
    path = os.path.join(ROOT, "rlkernels", "_build_info.py")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:  # unchanged: keep the mtime
                return
    with open(path, "w") as f:
        f.write(text)


def extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -march: the SIMD kernels are compiled once per instruction set in their own translation units
    # (csrc/cpu/simd_<level>.cpp, scan_block_<level>.cpp, each switching its target with a pragma) and chosen at
    # run time (csrc/cpu/isa.h), so the wheel also runs on CPUs without AVX-512. -O3 for the loops left to the
    # compiler (the float64 and float16 paths).
    # -fopenmp: at::parallel_for is a header template that runs serially unless the including code is
    # compiled with OpenMP (_OPENMP defines ATen's INTRA_OP_PARALLEL). The library then needs libgomp.so.1,
    # which torch already loaded from torch/lib (rlkernels imports torch first), so the loader reuses that one
    # runtime by its soname: one thread pool, sized by torch.set_num_threads.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-Wno-psabi", "-DPy_LIMITED_API=0x030A0000", *openmp]
    # Python's own CFLAGS carry -g: host debug info is 14 of the library's 15 MB. Drop it at link time
    # (objects keep it; RLKERNELS_KEEP_DEBUG=1 keeps it in the library). Device code keeps its -lineinfo.
    link_args = ([] if _truthy("RLKERNELS_KEEP_DEBUG") else ["-Wl,--strip-debug"]) + openmp
    if _truthy("RLKERNELS_SANITIZE"):  # scripts/sanitize.sh: AddressSanitizer and UndefinedBehaviorSanitizer
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx_flags = [*cxx_flags, "-O1", "-g", *sanitize]
        link_args = [*sanitize, *openmp]
    define_macros = []
    with_cuda = _want_cuda(cu_sources)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    write_build_info(with_cuda)
    if with_cuda:
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "rlkernels._C",
                cpp_sources + cu_sources,
                include_dirs=include_dirs + _pip_cuda_include_dirs(),
                define_macros=define_macros + [("RLKERNELS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_args,
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "rlkernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
            py_limited_api=True,
        )
    ]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with one fixed object directory for every kind of build.

    setuptools compiles editable installs in a temporary directory that it deletes afterwards; here the
    objects of `pip install -e .`, `pip install .` and `pip wheel .` all live in build/temp.<plat>-<tag>,
    where ninja finds them up to date and recompiles only what changed (it also tracks the command lines,
    so a CUDA and a CPU-only build never mix objects).
    """

    def finalize_options(self):
        if self.build_temp is None:
            tag = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(ROOT, "build", tag)
        super().finalize_options()


setup(
    ext_modules=extensions(),
    # The library only loads into the torch release it was compiled against (libtorch has no stable C++ ABI).
    install_requires=[f"torch=={TORCH_RELEASE}.*", "numpy"],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
