"""Golden record of five short fixed-seed runs, taken before the package was reorganised: a refactor
that moves code but changes no behaviour must reproduce every logged loss, learning rate, gradient norm
and validation figure exactly, and every tensor of the final adapter (or model) bit for bit.

The runs go through the real CLI (``python -m ftctl.cli train ...``) in a subprocess, on CPU, with one
thread and the default seed, on the tiny built-in models:

  sft_lora   tiny_llama, SFT with LoRA on the built-in date task
  dpo        tiny_llama, objective=dpo on the built-in preference pairs
  reward     tiny_llama, objective=reward (a LoRA reward model with a score head)
  seq2seq    tiny_t5 (model.kind=seq2seq), LoRA on q and v
  classify   tiny_bert, task=classify (classify.strategy=lora) on a small CSV written here

What is recorded per run: every row of metrics.jsonl without its wall-clock fields (``time``,
``tokens_per_s``); for every tensor of every ``*.safetensors`` file in the final folder, its name, shape,
dtype and the sha256 of its raw bytes; for the classify run the manifest's ``classify`` scores.

The runs share a fresh model cache holding only the converted SmolLM2 folder (linked from the user's cache;
the tiny models take their tokenizer from it). The three tiny models are built into it first, in a process
of their own, by the code under test, and their tensors are recorded too (``base_models``). The runs then
find the cache warm, as a user's second run does. (A run that builds its tiny model itself, in a cold cache,
trains differently: the model is built after the run's seed is set, and building it reseeds torch.)

Record (writes tests/fixtures/golden.json; ``--src`` picks the package to run, e.g. an old worktree):

    python tests/test_golden.py --record [--src /path/to/checkout/src] [--out FILE]

or ``FTCTL_RECORD_GOLDEN=1 python tests/test_golden.py``. Compare without pytest, printing every difference:

    python tests/test_golden.py [--src ...]

Under pytest the package under test is this checkout's src/ (or $FTCTL_GOLDEN_SRC)."""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "golden.json"
# wall-clock fields of metrics.jsonl: they differ from run to run, so they are left out
WALL_CLOCK = ("time", "tokens_per_s")

COMMON = ["seed=42", "trainer.num_threads=1", "trainer.log_every=1", "trainer.save_every=0",
          "logging.plots=false"]
TINY_LLAMA = ["model=tiny_llama", "data.max_length=128", "trainer.batch_size=4"]
PAIRS = [*TINY_LLAMA, "data=demo_date_pairs", "template=preference", "data.limit=40", "data.val_fraction=0.2",
         "trainer.warmup_steps=0", "trainer.scheduler=constant"]

