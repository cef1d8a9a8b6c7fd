"""Build, load and call the x86 C++ kernels (csrc/); pack to their private layouts.

The ops are compiled once per machine with torch.utils.cpp_extension (ninja) into
user_cache_dir("llmrun")/ext/<torch>-<source hash>-<cpu flags hash>/ops-<sets>/ and registered
as the torch custom ops torch.ops.llmrun.*, with fake (meta) implementations here so that
torch.compile(fullgraph=True) traces through them. Their kernel bodies come in sets, one per
ISA (bodies.h): the ops' library holds the sets this CPU runs by default (its best matmul and
attention ISAs), and another set is built into a library of its own the first time a backend
asks for it (a forced LLMRUN_KERNEL_BACKEND, the tests' every ISA in turn), so that a first run
compiles only what it runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
# the ops (ops.cpp registers them) and their kernel bodies, one translation unit per ISA
# (matmul_*.cpp, attention_*.cpp): ninja compiles them side by side
_SOURCES = sorted(p.name for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h", ".inc"))
_lock = threading.Lock()
_state: dict = {}

_OPS = {"INT4_MM": "int4_mm", "INT8_MM": "int8_mm", "BLOCK_MM": "block_mm", "DECODE_ATTENTION": "decode_attention",
        "PREFILL_ATTENTION": "prefill_attention", "RESCORE_TOP_K": "rescore_top_k",
        "RESCORE_TOP_K_BLOCKS": "rescore_top_k_blocks", "QUANT_ACT": "quant_act",
        "INT4_GROUP_SEARCH": "int4_group_search"}


def _first_call(name: str):
    """What native.<name> is until the extension is loaded: a call that loads it (a model may be
    packed for it while it builds) and then goes on to the op."""
    def call(*args):
        if not _load():
            raise RuntimeError(f"llmrun: the x86 kernels are not built; {_OPS[name]} cannot run")
        return globals()[name](*args)
    return call


# the ops' overloads, bound once the extension is loaded (saves a lookup per call)
INT4_MM = _first_call("INT4_MM")
INT8_MM = _first_call("INT8_MM")
BLOCK_MM = _first_call("BLOCK_MM")
DECODE_ATTENTION = _first_call("DECODE_ATTENTION")
PREFILL_ATTENTION = _first_call("PREFILL_ATTENTION")
RESCORE_TOP_K = _first_call("RESCORE_TOP_K")
RESCORE_TOP_K_BLOCKS = _first_call("RESCORE_TOP_K_BLOCKS")
QUANT_ACT = _first_call("QUANT_ACT")
INT4_GROUP_SEARCH = _first_call("INT4_GROUP_SEARCH")

# isa codes of the C++ op, by backend name
ISA_CODES = {"x86-avx512vnni": 0, "x86-avxvnni": 1, "x86-avx2": 2}
_ISA_BITS = {"x86-avx512vnni": 1, "x86-avxvnni": 2 | 4, "x86-avx2": 8}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    """The CPU's flags line of /proc/cpuinfo (read once: every quantize and build-path check asks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


# the CPU flags (as /proc/cpuinfo names them) each backend needs: isa_support() in int4mm.cpp
# asks CPUID the same questions
_AVX2 = {"avx2", "fma", "f16c"}
_AVX512_VNNI = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
_ISA_FLAGS = {"x86-avx512vnni": (_AVX512_VNNI,), "x86-avxvnni": (_AVX2 | {"avx_vnni"}, _AVX512_VNNI),
              "x86-avx2": (_AVX2,)}


# body sets: their code in bodies.h, the sources of each library
_BODY_SETS = {"avx512": 0, "avxvnni": 1, "avxvnni_evex": 2, "avx2": 3}
_BODY_SOURCES = {
    "avx512": ("matmul_avx512.cpp", "attention_avx512.cpp", "bodies_avx512.cpp"),
    "avxvnni": ("matmul_avxvnni.cpp", "bodies_avxvnni.cpp"),
    "avxvnni_evex": ("matmul_avxvnni_evex.cpp", "bodies_avxvnni_evex.cpp"),
    "avx2": ("matmul_avx2.cpp", "attention_avx2.cpp", "bodies_avx2.cpp"),
}
_OPS_SOURCES = ("ops.cpp", "bodies.cpp", "int4mm.cpp", "blockmm.cpp", "attention.cpp", "attention_baseline.cpp",
                "rescore.cpp", "quantize.cpp")
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}  # the AVX512 attention bodies


