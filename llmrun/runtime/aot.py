"""The generator's prefill and decode steps as AOTInductor packages (llmrun's default compile).

torch.export captures each step as one whole graph (export has no graph breaks: it captures
everything or fails), and AOTInductor compiles it into a shared library with a C++ launcher.
Against torch.compile (llmrun.runtime.compiled, `--compile-backend jit`) this removes, per decode step,
dynamo's guard checks and cache lookup (~1 ms of SmolLM2's ~9 ms) and the Python wrapper that
launches ~400 kernels; measured on SmolLM2 int4: 113 -> 173 t/s.

- decode: static shapes (one token per sequence for a batch of B sequences, the KV cache of one
  shape); another batch size or cache shape (generator.cache_length, a scheduler's slots) builds
  one more package.
- prefill: one package for every prompt length 1..generator.PREFILL_CHUNK (a symbolic length).
- Packages hold code, not weights (package_constants_in_so=False): at load the model's own
  tensors (weights, rope frequencies) and the generator's KV cache are handed over by name,
  without copies (user_managed), so both steps read and write the same KV cache as eager
  code would.
- A package is keyed by what its code depends on: torch's version, llmrun's source, the
  module tree (types, shapes, dtypes, kernel choices), the step and the thread count (inductor
  bakes it into its loops). Weights are not in the key: another checkpoint of the same shapes
  reuses the package. Packages live in llmrun's cache dir, written atomically; a second process
  loads one in well under a second instead of compiling. Building one deletes those unused
  for STALE_DAYS (a load refreshes a package's mtime).
- A missing package is built before the step runs, or (AotSteps' background mode, what
  `generate` and `chat` use) by a background process while the step runs eagerly
  (llmrun.runtime.background_build).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from llmrun.cache_dir import source_digest
from llmrun.errors import LlmrunError
from llmrun.runtime.generator import DECODE_BATCH_SIZES, PREFILL_CHUNK, decode_one, prefill
from llmrun.runtime.kv_cache import KVCache
from llmrun.runtime.memory import release_free_heap

FORMAT = 1  # bump when the way packages are built changes
# A package unused for this long is deleted when another is built: a new llmrun or torch, or a
# model no longer run, leaves its packages behind (3-4 MB each). Loading one marks it used.
STALE_DAYS = 30


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _simple_attrs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """A module's plain attributes: numbers, strings, containers and settings (dataclasses)."""
    simple = (bool, int, float, str, tuple, list, type(None))
    return sorted((k, repr(v)) for k, v in vars(module).items()
                  if isinstance(v, simple) or (dataclasses.is_dataclass(v) and not isinstance(v, type)))


def package_key(step_module: torch.nn.Module, step: str) -> str:
    """What a step's package depends on (see the module docstring); step_module: a _Step."""
    h = hashlib.sha256()
    for part in (str(FORMAT), torch.__version__, source_digest(), step,
                 str(torch.get_num_threads()), repr(step_module.model.config)):
        h.update(part.encode() + b"\0")
    for name, module in step_module.named_modules():
        h.update(f"{name}:{type(module).__qualname__}:{_simple_attrs(module)}\0".encode())
    for name, t in _named_tensors(step_module).items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()}\0".encode())
    return h.hexdigest()[:32]


def packages_dir() -> Path:
    from llmrun.cache_dir import llmrun_cache_dir

    return llmrun_cache_dir() / "aoti"


class _Step(torch.nn.Module):
    """The exported callable: model(ids, input_pos, cache, slots), all positions or the last
    one. The cache is a submodule here, not an input: its tensors are bound like weights."""

    def __init__(self, model: torch.nn.Module, cache: torch.nn.Module, last_only: bool):
        super().__init__()
        self.model, self.cache, self.last_only = model, cache, last_only

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.model(ids, input_pos, self.cache, slots, last_only=self.last_only)


def _export(step_module: _Step, step: str) -> torch.export.ExportedProgram:
    if step.startswith("decode-b"):  # ids (B, 1), input_pos (B, 1), slots (B,)
        batch = int(step.removeprefix("decode-b"))
        args = (torch.zeros((batch, 1), dtype=torch.long), torch.zeros((batch, 1), dtype=torch.long),
                torch.arange(batch) % step_module.cache.slots)
        return torch.export.export(step_module, args, strict=False)
    # prefill: ids (1, T), input_pos (1, T) with T symbolic in [1, PREFILL_CHUNK]
    slots = torch.zeros(1, dtype=torch.long)
    length = torch.export.Dim("T", min=1, max=PREFILL_CHUNK)
    args = (torch.zeros((1, 8), dtype=torch.long), torch.arange(8)[None], slots)
    return torch.export.export(step_module, args, dynamic_shapes=({1: length}, {1: length}, None),
                               strict=False)