RUNS: dict[str, list[str]] = {
    "sft_lora": [*TINY_LLAMA, "peft=lora", "data.limit=64", "trainer.max_steps=6", "trainer.eval_every=3",
                 "trainer.lr=1e-2", "trainer.warmup_steps=2", "trainer.scheduler=cosine"],
    "dpo": [*PAIRS, "objective=dpo", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.lr=1e-2"],
    "reward": [*PAIRS, "objective=reward", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.lr=1e-2"],
    "seq2seq": ["model=tiny_t5", "model.kind=seq2seq", "peft.target_modules=[q,v]", "data.limit=40",
                "data.max_length=128", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.eval_every=3",
                "trainer.lr=1e-2", "trainer.warmup_steps=0", "trainer.scheduler=constant"],
    "classify": ["recipe=sms_spam_classify", "model=tiny_bert", "data.path={data}", "data.max_length=32",
                 "classify.strategy=lora", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=8",
                 "trainer.lr=5e-3"],
}

HAM = ["see you at lunch", "ok i am on my way", "can you call mum later", "the meeting moved to noon",
       "thanks for dinner", "where are my keys", "good night sleep well", "running late sorry"]
SPAM = ["WIN a free prize now", "claim your cash reward txt WIN", "free entry WIN a holiday prize",
        "urgent you WIN cash call now"]


def write_sms_csv(path: Path, n: int = 80, seed: int = 0) -> Path:
    """A small deterministic ham/spam CSV (label,text), so the classify run needs no shared data."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label", "text"])
        for i in range(n):
            spam = rng.random() < 0.25
            w.writerow(["spam" if spam else "ham", f"{rng.choice(SPAM if spam else HAM)} {i}"])
    return path


# ----------------------------------------------------------------------------- running the CLI
def _env(src: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("FTCTL_DEBUG", None)
    env.update(PYTHONPATH=os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])]),
               FTCTL_CACHE=str(cache), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    return env


def _python(src: Path, cache: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(src, cache),
                          cwd=src.parent, timeout=timeout)


def check_package(src: Path) -> Path:
    """The subprocesses import ftctl from ``src`` (not from wherever the venv's editable install points)."""
    r = _python(src, Path(tempfile.gettempdir()), "-c", "import ftctl; print(ftctl.__file__)")
    assert r.returncode == 0, r.stderr[-3000:]
    where = Path(r.stdout.strip().splitlines()[-1]).resolve()
    assert where.is_relative_to(src.resolve()), f"ftctl was imported from {where}, not from {src}"
    return where


# ftctl's own resolver of ``builtin:<name>``: ftctl.models.load.resolve here, ftctl.models.resolve in 0a904ef
RESOLVE = """import importlib
for where in ("ftctl.models.load", "ftctl.models"):  # this checkout; 0a904ef (where the fixture is recorded)
    try:
        resolve = getattr(importlib.import_module(where), "resolve", None)
    except ImportError:
        continue
    if callable(resolve):
        break
else:
    raise SystemExit("ftctl's resolve(path) for builtin:<name> models was not found")
"""


def smollm2_folder(src: Path) -> Path:
    """The converted SmolLM2 folder in the user's model cache (converted once, by the code in ``src``)."""
    cache = Path(os.environ["FTCTL_CACHE"]).expanduser() if os.environ.get("FTCTL_CACHE") else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ftctl"
    r = _python(src, cache, "-c", RESOLVE + "print(resolve('builtin:smollm2_135m'))")
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


TINY_MODELS = ("tiny_llama", "tiny_t5", "tiny_bert")


def fresh_cache(where: Path, smollm2: Path, src: Path) -> tuple[Path, dict]:
    """A model cache with only the SmolLM2 folder in it, into which the code in ``src`` builds the tiny models
    (in a process of its own); the cache and the tiny models' tensors."""
    cache = where / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2.name).symlink_to(smollm2, target_is_directory=True)
    r = _python(src, cache, "-c", RESOLVE + f"for n in {TINY_MODELS!r}:\n    print(resolve('builtin:' + n))")
    assert r.returncode == 0, r.stderr[-3000:]
    folders = [Path(line) for line in r.stdout.strip().splitlines()[-len(TINY_MODELS):]]
    base = {}
    for name, folder in zip(TINY_MODELS, folders):
        assert folder.resolve().is_relative_to(cache.resolve()), folder
        base[name] = {f"{f.name}:{t}": info for f in sorted(folder.glob("*.safetensors"))
                      for t, info in safetensors_digest(f).items()}
    return cache, base


def command(name: str, work: Path) -> list[str]:
    """The argv (after ``python -m ftctl.cli``) of one golden run, its output under ``work``."""
    data = write_sms_csv(work / "sms.csv") if name == "classify" else None
    args = [a.format(data=data) for a in RUNS[name]]
    return ["train", *args, *COMMON, f"output_dir={work / 'run'}"]


def run(name: str, src: Path, cache: Path, work: Path) -> dict:
    """Run one golden configuration through the CLI (the tiny models already in ``cache``); its record."""
    work.mkdir(parents=True, exist_ok=True)
    r = _python(src, cache, "-m", "ftctl.cli", *command(name, work))
    if r.returncode != 0:
        raise RuntimeError(f"golden run {name!r} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return collect(work / "run")


# ----------------------------------------------------------------------------- what a run leaves
def safetensors_digest(path: Path) -> dict:
    """name -> {dtype, shape, sha256 of the raw bytes}, read from the file's own header (no torch involved)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    body = raw[8 + n:]
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = {"dtype": info["dtype"], "shape": list(info["shape"]),
                     "sha256": hashlib.sha256(body[a:b]).hexdigest()}
    return out


def collect(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.get("status") == "finished", manifest.get("status")
    metrics = [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
               for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = out / manifest["output"]  # adapter/ or model/
    tensors = {}
    for f in sorted(final.rglob("*.safetensors")):
        for name, info in safetensors_digest(f).items():
            tensors[f"{f.relative_to(out).as_posix()}:{name}"] = info
    rec = {"metrics": metrics, "tensors": tensors}
    if "classify" in manifest:
        rec["classify"] = manifest["classify"]
    return rec


# ----------------------------------------------------------------------------- comparing
def _diff_values(where: str, want, got, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got:
                out.append(f"{where}.{k}: missing (golden {want[k]!r})")
            elif k not in want:
                out.append(f"{where}.{k}: not in the golden record (now {got[k]!r})")
            else:
                _diff_values(f"{where}.{k}", want[k], got[k], out)
    elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (w, g) in enumerate(zip(want, got)):
            _diff_values(f"{where}[{i}]", w, g, out)
    elif type(want) is not type(got) or want != got:
        out.append(f"{where}: {got!r} != golden {want!r}")


def diff(name: str, want: dict, got: dict) -> list[str]:
    """Every difference between a golden record and a new one, each line naming the run and the step/key or tensor."""
    out: list[str] = []
    wm, gm = want["metrics"], got["metrics"]
    if len(wm) != len(gm):
        out.append(f"{name}: metrics.jsonl has {len(gm)} rows, golden {len(wm)}: steps {[r.get('step') for r in gm]} "
                   f"vs golden {[r.get('step') for r in wm]}")
    for i, (w, g) in enumerate(zip(wm, gm)):
        kind = "val" if any(k.startswith("val_") for k in w) else "train"
        _diff_values(f"{name}: metrics row {i} ({kind}, step {w.get('step')})", w, g, out)
    wt, gt = want["tensors"], got["tensors"]
    for t in sorted(set(wt) | set(gt)):
        if t not in gt:
            out.append(f"{name}: tensor {t} missing")
        elif t not in wt:
            out.append(f"{name}: tensor {t} is new (not in the golden record)")
        else:
            for k in ("dtype", "shape", "sha256"):
                if wt[t][k] != gt[t][k]:
                    out.append(f"{name}: tensor {t} {k} {gt[t][k]} != golden {wt[t][k]}")
    if "classify" in want or "classify" in got:
        _diff_values(f"{name}: manifest classify", want.get("classify"), got.get("classify"), out)
    return out


def diff_base(want: dict, got: dict) -> list[str]:
    """Differences between the recorded tiny models' tensors and the ones just built."""
    out: list[str] = []
    for model in sorted(set(want) | set(got)):
        w, g = want.get(model, {}), got.get(model, {})
        for t in sorted(set(w) | set(g)):
            if t not in g or t not in w:
                out.append(f"base model {model}: tensor {t} {'missing' if t not in g else 'is new'}")
            elif w[t] != g[t]:
                out.append(f"base model {model}: tensor {t} {g[t]} != golden {w[t]}")
    return out


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": ".".join(map(str, sys.version_info[:3]))}
    for p in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "scikit-learn"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def record_all(src: Path, verbose: bool = True) -> tuple[dict, dict]:
    """Run all five; the record (with the commands and library versions) and each run's seconds."""
    check_package(src)
    smollm2 = smollm2_folder(src)
    runs, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="ftctl-golden-") as tmp:
        t = time.time()
        cache, base = fresh_cache(Path(tmp), smollm2, src)
        seconds["tiny models"] = round(time.time() - t, 1)
        for name in RUNS:
            t = time.time()
            runs[name] = run(name, src, cache, Path(tmp) / name)
            seconds[name] = round(time.time() - t, 1)
            if verbose:
                print(f"{name}: {seconds[name]} s", file=sys.stderr, flush=True)
    cmds = {n: " ".join(["python", "-m", "ftctl.cli", *command_template(n)]) for n in RUNS}
    return {"_meta": {"versions": versions(), "commands": cmds, "wall_clock_fields_dropped": list(WALL_CLOCK)},
            "base_models": base, "runs": runs}, seconds


def command_template(name: str) -> list[str]:
    return ["train", *RUNS[name], *COMMON, "output_dir={tmp}/run"]


# ----------------------------------------------------------------------------- pytest
try:
    import pytest
except ImportError:  # the record mode needs no pytest
    pytest = None

if pytest is not None:
    # the five runs and the tiny models' build: about 70 s on 2 CPU cores (most of it each process's imports)
    pytestmark = pytest.mark.slow

    def _src() -> Path:
        return Path(os.environ.get("FTCTL_GOLDEN_SRC") or ROOT / "src")

    @pytest.fixture(scope="module")
    def golden():
        if not FIXTURE.is_file():
            pytest.fail(f"{FIXTURE} is missing; record it with: python tests/test_golden.py --record")
        return json.loads(FIXTURE.read_text())

    @pytest.fixture(scope="module")
    def cache(tmp_path_factory):
        """A fresh model cache with the tiny models built by the code under test; (cache, their tensors)."""
        check_package(_src())
        return fresh_cache(tmp_path_factory.mktemp("golden"), smollm2_folder(_src()), _src())

    def _fail(problems: list[str], golden: dict) -> None:
        if problems:
            now, then = versions(), golden["_meta"]["versions"]
            note = "" if now == then else f"\n(the record was made with {then}; now {now})"
            pytest.fail(f"{len(problems)} difference(s) from {FIXTURE.name}:\n" + "\n".join(problems[:60]) +
                        ("\n..." if len(problems) > 60 else "") + note, pytrace=False)

    def test_tiny_models_match_the_golden_record(golden, cache):
        _fail(diff_base(golden["base_models"], cache[1]), golden)

    @pytest.mark.parametrize("name", list(RUNS))
    def test_run_matches_the_golden_record(name, golden, cache, tmp_path):
        _fail(diff(name, golden["runs"][name], run(name, _src(), cache[0], tmp_path)), golden)


# ----------------------------------------------------------------------------- script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", default=os.environ.get("FTCTL_RECORD_GOLDEN") == "1",
                   help="write the record (default: compare with it)")
    p.add_argument("--src", type=Path, default=Path(os.environ.get("FTCTL_GOLDEN_SRC") or ROOT / "src"),
                   help="the src/ folder whose ftctl runs (default: this checkout's)")
    p.add_argument("--out", type=Path, default=FIXTURE, help=f"where to write the record (default {FIXTURE})")
    a = p.parse_args(argv)
    src = a.src.resolve()
    rec, seconds = record_all(src)
    print(f"ran {src} in {sum(seconds.values()):.1f} s: {seconds}", file=sys.stderr)
    if a.record:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        print(f"wrote {a.out} ({a.out.stat().st_size:,} bytes)", file=sys.stderr)
        return 0
    golden = json.loads(FIXTURE.read_text())
    problems = diff_base(golden["base_models"], rec["base_models"])
    problems += [d for n in RUNS for d in diff(n, golden["runs"][n], rec["runs"][n])]
    print("\n".join(problems) if problems else "identical to the golden record")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
