"""Find `kernels/`, compile it for this device on first CUDA use, cache it, load it.

`kernels/` builds two libraries:
- `main` (`ensure_loaded()`): the quant kernel, the fused prologues, small_m, and the cuBLASLt and DeepGEMM
  launches; every source of the folder but sm90's.
- `sm90` (`ensure_loaded("sm90")`): our Hopper GEMM (`sm90_linear.cu`, `sm90_bindings.cpp`), compiled only
  the first time its backend runs.
Loading a library runs its `TORCH_LIBRARY_IMPL(fp8linear, CUDA, m)` block (`bindings.cpp`,
`sm90_bindings.cpp`), which registers the CUDA implementation of ops that fp8linear's Python modules define.
Nothing here runs at import.

Cache: `$FP8LINEAR_CACHE_DIR` (default `~/.cache/fp8linear`), one folder per library, sources folder, flags,
arch, torch and CUDA version. The kernels' translation units include no torch header (only the binding files
do), and `torch.utils.cpp_extension`'s ninja build recompiles only the translation units whose source or
included headers changed (it records each object's header dependencies), then relinks.
`FP8LINEAR_VERBOSE_BUILD=1` prints the compiler's output.

`python -m fp8linear._build --compile-only [--arch 90a]` compiles every source of both libraries to an object
file without a GPU (what CI does): the kernels' files with nvcc against the CUDA headers alone (a torch include
there fails the build), the binding files with the host compiler against torch's headers. The CPU wheel of
torch lacks one generated header, `c10/cuda/impl/cuda_cmake_macros.h`, for which a one-line stub stands in.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

__all__ = ["LIBRARIES", "kernels_dir", "library_sources", "ensure_loaded", "cache_dir", "cuda_arch",
           "KernelBuildError"]

#: The sources of the sm90 library; the main library is every other .cu and .cpp of kernels/.
_SM90_SOURCES = ("sm90_linear.cu", "sm90_bindings.cpp")
LIBRARIES = ("main", "sm90")
_REQUIRED = ("per_token_group_quant.cu", "bindings.cpp", "common.cuh", "launchers.h", *_SM90_SOURCES)
_lock = threading.Lock()
_loaded: set[str] = set()


class KernelBuildError(RuntimeError):
    """The CUDA kernels could not be built or loaded (the CPU reference path still works)."""


def kernels_dir() -> pathlib.Path:
    """`<repo>/kernels` in a checkout or editable install, `fp8linear/_kernels` inside a wheel."""
    here = pathlib.Path(__file__).resolve().parent
    tried = [here.parent / "kernels", here / "_kernels"]
    for path in tried:
        if all((path / name).is_file() for name in _REQUIRED):
            return path
    raise KernelBuildError(
        f"fp8linear's CUDA sources ({', '.join(_REQUIRED)}) were not found; tried: "
        + ", ".join(str(p) for p in tried)
    )


def _check_library(library: str) -> None:
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {', '.join(map(repr, LIBRARIES))}; got {library!r}")


def library_sources(library: str = "main") -> list[pathlib.Path]:
    """The .cu and .cpp files compiled and linked into `library` ("main" or "sm90")."""
    _check_library(library)
    folder = kernels_dir()
    if library == "sm90":
        return [folder / name for name in _SM90_SOURCES]
    return sorted(p for p in folder.iterdir() if p.suffix in (".cu", ".cpp") and p.name not in _SM90_SOURCES)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FP8LINEAR_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fp8linear")


def cuda_arch(capability: tuple[int, int]) -> str:
    """nvcc arch suffix for a compute capability: the 'a' targets (wgmma, setmaxnreg) on 9.0 and 10.x."""
    major, minor = capability
    if (major, minor) < (8, 9):
        raise KernelBuildError(
            f"fp8linear's kernels need compute capability >= 8.9 (hardware FP8 conversion); this GPU is "
            f"{major}.{minor}. Use CPU tensors for the reference path."
        )
    return f"{major}{minor}a" if major in (9, 10) else f"{major}{minor}"


def nvcc_flags(arch: str) -> list[str]:
    # No --use_fast_math: the quantization must match the CPU reference bit for bit (DESIGN.md).
    return ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--expt-relaxed-constexpr", "-lineinfo"]


#: The host compiler's flags for the binding files (torch.utils.cpp_extension adds -fPIC and -std=c++20, the
#: standard torch's headers are written for).
_CXX_FLAGS = ["-O3"]


def ensure_loaded(library: str = "main") -> None:
    """Build (incrementally, once per cache key) and load `library` ("main" or "sm90"); thread-safe, a no-op
    once loaded."""
    _check_library(library)
    if library in _loaded:
        return
    with _lock:
        if library in _loaded:
            return
        import torch
        from torch.utils import cpp_extension

        if not torch.cuda.is_available():
            raise KernelBuildError("fp8linear's CUDA kernels need a CUDA device; none is available")
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            raise KernelBuildError(
                "fp8linear compiles its CUDA kernels on first use and needs nvcc (CUDA toolkit), found neither "
                "nvcc on PATH nor CUDA_HOME. Install the CUDA toolkit, or use CPU tensors for the reference path."
            )
        arch = cuda_arch(torch.cuda.get_device_capability())
        # The key names no source hash: ninja rebuilds what changed inside the folder. It does name the sources'
        # folder, so that two checkouts sharing a cache do not rebuild each other's objects in turn.
        digest = hashlib.sha256(
            "\n".join([str(kernels_dir()), *nvcc_flags(arch), *_CXX_FLAGS]).encode()
        ).hexdigest()[:12]
        key = f"{library}-{digest}-sm{arch}-torch{torch.__version__}-cuda{torch.version.cuda}"
        build_dir = cache_dir() / key.replace("+", "_")
        build_dir.mkdir(parents=True, exist_ok=True)
        verbose = os.environ.get("FP8LINEAR_VERBOSE_BUILD", "0") not in ("", "0")
        try:
            cpp_extension.load(
                name=f"fp8linear_{library}",
                sources=[str(p) for p in library_sources(library)],
                extra_cuda_cflags=nvcc_flags(arch),
                extra_cflags=_CXX_FLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # cpp_extension raises RuntimeError/OSError/CalledProcessError
            raise KernelBuildError(
                f"building fp8linear's CUDA library {library!r} for sm_{arch} in {build_dir} failed: {exc}. "
                "Set FP8LINEAR_VERBOSE_BUILD=1 for the compiler's output; CPU tensors still use the reference path."
            ) from exc
        _loaded.add(library)


def _compile_commands(arch: str, out_dir: pathlib.Path) -> list[tuple[pathlib.Path, list[str]]]:
    """(object, command) for every source of both libraries, as the first-use build compiles them."""
    import torch
    from torch.utils import cpp_extension

    stub = out_dir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    # The CPU wheel lacks this generated header; an empty one is enough to compile (DESIGN.md).
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{out_dir / 'stub'}", f"-I{sysconfig.get_paths()['include']}"]
    defines = ["-DTORCH_EXTENSION_NAME=fp8linear_main", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    commands = []
    for library in LIBRARIES:
        for src in library_sources(library):
            obj = out_dir / f"{library}-{src.name}.o"
            if src.suffix == ".cu":  # the kernels: CUDA headers only
                flags = [*nvcc_flags(arch), *cpp_extension.COMMON_NVCC_FLAGS]
            else:  # the torch glue: nvcc hands a .cpp to the host compiler, with the CUDA headers' path
                flags = ["-std=c++20", *_CXX_FLAGS, *includes, *defines]
            commands.append((obj, [nvcc, "-c", str(src), "-o", str(obj), "-Xcompiler", "-fPIC", *flags]))
    return commands


def compile_only(arch: str = "90a", out_dir: "pathlib.Path | None" = None, jobs: int = 0) -> list[pathlib.Path]:
    """Compile every source of both libraries to an object file, `jobs` at a time (0: one per CPU), no GPU
    needed; prints each file's compile time and returns the objects."""
    out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="fp8linear-cc-"))
    commands = _compile_commands(arch, out_dir)

    def run(obj: pathlib.Path, cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        futures = {pool.submit(run, obj, cmd): obj for obj, cmd in commands}
        for future in concurrent.futures.as_completed(futures):
            print(f"compiled {futures[future].name} for sm_{arch} in {future.result():.1f} s", flush=True)
    return [obj for obj, _ in commands]


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="compile every source of kernels/; no GPU needed")
    parser.add_argument("--arch", default="90a", help="nvcc arch suffix (default 90a: Hopper)")
    parser.add_argument("--jobs", type=int, default=0, help="compilers run at once (default: one per CPU)")
    args = parser.parse_args(argv)
    if not args.compile_only:
        parser.error("only --compile-only is supported from the command line")
    start = time.perf_counter()
    objects = compile_only(args.arch, jobs=args.jobs)
    print(f"compiled {len(objects)} source(s) for sm_{args.arch} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
