"""Building and loading the CPU kernels (``cpu_kernels.c``): compiled at first use with the system C
compiler into ``$MEGAMLM_KERNEL_DIR`` (default ``~/.cache/megamlm/kernels``), keyed by a hash of the
source, the flags, the compiler and the CPU's instruction-set flags; loaded with ctypes, their
signatures declared, their OpenMP runtime checked against torch's, and torch's BLAS ``sgemm_``
handed to the attention kernels after a self-test. :mod:`megamlm.ops.cpu_kernels` is the API."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["load", "compiler", "compile_kernels", "openmp_runtimes", "library_of", "shares_torch_openmp",
           "torch_sgemm", "attach_sgemm"]

SRC = Path(__file__).with_name("cpu_kernels.c")
# -ffp-contract=fast: fused multiply-adds (ISO C mode turns them off); -fno-trapping-math: lets the
# float -> int conversion of the inlined exp vectorize (torch itself is built with both math flags)
FLAGS = ["-O3", "-std=c99", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC"]


def load(version: int):
    """Compile (or find in the cache) and load the kernels; raises when that is impossible (no
    compiler, a failed build, another ABI ``version``)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    out_dir = Path(os.environ.get("MEGAMLM_KERNEL_DIR") or Path.home() / ".cache" / "megamlm" / "kernels")
    try:
        so = compile_kernels(cc, out_dir)
    except OSError:  # read-only home: a private temporary folder
        so = compile_kernels(cc, Path(tempfile.mkdtemp(prefix="megamlm-kernels-")))
    lib = ctypes.CDLL(str(so))
    if lib.megamlm_kernels_version() != version:
        raise RuntimeError(f"{so} is version {lib.megamlm_kernels_version()}, expected {version}")
    _declare(lib)
    if lib.megamlm_kernels_openmp() and not shares_torch_openmp(lib):  # not torch's pool: serial
        lib.megamlm_set_parallel_words(1 << 62)
        log.warning("megamlm CPU kernels run serially: their OpenMP runtime (%s) is not torch's",
                    library_of(lib.megamlm_omp_symbol()))
    attach_sgemm(lib)
    return lib


