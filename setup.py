"""Build of fastedit's compiled extension `fastedit._C` (package metadata is in pyproject.toml).

    pip install --no-build-isolation -e ".[test]"

The sources come from csrc/sources.txt, the one list that CMakeLists.txt reads too; the header
describing the build is generated from csrc/build_config.h.in, also shared with CMakeLists.txt.
The extension is built with torch.utils.cpp_extension and ninja; its tensor ops register
themselves with the dispatcher (TORCH_LIBRARY) when `fastedit._C` is imported.

Environment switches, read at build time:
  FASTEDIT_SKIP_EXTENSION=1  build no extension at all: a pure-Python install (torch is not even
                             imported by this script). fastedit then uses its other backends.
  FASTEDIT_FORCE_CUDA=1      compile the CUDA kernels and bindings even where they would not be
                             compiled by default; fails with a clear message when torch is not a
                             CUDA build (the CPU wheel lacks torch's CUDA headers) or no CUDA
                             toolkit is found.
  FASTEDIT_NO_CUDA=1         never compile the CUDA sources (CPU-only extension on a CUDA torch).
  TORCH_CUDA_ARCH_LIST       CUDA architectures, e.g. "9.0" or "8.0;9.0". Default: those of the
                             visible GPUs, else "9.0" (H100/H200).
  FASTEDIT_DEBUG=1           -O0 -g instead of -O3.
  MAX_JOBS                   parallel compile jobs of ninja (torch's default: all cores).
By default the CUDA sources are compiled exactly when torch is a CUDA build (torch.version.cuda
is set) and torch finds a CUDA toolkit (torch.utils.cpp_extension.CUDA_HOME).

Language standards, given explicitly because torch's cpp_extension picks its own only when none is
given, and that default changed: torch 2.11 passes -std=c++17, torch 2.13 -std=c++20.
  C++ sources: -std=c++20 (/std:c++20 with MSVC) with every torch: the CPU kernels use C++20
               (std::bit_cast) and torch 2.13's headers require it; torch 2.11's compile under
               it too (checked by .ci/run). It needs std::bit_cast: GCC >= 11, Clang >= 14.
  CUDA sources: -std=c++17 for nvcc (not on Windows, where cpp_extension always passes its own):
               the kernels are plain C++17 (no torch header), as in CMakeLists.txt and .ci/run,
               so any CUDA toolkit torch supports (11.8 included, which has no C++20) compiles them.

Other C++ flags: -O3, -fno-math-errno (vectorisable sqrt), and -fopenmp when torch's intra-op parallel
backend is OpenMP: at::parallel_for is inlined from torch's headers and runs serially unless the
extension itself is compiled with OpenMP. -fopenmp is given to the compiler only, not to the
linker: the GOMP_*/omp_* symbols then resolve to the OpenMP runtime that libtorch_cpu already
loaded (torch's bundled libgomp), never to a second runtime with its own thread pool, so
torch.set_num_threads governs fastedit's kernels too.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
SOURCES_TXT = ROOT / "csrc" / "sources.txt"
CONFIG_TEMPLATE = ROOT / "csrc" / "build_config.h.in"
GENERATED_DIR = ROOT / "build" / "generated"
SECTIONS = ("common", "cpu", "cuda_kernels", "cuda_binding")
# The language standards (see the top of this file; CMakeLists.txt sets the same ones). Explicit,
# so that torch's cpp_extension does not choose (its default: -std=c++17 in 2.11, -std=c++20 in 2.13).
CXX_STD, CXX_STD_MSVC, NVCC_STD = "-std=c++20", "/std:c++20", "-std=c++17"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def read_sources(path: pathlib.Path = SOURCES_TXT) -> dict[str, list[str]]:
    """Parse csrc/sources.txt into {section: [paths relative to the repository root]}."""
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ";" in line:
            raise SystemExit(f"{path}:{number}: no ';' allowed (CMake would split the line)")
        match = re.fullmatch(r"\[(\w+)\]", line)
        if match:
            current = match.group(1)
            if current not in sections:
                raise SystemExit(f"{path}:{number}: unknown section [{current}]; known: {SECTIONS}")
            continue
        if current is None:
            raise SystemExit(f"{path}:{number}: source {line!r} before any [section]")
        if not (ROOT / line).is_file():
            raise SystemExit(f"{path}:{number}: {line} does not exist")
        sections[current].append(line)
    return sections


def read_version() -> str:
    """The version in pyproject.toml's [project] table (CMakeLists.txt reads it the same way)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    if not match:
        raise SystemExit("pyproject.toml: no version = \"...\" line")
    return match.group(1)