@contextlib.contextmanager
def _without_weight_copies():
    """Two habits of torch's AOTInductor that each cost a copy of the model's buffers (llmrun's
    packed weights are buffers), neither of which a package without constants needs:
    - compile_fx._unlift_graph clones every buffer so that it could write the values from before
      any mutation into the .so; with package_constants_in_so=False nothing is written and the
      clones are read only for dtype, shape and strides, which the originals have too;
    - proxy_tensor keeps the last traced graph (and those clones) in a module-level map until
      the next trace.
    Measured on Llama-3.2-1B shapes (1.17 GB resident before): building the decode package
    peaked at 2.17 GB and kept 2.17 GB; with this, 1.30 GB and 1.28 GB (Llama-3.1-8B, both
    packages: peak 16.4 -> 5.9 GB). Where torch has moved these names, the build still works,
    only heavier."""
    from torch._inductor import compile_fx
    from torch.fx.experimental import proxy_tensor

    clone = getattr(compile_fx, "clone_preserve_strides", None)
    if clone is not None:
        compile_fx.clone_preserve_strides = lambda tensor: tensor
    try:
        yield
    finally:
        if clone is not None:
            compile_fx.clone_preserve_strides = clone
        getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()
        gc.collect()
        release_free_heap()


def build_package(step_module: _Step, step: str, path: Path) -> None:
    """Export `step` of a model and its cache and compile it to `path` (atomically)."""
    from llmrun.runtime.compiled import configure_inductor

    configure_inductor()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        with torch.no_grad(), warnings.catch_warnings(), _without_weight_copies():
            # torch's own pytree code trips its LeafSpec deprecation: not ours to act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(
                _export(step_module, step), package_path=str(tmp),
                inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _delete_stale(directory: Path) -> None:
    """Delete the packages (and leftover temporary files) in `directory` unused for STALE_DAYS."""
    cutoff = time.time() - STALE_DAYS * 86400
    for path in directory.glob("*.pt2"):
        with contextlib.suppress(OSError):  # another process may delete or replace it first
            if path.stat().st_mtime < cutoff:
                path.unlink()


class _Bound:
    """A loaded package whose constants point at one model's tensors and one cache's."""

    def __init__(self, path: Path, step_module: _Step):
        # torch's loader itself (torch._inductor.aoti_load_package wraps it): importing
        # torch._inductor costs ~1 s, a third of a warm start's budget
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        tensors = _named_tensors(step_module)
        wanted = loader.get_constant_fqns()
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise RuntimeError(f"package wants tensors the model lacks: {missing[:3]}")
        self.constants = {n: tensors[n] for n in wanted}  # kept alive: the package holds pointers
        # (constants, use_inactive, check_full_update, user_managed: no copies, allow_h2d_copy)
        loader.load_constants(self.constants, False, True, True, False)
        self.run = loader.boxed_run
        self.cache = step_module.cache
        self.path = path


