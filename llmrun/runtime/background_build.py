"""Compiled steps built by a background process, so that an answer never waits for them.

start() launches `python -m llmrun.runtime.background_build JOB` at the lowest CPU priority
(SCHED_IDLE: it runs only on cores nothing else wants, and so do the compilers it starts). The
builder loads the same model (the engine options it is handed; a prepared model maps in well
under a second), builds one step's package for one cache shape and exits. Builders take turns
(one lock for the packages dir: one model's memory at a time); a package is written atomically
(aot.build_package), so a builder killed half-way leaves only its temporary file, which
nothing loads. building() lists the builders at work (`llmrun list` shows them); a build that
fails leaves a note beside its package (failure()), so later runs run eagerly instead of
failing again, until the package's key changes (another llmrun or torch)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _building_dir(packages: Path) -> Path:
    return packages / "building"


def log_path(package: Path) -> Path:
    return _building_dir(package.parent) / f"{package.stem}.log"


def failure(package: Path) -> str | None:
    """The first error line of a failed build of `package`, else None."""
    try:
        return package.with_suffix(".failed").read_text().strip() or "no message"
    except OSError:
        return None


def _lowest_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def start(options, step: str, cache, package: Path) -> int:
    """Start a builder of `step`'s package for `cache`'s shape, for the model `options`
    (runtime.engine.EngineOptions) loads; its pid."""
    import torch

    job = {"options": dataclasses.asdict(options), "threads": torch.get_num_threads(), "step": step,
           "slots": cache.slots, "length": cache.length, "package": str(package)}
    log = log_path(package)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmrun.runtime.background_build", json.dumps(job)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_lowest_priority)
    return proc.pid


def building(packages: Path) -> list[dict]:
    """The builders at work or waiting their turn: their jobs, with "pid" and "state"."""
    out = []
    for path in sorted(_building_dir(packages).glob("*.json")):
        try:
            status = json.loads(path.read_text())
            os.kill(status["pid"], 0)  # gone (killed): its status file is stale
        except (OSError, ValueError, KeyError):
            continue
        out.append(status)
    return out


def _write_status(path: Path, status: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def build(job: dict) -> None:
    from llmrun.runtime.aot import AotSteps, _Step, package_path
    from llmrun.runtime.engine import Engine, EngineOptions
    from llmrun.runtime.kv_cache import KVCache

    package = Path(job["package"])
    options = EngineOptions(**{**job["options"], "compile": False, "threads": job["threads"]})
    engine = Engine.load(options, stream=False)
    cache = KVCache(engine.config, job["slots"], job["length"], engine.kv_dtype)
    step_module = _Step(engine.model, cache, job["step"] == "prefill")
    here = package_path(package.parent, step_module, job["step"])
    if here != package:
        raise RuntimeError(f"the model loaded here is not the one that asked: package {here.name} "
                           f"here, {package.name} asked")
    AotSteps(lambda message: print(f"llmrun: {message}", flush=True), package.parent)._bind(step_module, job["step"])


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    package = Path(job["package"])
    status = _building_dir(package.parent) / f"{os.getpid()}.json"
    info = {"pid": os.getpid(), "model": job["options"]["model"], "step": job["step"], "slots": job["slots"],
            "length": job["length"], "package": str(package), "started": time.time()}
    _write_status(status, {**info, "state": "waiting"})
    try:
        with open(_building_dir(package.parent) / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # builders take turns
            if package.is_file():  # built by another builder meanwhile
                return 0
            _write_status(status, {**info, "state": "compiling"})
            try:
                build(job)
            except Exception as exc:  # noqa: BLE001 - noted for later runs, which then run eagerly
                traceback.print_exc()
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                package.with_suffix(".failed").write_text(f"{type(exc).__name__}: {first}\n")
                return 1
        return 0
    finally:
        with contextlib.suppress(OSError):
            status.unlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