def _flag_set() -> set[str] | None:
    line = _cpu_flags()
    return set(line.split(":", 1)[1].split()) if line.startswith("flags") else None


def _body_set(backend: str) -> str:
    """The body set an x86 backend's matmuls run on (ISA 1: VEX code where the CPU has AVX-VNNI,
    else its EVEX encoding, as int4mm.cpp picks)."""
    if backend == "x86-avxvnni":
        return "avxvnni" if "avx_vnni" in (_flag_set() or ()) else "avxvnni_evex"
    return {"x86-avx512vnni": "avx512", "x86-avx2": "avx2"}[backend]


def _default_sets() -> tuple[str, ...]:
    """The body sets the ops' library holds: this CPU's best matmul and attention ISAs (every
    set where the flags cannot be read)."""
    flags = _flag_set()
    if flags is None:
        return tuple(_BODY_SETS)
    isas = [name for name, options in _ISA_FLAGS.items() if any(need <= flags for need in options)]
    sets = {_body_set(isas[0])} if isas else set()
    if _AVX512 <= flags:
        sets.add("avx512")
    elif _AVX2 <= flags:
        sets.add("avx2")
    return tuple(name for name in _BODY_SETS if name in sets)


def _build_dir() -> Path:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_CSRC / name).read_bytes())
    flags = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:10]
    from llmrun.cache_dir import llmrun_cache_dir

    tv = torch.__version__.replace("+", "_")
    return llmrun_cache_dir() / "ext" / f"{tv}-{h.hexdigest()[:12]}-{flags}"


def _ops_library() -> Path:
    return _build_dir() / f"ops-{'-'.join(_default_sets()) or 'baseline'}" / "llmrun_ops.so"


def have_compiler() -> bool:
    """Whether a C++ compiler is on PATH ($CXX, c++ or g++): the kernels' build needs one, and so
    does AOTInductor."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def _compile(library: Path, sources) -> None:
    """Builds (unless there) and loads the shared object `library` from csrc/ `sources`."""
    if library.is_file():
        torch.ops.load_library(str(library))
        return
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=library.stem,
        sources=[str(_CSRC / name) for name in sources],
        extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-Wno-unused-function"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(library.parent),
        is_python_module=False,
        verbose=False,
    )


def _load() -> bool:
    """Build (if needed) and load the ops with their default body sets; False (with one warning)
    where impossible."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
            _state["ok"] = False
            return False
        library, sets = _ops_library(), _default_sets()
        if not library.is_file() and not have_compiler():
            warnings.warn("llmrun: no C++ compiler found; the int4 kernels fall back to the slow reference", stacklevel=3)
            _state["ok"] = False
            return False
        if not library.is_file():
            print("llmrun: building the x86 kernels (once per machine)…", file=sys.stderr, flush=True)
        for attempt in (0, 1):
            try:
                # the bodies first: ninja starts them first, and the zmm matmuls take longest
                _compile(library, tuple(f for name in sets for f in _BODY_SOURCES[name]) + _OPS_SOURCES)
                for name in sets:
                    torch.ops.llmrun.load_bodies(str(library), _BODY_SETS[name])
                ok = True
                break
            except Exception as e:  # noqa: BLE001 - any build/load failure: retry once clean, then fall back
                if attempt == 0:
                    shutil.rmtree(library.parent, ignore_errors=True)  # corrupt or stale cache: rebuild once
                    continue
                warnings.warn(f"llmrun: could not build the x86 kernels ({type(e).__name__}: {e}); "
                              "falling back to the slow reference", stacklevel=3)
        if ok:
            _state["sets"] = set(sets)
            _register_fakes()
            for name, op in _OPS.items():
                globals()[name] = getattr(torch.ops.llmrun, op).default
        _state["ok"] = ok
        return ok


