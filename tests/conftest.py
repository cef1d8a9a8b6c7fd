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


# llama.cpp's tokenizer reference data (vocabulary-only GGUF files of real models, with strings
# and the ids their Hugging Face tokenizers give) and real models' chat templates, as vendored
# in llama-cpp-python's source release on PyPI: downloaded once, then read from the cache.
LLAMA_CPP_SDIST = ("llama_cpp_python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")


@pytest.fixture(scope="session")
def llama_cpp_models():
    """llama.cpp's models/ folder (ggml-vocab-*.gguf with .inp/.out, templates/*.jinja)."""
    import hashlib
    import subprocess
    import sys
    import tarfile

    from llmrun.cache_dir import llmrun_cache_dir

    name, version, sha256 = LLAMA_CPP_SDIST
    root = llmrun_cache_dir().parent / "llmrun-tests" / f"{name}-{version}"
    models = root / "models"
    if not (models / "templates").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        sdist = root / f"{name}-{version}.tar.gz"
        if not sdist.is_file():
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"{name}=={version}", "--no-deps",
                                   "--no-binary", ":all:", "-d", str(root)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"llama-cpp-python {version}'s source release could not be downloaded: {done.stderr[-300:]}")
        assert hashlib.sha256(sdist.read_bytes()).hexdigest() == sha256, f"{sdist} is not the pinned release"
        prefix = f"{name}-{version}/vendor/llama.cpp/models/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and ("/templates/" in m.name or "ggml-vocab-" in m.name)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(root / "partial", members=members, filter="data")
        (root / "partial").rename(models)
    return models