@contextlib.contextmanager
def _building(package: Path):
    """Held while `package` is loaded or built here: a second process waits, then loads it."""
    locks = package.parent / "building"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{package.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def package_path(directory: Path, step_module: _Step, step: str) -> Path:
    return directory / f"{step}-{package_key(step_module, step)}.pt2"


class AotSteps:
    """prefill_fn / decode_fn for a Generator or a Scheduler, backed by AOTInductor packages.

    `report(message)` hears what is being built or loaded; `built` counts packages compiled in
    this process (tests use it to show that nothing is rebuilt as positions and prompt lengths
    change). Steps are "prefill" and "decode-b{B}" (B sequences).

    `background`: a missing package is built by a background process (runtime.background_build,
    handed these engine options, runtime.engine.EngineOptions, to load the same model) while
    the step runs eagerly here; the package is taken up once it is there. Else a missing
    package is built here, before the step runs."""

    RECHECK_S = 0.5  # how often a step that runs eagerly looks for its package

    def __init__(self, report: Callable[[str], None] | None = None, directory: Path | None = None,
                 background=None):
        self.report = report or (lambda message: None)
        self.directory = directory or packages_dir()
        self.background = background
        self.built: list[str] = []
        self._bound: dict[str, _Bound] = {}  # step -> the package bound to the cache in use
        self._waiting: dict[str, tuple[Path, KVCache, float]] = {}  # step -> package awaited, for which cache, when looked
        self._builders, self._looked_for_builders = False, -self.RECHECK_S
        self.batch_sizes = DECODE_BATCH_SIZES  # decode is built for these batch sizes only

    def _builders_at_work(self) -> bool:
        """Whether a background builder works on this machine's packages (looked up at most
        every RECHECK_S)."""
        now = time.monotonic()
        if now - self._looked_for_builders >= self.RECHECK_S:
            from llmrun.runtime.background_build import building

            self._builders, self._looked_for_builders = bool(building(self.directory)), now
        return self._builders

    def _step(self, model, cache, step: str) -> Callable | None:
        """The package's runner for `step` on `cache`, or None: while it is built elsewhere,
        and in background mode while any builder works (see _one_thread). Either way a step
        met for the first time has its package bound, or its builder started, at once."""
        run = self._runner(model, cache, step)
        if run is not None and self.background is not None and self._waiting and self._builders_at_work():
            return None
        return run

    def _runner(self, model, cache, step: str) -> Callable | None:
        bound = self._bound.get(step)
        if bound is not None and bound.cache is cache:
            return bound.run
        waiting = self._waiting.get(step)
        if waiting is not None and waiting[1] is cache:  # built elsewhere: there yet?
            path, _, looked = waiting
            now = time.monotonic()
            if now - looked < self.RECHECK_S:
                return None
            if not path.is_file():
                self._waiting[step] = (path, cache, now)
                return None
        # a new cache (another length, or re-allocated): the old binding goes, and with it
        # the package's pointers to the old tensors
        self._bound.pop(step, None)
        self._waiting.pop(step, None)
        bound = self._bind(_Step(model, cache, step == "prefill"), step)
        return None if bound is None else bound.run

    def packages(self) -> list[Path]:
        """The packages of the steps run so far: bound, or awaited from a background build."""
        return [b.path for b in self._bound.values()] + [w[0] for w in self._waiting.values()]

    def _bind(self, step_module: _Step, step: str) -> _Bound | None:
        cache = step_module.cache
        path = package_path(self.directory, step_module, step)
        rows = "" if step == "prefill" else f" for {step.removeprefix('decode-b')} sequence(s)"
        what = f"{step.split('-')[0]} step{rows} (KV cache of {cache.slots} x {cache.length} positions)"
        if not path.is_file() and self.background is not None:
            from llmrun.kernels.native import have_compiler
            from llmrun.runtime import background_build

            failed = background_build.failure(path)
            if failed:
                self.report(f"running the {what} eagerly: building it failed before ({failed})")
            elif not have_compiler():
                self.report(f"running the {what} eagerly: AOTInductor needs a C++ compiler (none on PATH)")
            else:  # by a builder another run started, or by one started now
                at_work = [b["pid"] for b in background_build.building(self.directory) if b.get("package") == str(path)]
                pid = at_work[0] if at_work else background_build.start(self.background, step, cache, path)
                self.report(f"the compiled {what} is being built in the background (pid {pid}); "
                            "this answer runs eagerly until it is there")
            self._waiting[step] = (path, cache, time.monotonic())
            return None
        bound = self._load(step_module, path, what) if path.is_file() else None
        if bound is None:
            with _building(path):  # processes wanting the same package (replicas, a second server) take turns
                bound = self._load(step_module, path, what) if path.is_file() else \
                    self._build(step_module, step, path, what)
        self._bound[step] = bound
        return bound

    def _load(self, step_module: _Step, path: Path, what: str) -> _Bound | None:
        """The package at `path`, or None (deleted) where it fails to load: it is rebuilt."""
        start = time.perf_counter()
        try:
            bound = _Bound(path, step_module)
        except Exception as exc:  # noqa: BLE001 - a damaged package is rebuilt, never fatal
            self.report(f"rebuilding the compiled {what}: the cached package failed to load ({type(exc).__name__})")
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # used now: not stale
        self.report(f"loaded compiled {what} in {time.perf_counter() - start:.2f} s")
        return bound

    def _build(self, step_module: _Step, step: str, path: Path, what: str) -> _Bound:
        self.report(f"compiling the {what} with AOTInductor (once per machine, then cached)")
        start = time.perf_counter()
        try:
            build_package(step_module, step, path)
        except Exception as exc:  # noqa: BLE001 - export/compiler failures: one line, a way out
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise LlmrunError(f"compiling the {what} failed ({type(exc).__name__}: {first}); "
                              "run with --no-compile, or --compile-backend jit") from exc
        self.built.append(f"{step}:{step_module.cache.length}")
        _delete_stale(self.directory)
        bound = _Bound(path, step_module)
        self.report(f"compiled the {what} in {time.perf_counter() - start:.1f} s")
        return bound

    @staticmethod
    @contextlib.contextmanager
    def _one_thread():
        """An eager step runs on one thread while a builder works on the other cores. OpenMP
        threads that wait at each op's barrier hand their core to any runnable process, even one
        of the lowest priority, until the next scheduler tick: measured SmolLM2's eager decode
        with two such processes at SCHED_IDLE on 2 cores, 2 threads 1.6 t/s, 1 thread 38 t/s
        (alone: 42 and 39; eager decode is bound by Python, not by the cores)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def prefill(self, model, cache, ids: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # ids: (1, T), input_pos: (1, T), T <= PREFILL_CHUNK, slots: (1,) -> (1, 1, vocab)
        run = self._step(model, cache, "prefill")
        if run is not None:
            return run([ids, input_pos, slots])[0]
        with self._one_thread():
            return prefill(model, cache, ids, input_pos, slots)

    def decode(self, model, cache, token: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # token: (B, 1), input_pos: (B, 1), slots: (B,), B in batch_sizes -> (B, 1, vocab)
        run = self._step(model, cache, f"decode-b{token.shape[0]}")
        if run is not None:
            return run([token, input_pos, slots])[0]
        with self._one_thread():
            return decode_one(model, cache, token, input_pos, slots)