def write_build_config(values: dict[str, str]) -> pathlib.Path:
    """Fill csrc/build_config.h.in like CMake's configure_file(@ONLY); returns the folder."""
    text = CONFIG_TEMPLATE.read_text()

    def substitute(match: re.Match) -> str:
        return values[match.group(1)]

    text = re.sub(r"@(\w+)@", substitute, text)
    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    target = GENERATED_DIR / "fastedit_build_config.h"
    if not target.is_file() or target.read_text() != text:  # keep ninja's timestamps otherwise
        target.write_text(text)
    return GENERATED_DIR


def default_cuda_arch_list(torch) -> str:
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"


def extension_modules() -> tuple[list, dict]:
    if _flag("FASTEDIT_SKIP_EXTENSION"):
        print("fastedit: FASTEDIT_SKIP_EXTENSION is set, building no extension", file=sys.stderr)
        return [], {}

    import torch
    from torch.utils import cpp_extension

    sources = read_sources()
    torch_has_cuda = torch.version.cuda is not None
    cuda_home = cpp_extension.CUDA_HOME
    if _flag("FASTEDIT_NO_CUDA"):
        with_cuda = False
    elif _flag("FASTEDIT_FORCE_CUDA"):
        if not torch_has_cuda:
            raise SystemExit(
                f"fastedit: FASTEDIT_FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build: "
                "its wheel lacks the CUDA headers the bindings need. Install a CUDA build of torch.")
        if cuda_home is None:
            raise SystemExit("fastedit: FASTEDIT_FORCE_CUDA=1 but torch finds no CUDA toolkit: "
                             "set CUDA_HOME (the folder holding bin/nvcc)")
        with_cuda = True
    else:
        with_cuda = torch_has_cuda and cuda_home is not None

    if with_cuda and not (pathlib.Path(cuda_home) / "include" / "cuda_runtime_api.h").is_file():
        raise SystemExit(
            f"fastedit: torch found the CUDA toolkit at CUDA_HOME={cuda_home}, but it has no "
            "include/cuda_runtime_api.h (nvcc found through a wrapper script?). Set CUDA_HOME to "
            "the toolkit folder (e.g. /usr/local/cuda), or FASTEDIT_NO_CUDA=1 for a CPU-only build.")

    arch_list = ""
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_cuda_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # what cpp_extension compiles for
    generated = write_build_config({
        "FASTEDIT_VERSION": read_version(),
        "FASTEDIT_BUILD_SYSTEM": "setuptools",
        "FASTEDIT_WITH_CUDA": "1" if with_cuda else "0",
        "FASTEDIT_CUDA_ARCH_LIST": arch_list,
    })

    optimise = ["-O0", "-g"] if _flag("FASTEDIT_DEBUG") else ["-O3"]
    cxx_flags = [CXX_STD_MSVC if sys.platform.startswith("win") else CXX_STD] + optimise
    nvcc_flags = optimise + ["-lineinfo"]
    if not sys.platform.startswith("win"):  # there cpp_extension always adds its own -std to nvcc
        nvcc_flags.insert(0, NVCC_STD)
    if not sys.platform.startswith("win"):
        # sqrt without errno, so loops using it vectorise (the editor-step CPU kernel). GCC ignores this
        # flag in `#pragma GCC optimize`/attributes (builtins are declared once, at start-up),
        # so it has to be given here. NaN/Inf results are unchanged; only errno is never set.
        cxx_flags.append("-fno-math-errno")
    openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    if openmp and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # compile only: see the top of this file
    print(f"fastedit: building fastedit._C with torch {torch.__version__}, "
          f"CUDA sources: {'yes, archs ' + arch_list if with_cuda else 'no'}, "
          f"OpenMP: {'yes' if '-fopenmp' in cxx_flags else 'no'}", file=sys.stderr)

    files = sources["common"] + sources["cpu"]
    include_dirs = [str(ROOT / "csrc"), str(generated)]
    if with_cuda:
        files += sources["cuda_kernels"] + sources["cuda_binding"]
        extension = cpp_extension.CUDAExtension(
            name="fastedit._C",
            sources=files,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        extension = cpp_extension.CppExtension(
            name="fastedit._C",
            sources=files,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
