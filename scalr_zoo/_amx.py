"""bfloat16 linear layers on Intel AMX when oneDNN cannot use AMX.

Some virtual machines expose AMX (the ``amx_*`` cpuid flags, and the OS
grants the tile state) but report an empty AMX palette leaf (cpuid 0x1D).
oneDNN builds its tile configuration from that leaf and dies on its first
tile instruction, so :mod:`scalr_zoo._platform` caps it at AVX512-BF16, where
bfloat16 products run *slower* than float32 ones. The tiles themselves work
with the standard palette 1 (8 tiles of 16 rows x 64 bytes), which
``kernels/amx_linear.c`` configures itself: it multiplies bf16 rows by a
prepacked bf16 weight with float32 accumulation, 4-8x faster than the
capped oneDNN on such machines.

The C file is compiled on first use with the system C compiler (``$CC``, else
``gcc``/``cc``; about a second), cached under ``<scalr_zoo cache>/kernels/``,
and run once in a child process on a small product checked against torch
before this process loads it, so a CPU or compiler that cannot run it costs
a fallback to torch, never a crash. The fast engine uses it for bfloat16 on
the CPU when all of that holds and oneDNN is capped below AMX
(``ONEDNN_MAX_CPU_ISA``). ``SCALR_ZOO_AMX_KERNEL=0`` switches it off, ``=1``
uses it whenever it works, even next to an AMX-enabled oneDNN.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from ._platform import cpu_flags

__all__ = ["BLOCK", "AmxKernels", "amx_cpu", "amx_kernel", "load_amx_kernel", "pack_weight"]

logger = logging.getLogger(__name__)

#: K and N of a product must be multiples of this (the tile width in bf16 pairs x 2).
BLOCK = 32
_SOURCE = Path(__file__).with_name("kernels") / "amx_linear.c"
_FLAGS = ["-O3", "-shared", "-fPIC", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512vl", "-mavx512bf16"]
_LIBS = ["-lpthread", "-lm"]
_REQUIRED_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512f", "avx512_bf16"}
_SELF_TEST = (
    "import sys, torch\n"
    "from scalr_zoo._amx import AmxKernels\n"
    "sys.exit(0 if AmxKernels(sys.argv[1]).self_test() else 1)\n"
)

_lock = threading.Lock()
_loaded: dict[tuple[str, str], AmxKernels | None] = {}


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight ``(N, K)`` in the kernel's bf16 layout ``(N/16, K/32, 16, 16, 2)``.

    Tile (n, k) holds rows ``16n..16n+15`` of ``weight`` and columns
    ``32k..32k+31`` as 16 rows of column pairs (AMX's VNNI layout for
    ``tdpbf16ps``): element ``[n, k, r, c, p] = weight[16n + c, 32k + 2r + p]``.
    """
    n, k = weight.shape
    if n % BLOCK or k % BLOCK:
        raise ValueError(f"the AMX kernel needs both sizes of the weight to be multiples of {BLOCK}, got {n} x {k}")
    tiles = weight.detach().to(torch.bfloat16).view(n // 16, 16, k // BLOCK, 16, 2)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


class AmxKernels:
    """The compiled kernels (``kernels/amx_linear.c``), loaded with ctypes.

    Args:
        library: path of the compiled shared library.
    """

    def __init__(self, library: str | os.PathLike) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._lib.scalr_amx_init.restype = ctypes.c_int
        self._lib.scalr_amx_linear.restype = ctypes.c_int
        self._lib.scalr_amx_linear.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        self._lib.scalr_layernorm_bf16.restype = ctypes.c_int
        self._lib.scalr_layernorm_bf16.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        if self._lib.scalr_amx_init() != 0:
            raise OSError("the kernel refused AMX tile state to this process (arch_prctl)")

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        *,
        accumulate: bool = False,
        relu: bool = False,
    ) -> torch.Tensor:
        """``out = [relu](x @ W.T + bias)`` (bf16 ``out``) or, with ``accumulate``, ``out += x @ W.T + bias``
        (float32 ``out``); products accumulate in float32.

        Args:
            x: ``(M, K)`` contiguous bf16 CPU rows.
            packed: :func:`pack_weight` of the ``(N, K)`` weight.
            bias: ``(N,)`` contiguous float32, or None.
            out: ``(M, N)`` contiguous, bf16 or (``accumulate``) float32.
        """
        m, k = x.shape
        n = packed.shape[0] * 16
        if (
            x.dtype != torch.bfloat16
            or not x.is_contiguous()
            or packed.shape[1] * BLOCK != k
            or out.shape != (m, n)
            or not out.is_contiguous()
            or out.dtype != (torch.float32 if accumulate else torch.bfloat16)
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()))
            or (accumulate and relu)
        ):
            raise ValueError("AmxKernels.linear: bad shapes, dtypes or layouts (see the docstring)")
        status = self._lib.scalr_amx_linear(
            x.data_ptr(), m, k, packed.data_ptr(), n, None if bias is None else bias.data_ptr(),
            out.data_ptr(), 1 if accumulate else 0, 1 if relu else 0, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the AMX kernel could not allocate its row buffer")
        return out

    def layernorm(self, x: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        """``out`` (bf16) = LayerNorm of the rows of ``x`` without affine: ``(x - mean) / sqrt(var + eps)``.

        Two passes over each row in float32 (no cancellation for rows with a
        large mean), one rounding to bf16.

        Args:
            x: ``(M, C)`` contiguous float32 CPU rows, C a multiple of 16.
            eps: added to the variance.
            out: ``(M, C)`` contiguous bf16.
        """
        m, c = x.shape
        if (
            x.dtype != torch.float32
            or not x.is_contiguous()
            or out.shape != x.shape
            or out.dtype != torch.bfloat16
            or not out.is_contiguous()
            or self._lib.scalr_layernorm_bf16(x.data_ptr(), m, c, eps, out.data_ptr(), torch.get_num_threads()) != 0
        ):
            raise ValueError("AmxKernels.layernorm: bad shapes, dtypes or layouts (see the docstring)")
        return out

    def self_test(self) -> bool:
        """Whether both epilogues of the product (on ragged rows) and the row norm match torch."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(77, 64, generator=gen).to(torch.bfloat16)
        weight = torch.randn(96, 64, generator=gen)
        bias = torch.randn(96, generator=gen)
        expected = torch.addmm(bias, x.float(), weight.to(torch.bfloat16).float().t())
        packed = pack_weight(weight)
        stored = self.linear(x, packed, bias, torch.empty(77, 96, dtype=torch.bfloat16), relu=True)
        added = self.linear(x, packed, bias, torch.ones(77, 96), accumulate=True)
        rows = 3 + 2 * torch.randn(77, 96, generator=gen)
        normalized = self.layernorm(rows, 1e-5, torch.empty(77, 96, dtype=torch.bfloat16))
        expected_rows = torch.nn.functional.layer_norm(rows, (96,), eps=1e-5)
        return bool(
            torch.allclose(stored.float(), expected.relu(), rtol=1e-2, atol=1e-2)
            and torch.allclose(added - 1, expected, rtol=1e-5, atol=1e-4)
            and torch.allclose(normalized.float(), expected_rows, rtol=1e-2, atol=1e-2)
        )


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, kernels_dir: Path) -> Path | None:
    """Compile the kernel into the cache (once per source, compiler and flags); None when it fails."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join([compiler, version, *_FLAGS, *_LIBS, platform.machine()]).encode()
    ).hexdigest()[:16]
    library = kernels_dir / f"amx_linear-{key}.so"
    if library.exists():
        return library
    kernels_dir.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
    result = subprocess.run(
        [compiler, *_FLAGS, "-o", str(partial), str(_SOURCE), *_LIBS], capture_output=True, text=True
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        logger.info("could not compile the AMX kernel (%s): %s", compiler, result.stderr.strip()[-500:])
        return None
    os.replace(partial, library)
    return library


def _passes_self_test(library: Path) -> bool:
    """Run the kernel's self-test in a child process (once per library; the verdict is cached)."""
    verdict = library.with_name(library.name + ".verdict")
    if verdict.exists():
        return verdict.read_text().strip() == "ok"
    env = dict(os.environ, SCALR_ZOO_AMX_KERNEL="0")
    try:
        ok = subprocess.run(
            [sys.executable, "-c", _SELF_TEST, str(library)], env=env, capture_output=True, timeout=300
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    partial = verdict.with_name(f"{verdict.name}.{os.getpid()}.tmp")
    partial.write_text("ok" if ok else "failed")
    os.replace(partial, verdict)
    return ok


def amx_cpu() -> bool:
    """Whether this is x86-64 Linux on a CPU that advertises AMX-BF16 and AVX512-BF16."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return _REQUIRED_CPU_FLAGS <= cpu_flags()[1]


def _onednn_uses_amx() -> bool:
    """Whether oneDNN may pick its own AMX kernels (not capped by ``ONEDNN_MAX_CPU_ISA``)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not isa or "AMX" in isa or isa in ("ALL", "DEFAULT")


def amx_kernel() -> AmxKernels | None:
    """The AMX kernel when this process should use it (see the module docstring), else None."""
    setting = os.environ.get("SCALR_ZOO_AMX_KERNEL", "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None
    if setting == "auto" and _onednn_uses_amx():
        return None
    return load_amx_kernel()


def load_amx_kernel() -> AmxKernels | None:
    """The AMX kernel wherever it can run (x86-64 Linux with AMX, a C compiler, a passing self-test), else None.

    Builds and self-tests it on first use (see the module docstring); the
    result is kept for the process, per compiler and cache folder.
    """
    if not amx_cpu():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: bfloat16 products use torch (set CC to enable the AMX kernel)")
        return None
    from .hub import cache_dir

    kernels_dir = cache_dir() / "kernels"
    key = (compiler, str(kernels_dir))
    with _lock:
        if key in _loaded:
            return _loaded[key]
        kernel = None
        try:
            library = _build(compiler, kernels_dir)
            if library is not None and _passes_self_test(library):
                kernel = AmxKernels(library)
                logger.info("bfloat16 products run on the AMX kernel %s", library.name)
        except OSError as exc:
            logger.info("AMX kernel unavailable: %s", exc)
        _loaded[key] = kernel
        return kernel
