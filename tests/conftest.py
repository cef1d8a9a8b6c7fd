"""Shared fixtures: the two shipped real models, loaded once per session."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_path():
    from llmrun.sources.shipped import shipped_models

    return shipped_models()["smollm2-135m"].path()


@pytest.fixture(scope="session")
def gemma3_path():
    from llmrun.sources.shipped import shipped_models

    return shipped_models()["gemma3-270m"].path()


def _load_pair(path):
    """(llmrun model, llmrun tokenizer, transformers model) for a GGUF file, fp32."""
    transformers = pytest.importorskip("transformers")
    from llmrun.formats.checkpoint import load_model, open_checkpoint
    from llmrun.tokenizer import Tokenizer

    ours = load_model(open_checkpoint(path, "gguf"), torch.float32)
    tok = Tokenizer.from_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.eval()
    return ours, tok, hf


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_path):
    return _load_pair(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_pair(gemma3_path):
    return _load_pair(gemma3_path)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny Llama saved by transformers, with a word-level tokenizer.json: a 'real' checkpoint."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(d)
    words = ["<unk>", "<s>", "</s>"] + "The capital of France is Paris a the city and".split()
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(256 - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>"}))
    return d


@pytest.fixture
def own_cache(tmp_path):
    """An XDG_CACHE_HOME of the test's own (no quantized, prepared or compiled models) that
    shares only the built kernels (a build takes ~40 s)."""
    from llmrun.cache_dir import llmrun_cache_dir

    home = tmp_path / "cache"
    (home / "llmrun").mkdir(parents=True)
    (llmrun_cache_dir() / "ext").mkdir(parents=True, exist_ok=True)
    (home / "llmrun" / "ext").symlink_to(llmrun_cache_dir() / "ext")
    return home


def _release(name: str, version: str, sha256: str, sdist: bool):
    """(the cache folder, the file) of a pinned release from PyPI: downloaded once, checked."""
    import hashlib
    import subprocess
    import sys

    from llmrun.cache_dir import llmrun_cache_dir

    root = llmrun_cache_dir().parent / "llmrun-tests" / f"{name}-{version}"
    root.mkdir(parents=True, exist_ok=True)
    found = [p for p in root.iterdir() if p.name.endswith(".tar.gz" if sdist else ".whl")]
    if not found:
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"{name}=={version}", "--no-deps",
                               *kind, "-d", str(root)], capture_output=True, text=True)
        found = [p for p in root.iterdir() if p.name.endswith(".tar.gz" if sdist else ".whl")]
        if done.returncode != 0 or not found:
            pytest.skip(f"{name} {version} could not be downloaded from PyPI: {done.stderr[-300:]}")
    assert hashlib.sha256(found[0].read_bytes()).hexdigest() == sha256, f"{found[0]} is not the pinned release"
    return root, found[0]


@pytest.fixture(scope="session")
def llama_cpp_models():
    """llama.cpp's models/ folder as vendored in llama-cpp-python's source release:
    vocabulary-only GGUF files of real models with strings and the ids their Hugging Face
    tokenizers give (ggml-vocab-*.gguf, .inp, .out), and real models' chat templates
    (templates/*.jinja)."""
    import tarfile

    name, version = "llama_cpp_python", "0.3.36"
    root, sdist = _release(name, version, "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", True)
    models = root / "models"
    if not (models / "templates").is_dir():
        prefix = f"{name}-{version}/vendor/llama.cpp/models/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and ("/templates/" in m.name or "ggml-vocab-" in m.name)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(root / "partial", members=members, filter="data")
        (root / "partial").rename(models)
    return models


@pytest.fixture(scope="session")
def mistral_tokenizers():
    """Mistral's own tokenizer files as mistral-common's wheel ships them (its data/ folder:
    the sentencepiece models of Mistral 7B v0.1 to v0.3 and the later ones, tekken files)."""
    import zipfile

    root, wheel = _release("mistral_common", "1.12.0",
                           "fa4504b66c30c0201ae4578c0340c5ee2abd22151c271532f62e373b985a53cf", False)
    data = root / "data"
    if not data.is_dir():
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member.startswith("mistral_common/data/") and member.endswith((".v1", ".v3")):
                    (root / "partial").mkdir(exist_ok=True)
                    (root / "partial" / member.rsplit("/", 1)[1]).write_bytes(z.read(member))
        (root / "partial").rename(data)
    return data
