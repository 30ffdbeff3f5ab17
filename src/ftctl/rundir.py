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

from ftctl.core import lock
from ftctl.core.atomic import atomic_write_text, json_safe
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.models import load as models

# everything ftctl writes at the top of a run directory; overwrite=true removes only these
RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl", "train.log", "checkpoints", "adapter", "model", "eval",
             "plots", "report.html", "tensorboard", "mlflow.db", "mlruns", "wandb", "tracking.json", "launch",
             "classifier", "merged")


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


def open_run(run_dir, *, trust_remote_code: bool = False) -> Run:
    """A finished run directory, opened (manifest, config, its folders, its models); RunDirError naming
    what is wrong otherwise. Every command that reads a finished run (eval, merge, chat, generate) opens it here.

    A saved file never turns on remote code: model.trust_remote_code is what the command line says
    (``trust_remote_code``), whatever the run's config.yaml holds."""
    import sys

    from omegaconf import open_dict

    run = Path(run_dir)
    manifest = read_manifest(run)
    if not isinstance(manifest, dict) or not (run / "config.yaml").is_file():
        raise RunDirError(f"run={run}: not a run directory (no manifest.json/config.yaml)")
    if manifest.get("status") != "finished":
        raise RunDirError(f"run={run}: the run is {manifest.get('status')}, not finished")
    config = read_config(run)
    saved = bool(config.get("model", {}).get("trust_remote_code", False))
    if saved and not trust_remote_code:
        print(f"ftctl: note: {run} was trained with model.trust_remote_code=true; it stays off here (a saved file "
              "does not turn it on): pass trust_remote_code=true to run the model folder's Python code",
              file=sys.stderr)
    with open_dict(config):
        config.model.trust_remote_code = bool(trust_remote_code)
    return Run(run, manifest, config)


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

        models.check_adapter_files(adapter, f"run={self.path}")  # a bad or pickled file: one line, never unpickled
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


# names that do not make a folder someone else's: the lock, a sweep trial's record and Hydra's folder in it, a
# multi-process run's launch/ (its launcher writes it before the workers start)
OWN_EXTRA = (lock.LOCK_FILE, "trial.json", ".hydra", "launch")


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is an ftctl run: its manifest.json is ftctl's, or it holds checkpoints ftctl wrote
    (checkpoints/step-*/checkpoint.json); a folder that merely has a checkpoints/ directory is not."""
    manifest = read_manifest(folder)
    if isinstance(manifest, dict) and "ftctl_version" in manifest:
        return True
    return any((folder / "checkpoints").glob("step-*/checkpoint.json"))


def _foreign(out: Path) -> list[str]:
    """What a folder holds besides the names ftctl may leave in a folder it is about to use."""
    try:
        return sorted(p.name for p in out.iterdir() if p.name not in OWN_EXTRA)
    except OSError:
        return []


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool, dry_run: bool = False) -> None:
    """Check ``out`` for a new run, and (unless ``dry_run``, which only checks, so that a refusal comes before any
    slow work) take it: create it and lock it (one writer: ftctl.core.lock). Refused: a run that
    is there (unless overwrite=true or resume=true), and a non-empty folder that is not an ftctl run, whatever
    overwrite says; overwrite=true removes only what ftctl wrote (``remove_run_files``)."""
    out = Path(out)
    if lock.inherited(out):  # a worker of a multi-process run: its launcher checked and holds the folder
        return None if dry_run else _mkdir(out)
    lock.check_free(out)
    _check_reuse(out, overwrite or resume)  # resume=true continues a run, never a folder of the user's
    if dry_run:
        return
    reuse = not resume and (is_run(out) or _set_up_only(out))  # overwrite=true, or a set-up that failed
    _mkdir(out)
    lock.acquire(out, "ftctl train")
    if reuse:
        remove_run_files(out)


def _set_up_only(out: Path) -> bool:
    """A folder ftctl took (its lock file is there) whose run failed in set-up, before its manifest: what it holds of
    ``RUN_FILES`` (train.log) is ftctl's, and the folder may be taken again without overwrite=true."""
    return (out / lock.LOCK_FILE).is_file() and not is_run(out)


def _check_reuse(out: Path, overwrite: bool) -> None:
    """Refuse a folder a run may not take: a run (unless overwrite or resume), or a non-empty folder that is not a
    run, whatever overwrite or resume say."""
    if not out.exists():
        return
    if not is_run(out):
        foreign = [] if _set_up_only(out) else _foreign(out) if out.is_dir() else [out.name]
        if foreign:
            raise RunDirError(f"output_dir {out} is not empty and is not an ftctl run (it holds "
                              f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
                              hint="ftctl writes a run only into a new or empty folder; choose another output_dir")
    elif not overwrite:
        status = (read_manifest(out) or {}).get("status", "unfinished")
        what = "a finished run" if status == "finished" else f"a run ({status})"
        raise RunDirError(f"output_dir {out} already holds {what}",
                          hint="pass overwrite=true to replace it, resume=true to continue it, or choose another "
                               "output_dir")


def run_containing(path: Path, levels: int = 3) -> Path | None:
    """The run directory ``path`` is (or is inside, up to ``levels`` folders up), or None."""
    p = Path(path).expanduser().resolve()
    for folder in [p, *p.parents][:levels + 1]:
        if folder.is_dir() and is_run(folder):
            return folder
    return None


def check_output_folder(out: Path, sources: list[Path], marker: str, overwrite: bool,
                        allowed_inside: Path | None = None) -> Path:
    """The output folder of ftctl merge or quantize, checked: not equal to, inside, or containing a source (the
    run or model folder read), except ``allowed_inside`` (ftctl's own place, e.g. <run>/merged); an existing
    non-empty folder only if it is one ftctl wrote (it holds ``marker``) and overwrite=true. RunDirError otherwise."""
    out = Path(out).expanduser()
    res = out.resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        inside_ok = allowed_inside is not None and res == Path(allowed_inside).expanduser().resolve()
        if res == s or (s in res.parents and not inside_ok):
            raise RunDirError(f"output={out}: is {'the' if res == s else 'inside the'} folder it is made from ({s}); "
                              "choose an output folder outside it")
        if res in s.parents:
            raise RunDirError(f"output={out}: contains the folder it is made from ({s}); choose another output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / marker).is_file():
            raise RunDirError(f"output={out} already exists and was not written by ftctl (no {marker}); "
                              "choose a new or empty folder")
        if not overwrite:
            raise RunDirError(f"output={out} already exists; choose another output= or pass overwrite=true")
    return out


def remove_run_files(out: Path) -> None:
    """Remove what ftctl wrote at the top of a run (``RUN_FILES``), and nothing else: in checkpoints/ only
    the checkpoints with ftctl's checkpoint.json; a symbolic link is removed, never followed."""
    for name in RUN_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif name == "checkpoints" and p.is_dir():
            for ckpt in p.glob("step-*"):
                if (ckpt / "checkpoint.json").is_file() and not ckpt.is_symlink():
                    shutil.rmtree(ckpt)
            if not any(p.iterdir()):
                p.rmdir()
        elif p.is_dir():
            shutil.rmtree(p)


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
            keep = [json.dumps(json_safe(row), allow_nan=False) for row in _parse_lines(self.path.read_text())
                    if isinstance(row, dict) and row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self._f = open(self.path, "a")

    def log(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
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
