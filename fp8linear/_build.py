"""Find `kernels/`, compile it for this device on first CUDA use, cache it, load it.

Loading the shared library runs its `TORCH_LIBRARY_IMPL(fp8linear, CUDA, m)` block, which registers the
CUDA implementation of the ops that `fp8linear.ops` defines. Nothing here runs at import.

Cache: `$FP8LINEAR_CACHE_DIR` (default `~/.cache/fp8linear`), one folder per (source hash, arch, torch
version, CUDA version); `torch.utils.cpp_extension` rebuilds there when sources or flags change.

`python -m fp8linear._build --compile-only [--arch 90a]` compiles every `kernels/*.cu` to an object
file without a GPU (what CI does): the CPU wheel of torch lacks one generated header,
`c10/cuda/impl/cuda_cmake_macros.h`, for which a one-line stub stands in.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

__all__ = ["kernels_dir", "kernel_sources", "ensure_loaded", "is_loaded", "cache_dir", "cuda_arch", "KernelBuildError"]

_REQUIRED = ("per_token_group_quant.cu", "common.cuh")
_lock = threading.Lock()
_loaded = False


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


def kernel_sources() -> list[pathlib.Path]:
    """Every .cu file to compile and link into the one extension."""
    return sorted(kernels_dir().glob("*.cu"))


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


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(kernels_dir().iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def is_loaded() -> bool:
    return _loaded


def ensure_loaded() -> None:
    """Build (once per cache key) and load the CUDA kernels; thread-safe, a no-op once loaded."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
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
        flags_hash = hashlib.sha256(" ".join(nvcc_flags(arch)).encode()).hexdigest()[:8]
        key = f"{_source_hash()}-{flags_hash}-sm{arch}-torch{torch.__version__}-cuda{torch.version.cuda}"
        key = key.replace("+", "_").replace(".", "_")
        build_dir = cache_dir() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        verbose = os.environ.get("FP8LINEAR_VERBOSE_BUILD", "0") not in ("", "0")
        try:
            cpp_extension.load(
                name="fp8linear_kernels_" + key[:25].replace("-", "_"),
                sources=[str(p) for p in kernel_sources()],
                extra_cuda_cflags=nvcc_flags(arch),
                extra_cflags=["-O3", "-std=c++17"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # cpp_extension raises RuntimeError/OSError/CalledProcessError
            raise KernelBuildError(
                f"building fp8linear's CUDA kernels for sm_{arch} in {build_dir} failed: {exc}. "
                "Set FP8LINEAR_VERBOSE_BUILD=1 for the compiler's output; CPU tensors still use the reference path."
            ) from exc
        _loaded = True


def compile_only(arch: str = "90a", out_dir: "pathlib.Path | None" = None) -> list[pathlib.Path]:
    """Compile each kernels/*.cu to an object file with nvcc, no GPU needed; returns the objects."""
    from torch.utils import cpp_extension

    out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="fp8linear-cc-"))
    stub = out_dir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    # The CPU wheel lacks this generated header; an empty one is enough to compile (DESIGN.md).
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{out_dir / 'stub'}"]
    import sysconfig

    includes.append(f"-I{sysconfig.get_paths()['include']}")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    objects = []
    for src in kernel_sources():
        obj = out_dir / (src.stem + ".o")
        cmd = [nvcc, "-c", str(src), "-o", str(obj), "-Xcompiler", "-fPIC", *nvcc_flags(arch), *includes,
               "-DTORCH_EXTENSION_NAME=fp8linear_kernels", "-D_GLIBCXX_USE_CXX11_ABI=1"]
        print("nvcc", src.name, f"sm_{arch}", flush=True)
        subprocess.run(cmd, check=True)
        objects.append(obj)
    return objects


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="nvcc -c every kernels/*.cu; no GPU needed")
    parser.add_argument("--arch", default="90a", help="nvcc arch suffix (default 90a: Hopper)")
    args = parser.parse_args(argv)
    if not args.compile_only:
        parser.error("only --compile-only is supported from the command line")
    objects = compile_only(args.arch)
    print(f"compiled {len(objects)} kernel source(s) for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