def load_bodies(backend: str) -> None:
    """Makes sure the kernel bodies `backend` runs on are loaded: built into a library of their
    own the first time a backend outside the default sets asks (once per machine)."""
    name = _body_set(backend)
    if not _load() or name in _state["sets"]:
        return
    with _lock:
        if name in _state["sets"]:
            return
        library = _build_dir() / name / f"llmrun_bodies_{name}.so"
        if not library.is_file():
            print(f"llmrun: building the x86 kernels for {backend} (once per machine)…", file=sys.stderr, flush=True)
        _compile(library, _BODY_SOURCES[name])
        torch.ops.llmrun.load_bodies(str(library), _BODY_SETS[name])
        _state["sets"].add(name)


def isa_code(backend: str) -> int:
    """The ops' isa argument for an x86 backend, its bodies loaded first unless they are among
    the default ones (which may still be building: the ops' first call waits for them)."""
    if _body_set(backend) not in _default_sets():
        load_bodies(backend)
    return ISA_CODES[backend]


def _register_fakes() -> None:
    @torch.library.register_fake("llmrun::int4_mm")
    def _(x, w, sc, corr, group_size, K, N, isa):
        return x.new_empty((x.shape[0], N))

    @torch.library.register_fake("llmrun::int8_mm")
    def _(x, w, sc, corr, K, N, isa):
        return x.new_empty((x.shape[0], N))

    @torch.library.register_fake("llmrun::block_mm")
    def _(x, w, sc, of, bits, group_size, K, N, isa):
        return x.new_empty((x.shape[0], N))

    @torch.library.register_fake("llmrun::decode_attention")
    def _(q, k, v, input_pos, slots, scale, softcap, window):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmrun::prefill_attention")
    def _(q, k, v, input_pos, slots, scale, window, bf16_dots=False):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmrun::rescore_top_k")
    def _(y, a, sa, q, sc, k):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmrun::rescore_top_k_blocks")
    def _(y, x, codes, sc, of, bits, group_size, k):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmrun::quant_act")
    def _(x, Kpad):
        return x.new_empty((x.shape[0], Kpad), dtype=torch.uint8), x.new_empty((x.shape[0],), dtype=torch.float32)


def built() -> bool:
    """Whether the extension is loaded (builds it on first call)."""
    return _load()


def supported_isas() -> list[str]:
    """x86 backend names this CPU can run (builds the extension on first call)."""
    if not _load():
        return []
    mask = int(torch.ops.llmrun.isa_support())
    return [name for name, bits in _ISA_BITS.items() if mask & bits]


def runnable_isas() -> list[str]:
    """supported_isas() without waiting for a build: from the CPU's flags (/proc/cpuinfo) while
    the extension is not loaded yet but can be (built, or a compiler to build it), so that a
    model is packed while the kernels compile. The extension's own answer where it is loaded,
    where the flags cannot be read, and where it cannot be built."""
    flags = _flag_set() or set()
    if "ok" in _state or "avx2" not in flags:
        return supported_isas()
    if not _ops_library().is_file() and not have_compiler():
        return supported_isas()
    return [name for name, options in _ISA_FLAGS.items() if any(need <= flags for need in options)]


