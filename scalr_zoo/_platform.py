"""Guard against CPUs that advertise Intel AMX but fault on it.

Some virtual machines report AMX (``amx_tile``) in cpuid but leave its
palette leaf (cpuid 0x1D) empty. oneDNN builds its tile configuration from
that leaf, so its AMX kernels for bfloat16 matrix products run on
unconfigured tiles and the process dies with "Illegal instruction" (or
fails with "could not create a primitive"). On such CPUs we probe once, in
a child process, whether a bfloat16 product survives; if not, we cap oneDNN
at AVX512-BF16 through ``ONEDNN_MAX_CPU_ISA`` before torch first uses it,
and the fast engine runs its bfloat16 products on :mod:`scalr_zoo._amx`
instead. The verdict is cached per CPU model, kernel and torch version.

Set ``ONEDNN_MAX_CPU_ISA`` yourself, or ``SCALR_ZOO_SKIP_CPU_PROBE=1``, to
bypass this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_PROBE = (
    "import torch\n"
    "a = torch.ones(64, 64, dtype=torch.bfloat16)\n"
    "torch.nn.functional.linear(a, a)\n"
    "(a @ a).sum().item()\n"
)


def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and cpuid flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return model, flags


def _cache_file() -> Path:
    from .hub import cache_dir  # no torch op runs on import: the guard still comes first

    return cache_dir() / "cpu_probe.json"


def guard_onednn_isa() -> None:
    """Cap oneDNN below AMX when AMX is advertised but faults (see module docstring)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("SCALR_ZOO_SKIP_CPU_PROBE"):
        return
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return
    model, flags = cpu_flags()
    if "amx_tile" not in flags:
        return
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    key = hashlib.sha256(f"{model}|{platform.release()}|{torch_version}".encode()).hexdigest()[:16]
    cache = _cache_file()
    verdicts: dict[str, bool] = {}
    try:
        verdicts = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    if key not in verdicts:
        env = dict(os.environ, SCALR_ZOO_SKIP_CPU_PROBE="1")
        try:
            ok = subprocess.run(
                [sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120
            ).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        verdicts[key] = ok
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(verdicts))
            os.replace(tmp, cache)
        except OSError:
            pass
    if not verdicts[key]:
        isa = "AVX512_CORE_BF16" if "avx512_bf16" in flags else "AVX512_CORE"
        os.environ["ONEDNN_MAX_CPU_ISA"] = isa
        logger.info("this CPU advertises AMX but faults on it; capping oneDNN at %s", isa)
