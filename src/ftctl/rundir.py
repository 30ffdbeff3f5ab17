"""The run directory: the manifest, metrics, the rules for reusing a folder, and opening a finished run
(``open_run``: one loader for every command that reads a run, and ``load_folder`` for model folders).

    <output_dir>/
      config.yaml      the composed, resolved config (what a worker or `resume` reads back)
      manifest.json    versions, git commit, data fingerprint, seed, device, model_path, status
      metrics.jsonl    one JSON object per logged step and per validation
      train.log        the log of the run
      checkpoints/step-000100/   complete checkpoints (checkpoint.json written last)
      adapter/         the final adapter in PEFT format, with the tokenizer (adapter methods)
      model/           the final model, with the tokenizer (peft.method=full)
      eval/            results of `ftctl eval`
      plots/           PNG plots of metrics.jsonl and eval/ (ftctl.report), report.html from `ftctl report`
      tensorboard/ mlflow.db mlruns/ wandb/ tracking.json   the trackers of logging.report_to (ftctl.tracking)
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ftctl.core.atomic import atomic_write_text
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.models import load as models

# everything ftctl writes at the top of a run directory; overwrite=true removes only these
RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl", "train.log", "checkpoints", "adapter", "model", "eval",
             "plots", "report.html", "tensorboard", "mlflow.db", "mlruns", "wandb", "tracking.json")


def read_manifest(run_dir: Path) -> dict | None:
    f = Path(run_dir) / "manifest.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_config(run_dir: Path):
    """The run's config.yaml (an OmegaConf config), or None when there is none."""
    from omegaconf import OmegaConf

    f = Path(run_dir) / "config.yaml"
    return OmegaConf.load(f) if f.is_file() else None


def open_run(run_dir) -> Run:
    """A finished run directory, opened (manifest, config, its folders, its models); RunDirError naming
    what is wrong otherwise. Every command that reads a finished run (eval, merge, chat, generate) opens it here."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    if manifest is None or not (run / "config.yaml").is_file():
        raise RunDirError(f"run={run}: not a run directory (no manifest.json/config.yaml)")
    if manifest.get("status") != "finished":
        raise RunDirError(f"run={run}: the run is {manifest.get('status')}, not finished")
    return Run(run, manifest, read_config(run))


def bare_config(dtype: str = "auto"):
    """The model and quant sections for a model folder that comes without a run's config."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"model": {"kind": "causal", "dtype": dtype, "trust_remote_code": False},
                             "quant": {"method": "none", "compute_dtype": "auto", "double_quant": True}})


def on_device(model, device):
    """``model`` on ``device``, unless a device map placed it at load time (a quantized model does not move)."""
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device)
    return model


def load_folder(folder, device, model_cfg=None, quant_cfg=None, *, head: str = "lm", pad_id: int | None = None,
                labels=None):
    """A model folder (a base, a run's model/, or one from ftctl merge or quantize) on ``device``:
    ``ftctl.models.load.load_model`` with the given model and quant sections (default: ``bare_config()``)."""

    bare = bare_config()
    model = models.load_model(Path(folder), model_cfg if model_cfg is not None else bare.model,
                              quant_cfg if quant_cfg is not None else bare.quant, device, head=head, pad_id=pad_id,
                              labels=labels)
    return on_device(model, device)