def _declare(lib) -> None:
    """The C signatures, for ctypes."""
    ptr, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32
    lib.megamlm_set_parallel_words.argtypes = [i64]
    lib.megamlm_set_parallel_words.restype = i64
    lib.megamlm_omp_symbol.restype = ctypes.c_void_p
    for dt, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"megamlm_dropout_mul_{dt}").argtypes = [ptr, ptr, i64, i64, u64, i32, ct]
        getattr(lib, f"megamlm_dropout_add_{dt}").argtypes = [ptr, ptr, ptr, i64, i64, u64, i32, ct]
        getattr(lib, f"megamlm_bias_gelu_{dt}").argtypes = [ptr, ptr, ptr, ptr, i64, i64]
        getattr(lib, f"megamlm_mul_colsum_{dt}").argtypes = [ptr, ptr, ptr, ptr, i64, i64]
        getattr(lib, f"megamlm_mul_colsum_{dt}").restype = ctypes.c_int
        getattr(lib, f"megamlm_residual_ln_{dt}").argtypes = [ptr] * 9 + [i64, i64, u64, i32, ct,
                                                                         ctypes.c_double]
        getattr(lib, f"megamlm_residual_ln_backward_{dt}").argtypes = [ptr] * 10 + [i64, i64, u64, i32, ct]
        getattr(lib, f"megamlm_residual_ln_backward_{dt}").restype = ctypes.c_int
    lib.megamlm_ce_forward_f32.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64]
    lib.megamlm_ce_backward_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64]
    lib.megamlm_ce_backward_f32.restype = ctypes.c_int
    lib.megamlm_set_sgemm.argtypes = [ptr]
    for name, n_ptr in (("forward", 7), ("backward", 8)):
        fn = getattr(lib, f"megamlm_attention_{name}_f32")
        fn.argtypes = [ptr] * n_ptr + [i64] * 4 + [ctypes.c_float, u64, i32, ctypes.c_float]
        fn.restype = ctypes.c_int
    c_int, c_char, c_float = ctypes.c_int, ctypes.c_char, ctypes.c_float
    lib.megamlm_gemm_rm_f32.argtypes = [c_char, c_char, c_int, c_int, c_int, c_float, ptr, c_int, ptr, c_int,
                                        c_float, ptr, c_int]


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def compile_kernels(cc: str, out_dir: Path) -> Path:
    src = SRC.read_bytes()
    try:
        cc_version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        cc_version = ""
    flags = list(FLAGS)
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cc_version.encode(), cpu_flags().encode(),
                                      platform.machine().encode()])).hexdigest()[:16]
    so = out_dir / f"cpu_kernels-{key}.so"
    if so.is_file():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    # OpenMP and -march=native first; then without OpenMP (serial), then without the native target
    native = ["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else \
        ["-march=native"]
    for extra in (["-fopenmp", *native], ["-fopenmp", "-march=native"], ["-march=native"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        res = subprocess.run([cc, *flags, *extra, "-o", tmp, str(SRC), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode == 0:
            os.replace(tmp, so)  # atomic: a concurrent rank sees the whole file or none
            return so
        os.unlink(tmp)
        errors.append(res.stderr.strip()[-1000:])
    raise RuntimeError(f"{cc} could not compile {SRC}:\n" + "\n".join(errors))


def openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return {line.split()[-1] for line in f if any(n in line for n in ("libgomp", "libiomp", "libomp."))}
    except OSError:
        return set()


def library_of(address: int) -> str | None:
    """The file of the shared library holding ``address`` (dladdr), None where unknown."""
    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(DlInfo)], ctypes.c_int
    info = DlInfo()
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode(errors="replace"))


def shares_torch_openmp(lib) -> bool:
    """Whether the kernels' OpenMP runtime is the one torch's own package ships (when it ships one;
    else the single system runtime both resolve by soname)."""
    ours = library_of(lib.megamlm_omp_symbol())
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    bundled = {os.path.realpath(p) for p in openmp_runtimes() if os.path.realpath(p).startswith(torch_dir)}
    return ours is not None and (ours in bundled if bundled else True)


def torch_sgemm() -> int | None:
    """The address of ``sgemm_`` (BLAS, Fortran interface) in the library torch's CPU ops run on, or None.
    x86 wheels link MKL into ``libtorch_cpu`` and export its symbols."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            handle = ctypes.CDLL(str(lib_dir / name))
            return ctypes.cast(handle.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def attach_sgemm(lib) -> None:
    """Hand torch's sgemm to the attention kernels after checking it on all four transpose cases of a
    small strided product (a BLAS with another integer width or calling convention fails here and
    leaves the kernels without one: :func:`attention_available` is False; the other kernels stay)."""
    address = torch_sgemm()
    if not address:
        return
    lib.megamlm_set_sgemm(address)
    try:
        ok = sgemm_self_test(lib)
    except Exception as e:  # noqa: BLE001 -- whatever went wrong, the attention kernel stays off
        ok = False
        log.warning("sgemm self-test raised %s", e)
    if not ok:
        lib.megamlm_set_sgemm(None)
        log.warning("torch's sgemm_ (at %s) failed the self-test; the attention kernel is off", library_of(address))


def sgemm_self_test(lib) -> bool:
    g = torch.Generator().manual_seed(0)
    # (the first kernel call may come from a model's forward under autocast: compute the reference in fp32)
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        for ta in "NT":
            for tb in "NT":
                m, n, k = 5, 3, 7
                a = torch.randn(m, k, generator=g) if ta == "N" else torch.randn(k, m, generator=g)
                b = torch.randn(k, n, generator=g) if tb == "N" else torch.randn(n, k, generator=g)
                a_wide = torch.zeros(a.shape[0], a.shape[1] + 2)  # leading dimensions larger than the rows
                a_wide[:, :a.shape[1]] = a
                c = torch.full((m, n + 1), 7.0)
                lib.megamlm_gemm_rm_f32(ta.encode(), tb.encode(), m, n, k, 2.0, a_wide.data_ptr(), a_wide.shape[1],
                                        b.data_ptr(), b.shape[1], 1.0, c.data_ptr(), n + 1)
                want = 2.0 * ((a if ta == "N" else a.t()) @ (b if tb == "N" else b.t())) + 7.0
                if not (torch.allclose(c[:, :n], want, atol=1e-5) and bool((c[:, n] == 7.0).all())):
                    return False
    return True