# ------------------------------------------------------------------ private layout
def pack(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int):
    """Neutral format -> (w uint8 [NP, K8, 64], sc fp16|fp32 [NP, G, 16], corr [NP*16]).

    Panels of 16 output channels; line l of a panel holds k = 8l..8l+7 for its 16 columns:
    byte 4c+j has q[8l+j] (low nibble) and q[8l+4+j] (high nibble) as 4-bit two's
    complement, so one 64-byte load feeds two vpdpbusd (16 columns x 4 k each). K is padded
    with q = 0 to whole groups (to a multiple of 8 per channel), N to whole panels.
    Scales are kept as fp16 when that is exact (always, for quantize_int4's output), else
    fp32. corr is the +128 activation-offset correction (see csrc/int4mm_body.inc).
    """
    from .reference import unpack_int4

    N = qweight.shape[0]
    G = scales.shape[1]
    if group_size:
        if group_size % 8:
            raise ValueError("the x86 kernel needs group_size % 8 == 0")
        Kpad = G * group_size
    else:
        Kpad = -(-K // 8) * 8
    NP = -(-N // 16)
    K8 = Kpad // 8
    w = torch.empty((NP, K8, 64), dtype=torch.uint8)
    sc = torch.nn.functional.pad(scales.float(), (0, 0, 0, NP * 16 - N))  # [NP*16, G]
    corr = torch.empty(NP * 16, dtype=torch.float32 if group_size else torch.int32)
    # 256 panels (4096 rows) at a time: the unpacked, padded and permuted copies of a whole
    # layer cost ~6 bytes per weight (Gemma 3's 262144 x 640 int4 head peaked 1.7 GB above its size)
    for p in range(0, NP, 256):
        rows = unpack_int4(qweight[16 * p:16 * (p + 256)], K)  # int8 [<=4096, K]
        n = -(-rows.shape[0] // 16)
        q = torch.nn.functional.pad(rows, (0, Kpad - K, 0, 16 * n - rows.shape[0]))  # [16n, Kpad]
        nib = (q.view(n, 16, K8, 2, 4).permute(0, 2, 1, 4, 3).to(torch.uint8) & 0xF)  # n,K8,c,j,half
        w[p:p + n] = (nib[..., 0] | (nib[..., 1] << 4)).reshape(n, K8, 64)
        if group_size:
            qsum = q.view(16 * n, G, group_size).sum(-1, dtype=torch.int64)  # [16n, G]
            corr[16 * p:16 * (p + n)] = 128.0 * (sc[16 * p:16 * (p + n)].double() * qsum.double()).sum(-1)
        else:
            corr[16 * p:16 * (p + n)] = 128 * q.sum(-1, dtype=torch.int64)
    if group_size:
        sc16 = sc.half()
        exact = bool(torch.equal(sc16.float(), sc)) and bool(torch.isfinite(sc16).all())
        sct = (sc16 if exact else sc).view(NP, 16, G).permute(0, 2, 1).contiguous()
    else:
        sct = sc.view(NP, 16, 1).permute(0, 2, 1).contiguous()
    return w, sct, corr


def unpack(w: torch.Tensor, sc: torch.Tensor, group_size: int, K: int, N: int):
    """Inverse of pack: private layout -> neutral (qweight, scales float32)."""
    from .reference import pack_int4

    NP, K8, _ = w.shape
    lo = (w & 0xF).view(torch.int8)
    hi = (w >> 4).view(torch.int8)
    nib = torch.stack([lo, hi], -1).view(NP, K8, 16, 4, 2)
    q = torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    q = q.permute(0, 2, 1, 4, 3).reshape(NP * 16, K8 * 8)[:N, :K]
    scales = sc.float().permute(0, 2, 1).reshape(NP * 16, -1)[:N].contiguous()
    return pack_int4(q), scales


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """int8 [N, K] + fp32 [N] -> (w uint8 [NP, K4, 64], sc fp32 [NP, 1, 16], corr int32 [NP*16]).
    Line l of panel p: byte 4c+j = w[16p+c, 4l+j]; K padded with zeros to a multiple of 8."""
    N, K = qweight.shape
    NP, Kpad = -(-N // 16), -(-K // 8) * 8
    w = torch.empty((NP, Kpad // 4, 64), dtype=torch.uint8)
    corr = torch.empty(NP * 16, dtype=torch.int32)
    # 256 panels (4096 rows) at a time: padded copies and int64 row sums of a whole head cost
    # 1-8 bytes per weight more (an 8B model's 0.5 GB int8 head peaked 1.1 GB above its size)
    for p in range(0, NP, 256):
        rows = qweight[16 * p:16 * (p + 256)]  # [<=4096, K]
        n = -(-rows.shape[0] // 16)
        q = torch.nn.functional.pad(rows, (0, Kpad - K, 0, 16 * n - rows.shape[0]))
        w[p:p + n] = q.view(n, 16, Kpad // 4, 4).permute(0, 2, 1, 3).view(torch.uint8).reshape(n, Kpad // 4, 64)
        corr[16 * p:16 * (p + n)] = 128 * q.sum(-1, dtype=torch.int64)
    sc = torch.nn.functional.pad(scales.float().reshape(N), (0, NP * 16 - N)).view(NP, 1, 16).contiguous()
    return w, sc, corr


def unpack_int8(w: torch.Tensor, sc: torch.Tensor, K: int, N: int):
    NP, K4, _ = w.shape
    q = w.view(torch.int8).view(NP, K4, 16, 4).permute(0, 2, 1, 3).reshape(NP * 16, K4 * 4)[:N, :K].contiguous()
    return q, sc.reshape(-1)[:N].contiguous()


def pack_blocks(bw):
    """BlockWeight -> (w uint8 [NP, Kpad/kpl, 64], sc fp16|fp32 [NP, G, 16], of same or empty):
    the layout of csrc/blockmm_body.inc, kpl = k per 64-byte line (8 for 4-bit codes, 4 for
    8-bit). K is padded to whole groups (codes of padding are the zero code: the kernel's
    activations are 0 there), N to whole panels. Scales and offsets are kept as fp16 when
    both are exactly fp16 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else fp32 (the K-quants' products)."""
    N, K, gs = bw.out_features, bw.in_features, bw.group_size
    kpl = 8 if bw.bits == 4 else 4
    if gs % kpl:
        raise ValueError(f"the x86 kernel needs groups of a multiple of {kpl} for {bw.bits}-bit codes")
    G = -(-K // gs)
    Kpad, NP = G * gs, -(-N // 16)
    w = torch.empty((NP, Kpad // kpl, 64), dtype=torch.uint8)
    for p in range(0, NP, 256):  # 4096 rows at a time: bounded temporaries
        u = bw.rows(16 * p, 16 * (p + 256)).unpacked_codes()
        n = -(-u.shape[0] // 16)
        u = torch.nn.functional.pad(u, (0, Kpad - K, 0, 16 * n - u.shape[0]), value=bw.zero)
        if bw.bits == 4:  # [16n, Kpad] -> n, line, column, (j, nibble half)
            nib = u.view(n, 16, Kpad // 8, 2, 4).permute(0, 2, 1, 4, 3)
            w[p:p + n] = (nib[..., 0] | (nib[..., 1] << 4)).reshape(n, Kpad // 8, 64)
        else:
            w[p:p + n] = u.view(n, 16, Kpad // 4, 4).permute(0, 2, 1, 3).reshape(n, Kpad // 4, 64)
    tables = [bw.scales] + ([] if bw.offsets is None else [bw.offsets])
    tables = [torch.nn.functional.pad(t, (0, 0, 0, NP * 16 - N)) for t in tables]
    exact16 = all(bool(torch.isfinite(t.half()).all()) and torch.equal(t.half().float(), t) for t in tables)
    tables = [(t.half() if exact16 else t).view(NP, 16, G).permute(0, 2, 1).contiguous() for t in tables]
    of = tables[1] if len(tables) > 1 else torch.empty(0, dtype=tables[0].dtype)
    return w, tables[0], of


def _codes_from_lines(lines: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Rows' 64-byte-line bytes [n, L, 4] (one column each) -> neutral codes [n, ceil(K/2) | K]."""
    n, L, _ = lines.shape
    if bits == 8:
        return lines.reshape(n, L * 4)[:, :K].contiguous()
    u = torch.cat([lines & 0xF, lines >> 4], -1).reshape(n, L * 8)  # k = 8l + j, 8l + 4 + j
    u = u[:, :2 * ((K + 1) // 2)]
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_blocks(w, sc, of, bits: int, group_size: int, K: int, N: int):
    """Inverse of pack_blocks -> BlockWeight."""
    from .blocks import BlockWeight

    codes, scales, offsets = block_rows(w, sc, of, bits, K, torch.arange(N))
    return BlockWeight(codes, bits, group_size, scales, offsets, K)


def block_rows(w, sc, of, bits: int, K: int, ids: torch.Tensor):
    """Rows `ids` (1-D) of a packed block weight as neutral (codes, scales, offsets | None):
    also a tied embedding's lookup, so plain tensor ops only (traced into compiled steps)."""
    NP, L, _ = w.shape
    panels, cols = ids // 16, ids % 16
    codes = _codes_from_lines(w.view(NP, L, 16, 4)[panels, :, cols, :], bits, K)
    scales = sc[panels, :, cols].float()  # [n, G]
    return codes, scales, of[panels, :, cols].float() if of.numel() else None