@dataclass
class Run:
    """A finished run directory: its manifest and config, where its parts are, and its models.

    ``load_model`` gives the tuned model: the base with the adapter (adapter/), the model/ folder (full
    fine-tunes and classifiers with a trained head), or the base alone (a features classifier, whose
    logistic regression in classifier/ reads the base's states)."""
    path: Path
    manifest: dict
    config: Any  # the run's config.yaml (or, in ftctl eval, that with data.* and template.* overrides)
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def base_path(self) -> Path:
        return Path(self.manifest["model_path"])

    def _folder(self, name: str) -> Path | None:
        return self.path / name if (self.path / name).is_dir() else None

    @property
    def adapter(self) -> Path | None:
        return self._folder("adapter")

    @property
    def model_folder(self) -> Path | None:
        return self._folder("model")

    @property
    def classifier(self) -> Path | None:
        return self._folder("classifier")

    @property
    def task(self) -> str:
        return self.config.get("task", "generate")

    @property
    def head(self) -> str:
        """The model's head: classify (task=classify), score (a reward model) or lm."""
        if self.task == "classify":
            return "classify"
        return "score" if self.config.get("objective") == "reward" else "lm"

    @property
    def labels(self) -> list | None:
        """A classifier's label names, in the order of its head's outputs."""
        if self.task != "classify":
            return None
        return list(self.manifest.get("classify", {}).get("labels") or self.config.classify.labels)

    def tokenizer(self):
        """The base model's tokenizer (the run trained with it; adapter/ and model/ hold copies)."""
        if self._tokenizer is None:

            self._tokenizer = models.load_tokenizer(self.base_path)
        return self._tokenizer

    def _sections(self, dtype: str | None, quantized: bool):
        """The config's model and quant sections, with dtype replaced and quantization off where asked."""
        from omegaconf import OmegaConf

        model_cfg, quant_cfg = self.config.model, self.config.quant
        if dtype is not None:
            model_cfg = OmegaConf.merge(model_cfg, {"dtype": dtype})
        if not quantized:
            quant_cfg = bare_config().quant
        return model_cfg, quant_cfg

    def _load(self, folder: Path, device, dtype: str | None, quantized: bool):
        model_cfg, quant_cfg = self._sections(dtype, quantized)
        return load_folder(folder, device, model_cfg, quant_cfg, head=self.head,
                           pad_id=self.tokenizer().pad_token_id, labels=self.labels)

    def load_base(self, device, *, dtype: str | None = None, quantized: bool = True):
        """The base model the run started from, with the run's head; ``dtype`` replaces model.dtype and
        ``quantized=False`` loads it unquantized (ftctl merge folds an adapter into the real weights)."""
        return self._load(self.base_path, device, dtype, quantized)

    def load_model(self, device, *, dtype: str | None = None, quantized: bool = True):
        """The tuned model on ``device`` (see the class)."""
        if self.adapter is not None:
            return self._with_adapter(self.load_base(device, dtype=dtype, quantized=quantized), self.adapter, device)
        if self.model_folder is not None:
            return self._load(self.model_folder, device, dtype, quantized)
        if self.classifier is not None:
            return self.load_base(device, dtype=dtype, quantized=quantized)
        what = "adapter/, model/ or classifier/" if self.task == "classify" else "adapter/ or model/"
        raise RunDirError(f"{self.path}: no {what} folder (did the run finish?)")

    def load_reference(self, device):
        """A DPO run's reference: the base, or the base with the SFT adapter the run continued (model.adapter)."""
        base = self.load_base(device)
        if not self.config.model.get("adapter"):
            return base
        return self._with_adapter(base, adapter_folder(self.config.model.adapter), device)

    def _with_adapter(self, base, adapter: Path, device):
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base, adapter)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that are not there
            raise RunDirError(f"adapter {adapter} does not fit the base model {self.base_path} "
                              f"({str(e).strip().splitlines()[0][:160]})") from e
        return on_device(model, device)


def default_output_dir(recipe: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("outputs") / (recipe or "train") / stamp
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{stamp}-{n}")
    return out


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool, dry_run: bool = False) -> None:
    """Refuse to clobber a finished run; on overwrite=true remove only what ftctl wrote.
    ``dry_run`` only checks, so a refusal comes before any slow work."""
    manifest = read_manifest(out)
    if resume:
        if not dry_run:
            _mkdir(out)
        return
    if manifest is not None or (out / "checkpoints").is_dir():
        status = (manifest or {}).get("status", "unfinished")
        if not overwrite:
            what = "a finished run" if status == "finished" else f"a run ({status})"
            raise RunDirError(
                f"output_dir {out} already holds {what}",
                hint="pass overwrite=true to replace it, resume=true to continue it, or choose another output_dir",
            )
        if dry_run:
            return
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if not dry_run:
        _mkdir(out)


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ftctl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"output_dir {out}: cannot write there ({e.strerror or e})") from e


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ftctl", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class Metrics:
    """Append-only metrics.jsonl; on resume, lines after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [json.dumps(row) for row in _parse_lines(self.path.read_text()) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self._f = open(self.path, "a")

    def log(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _parse_lines(text: str) -> list[dict]:
    """JSON lines, without a torn last line that a killed process may have left."""
    rows = []
    for ln in text.splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return _parse_lines(f.read_text()) if f.is_file() else []


def adapter_folder(spec: str) -> Path:
    """model.adapter: an adapter folder, or a run folder holding adapter/."""
    p = Path(spec).expanduser()
    if (p / "adapter").is_dir():
        p = p / "adapter"
    if not (p / "adapter_config.json").is_file():
        what = "no such folder" if not p.exists() else "no adapter_config.json there"
        raise ConfigError(f"model.adapter={spec}: {what} (expected a run from `ftctl train` with an adapter method, "
                          "or its adapter/ folder)")
    return p
