"""What a latency figure depends on: torch, its threads, and the BLAS it calls.

The BLAS is read from torch's build configuration and, for the BLAS libraries
loaded into this process (a system libblas.so.3 that Debian's torch calls, an
OpenBLAS), from ``threadpoolctl``, which knows every common BLAS and its thread
pool. pip's torch links its own BLAS (MKL on x86-64) into libtorch_cpu, where
no library list can see it; torch's ``BLAS_INFO`` says so.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch

__all__ = ["Environment", "environment", "set_threads", "format_environment"]


@dataclass
class Environment:
    """Attributes:
        torch_version: ``torch.__version__``.
        threads: ``torch.get_num_threads()``.
        interop_threads: ``torch.get_num_interop_threads()``.
        blas_info: ``BLAS_INFO`` from ``torch.__config__.show()``: ``generic``
            means torch calls whatever ``libblas.so.3`` the system provides.
        blas: one name for the BLAS torch's matrix products run on, with the
            threads of its pool where it has its own, e.g. ``"openblas 0.3.21, 2
            thread(s), /usr/lib/.../libopenblasp-r0.3.21.so"`` or ``"MKL, built
            into torch"``.
        blas_library: the same without the thread count (which set_threads
            changes), for records made before the threads are set.
        blas_libraries: what threadpoolctl reports of each loaded BLAS.
        mkldnn: whether torch can use oneDNN for convolutions.
    """

    torch_version: str
    threads: int
    interop_threads: int
    blas_info: str
    blas: str
    blas_library: str
    blas_libraries: List[Dict] = field(default_factory=list)
    mkldnn: bool = False


def _blas_libraries() -> List[Dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # a test and demo extra; without it, torch's word alone
        return []
    return [i for i in threadpool_info() if i.get("user_api") == "blas"]


def _blas_name(blas_info: str, libraries: List[Dict], threads: bool) -> str:
    if blas_info not in ("generic", "unknown"):
        return f"{blas_info.upper()}, built into torch"
    # torch calls the system's libblas.so.3: the one loaded that is not numpy's own
    system = [i for i in libraries if "numpy" not in i.get("filepath", "")] or libraries
    if not system:
        return "the system's libblas.so.3 (not identified: pip install threadpoolctl)"
    lib = system[0]
    pool = f", {lib.get('num_threads')} thread(s)" if threads else ""
    return (f"{lib.get('internal_api', 'blas')} {lib.get('version') or ''}".strip()
            + f"{pool}, {lib.get('filepath')}")


def environment() -> Environment:
    """Reads torch's threads and the BLAS in use."""
    torch.mm(torch.ones(8, 8), torch.ones(8, 8))  # loads the BLAS where it is lazy
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    info = found.group(1) if found else "unknown"
    libraries = _blas_libraries()
    return Environment(torch.__version__, torch.get_num_threads(),
                       torch.get_num_interop_threads(), info,
                       _blas_name(info, libraries, threads=True),
                       _blas_name(info, libraries, threads=False), libraries,
                       bool(torch.backends.mkldnn.is_available()))


def set_threads(n: int) -> None:
    """Uses ``n`` threads in torch and in every BLAS pool loaded (OpenBLAS keeps a
    pool of its own, one thread per core by default).

    Args:
        n: the number of threads, at least 1.
    """
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=n, user_api="blas")


def format_environment(env: Environment) -> str:
    """One line naming the torch, its threads, and the BLAS."""
    return (f"torch {env.torch_version}: {env.threads} thread(s), "
            f"{env.interop_threads} inter-op; oneDNN {'on' if env.mkldnn else 'off'}; "
            f"BLAS: {env.blas}")
