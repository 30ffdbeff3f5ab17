"""logging.report_to (TensorBoard, MLflow, W&B through Accelerate), plots/ and `ftctl report`: one short
tiny_llama run with every tracker at once, read back with each tracker's own reader; the report page
opened in headless Chromium."""
import glob
import json
import os
import shutil
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import compose, run_cli

from ftctl.core.errors import ConfigError
from ftctl.rundir import read_metrics

TINY = ["model=tiny_llama", "data.limit=32", "data.max_length=128", "trainer.batch_size=4", "trainer.log_every=1",
        "trainer.warmup_steps=0"]
PLOT_COLOR = (0x1f, 0x77, 0xb4)  # the training-loss line


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """3 steps with validation at steps 2 and 3, all three trackers, and eval.after_train."""
    from ftctl.train.loop import train

    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg, choices = compose(*TINY, "trainer.max_steps=3", "trainer.eval_every=2", "trainer.scheduler=linear",
                           "logging.report_to=[tensorboard,mlflow,wandb]", "logging.wandb_mode=offline",
                           "eval.after_train=[exact_match,rougeL]", "eval.limit=3", "eval.max_new_tokens=6",
                           f"output_dir={out}")
    train(cfg, choices)
    return out


def _train_rows(out):
    rows = read_metrics(out)
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = _train_rows(tracked_run)
    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss",
            "eval/exact_match", "eval/rougeL"} <= set(tags), tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in train], rel=1e-6, abs=1e-12)
    vl = acc.Scalars("val/loss")
    assert [e.step for e in vl] == [2, 3] and [e.value for e in vl] == pytest.approx([r["val_loss"] for r in val])
    man = json.loads((tracked_run / "manifest.json").read_text())
    assert acc.Scalars("eval/rougeL")[0].value == pytest.approx(man["eval"]["rougeL"])


@pytest.fixture
def mlflow_at(monkeypatch):
    """mlflow.set_tracking_uri for one test (it also exports MLFLOW_TRACKING_URI, which would leak)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield lambda run: mlflow.set_tracking_uri(f"sqlite:///{run.resolve() / 'mlflow.db'}")
    mlflow.set_tracking_uri(None)


def test_mlflow_run_is_readable_with_search_runs(tracked_run, mlflow_at):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tracked_run.resolve() / 'mlflow.db'}"
    train, val = _train_rows(tracked_run)
    mlflow_at(tracked_run)
    runs = mlflow.search_runs(experiment_names=["ftctl"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == json.loads((tracked_run / "tracking.json").read_text())["mlflow_run_id"]
    assert run.data.metrics["train/loss"] == pytest.approx(train[-1]["loss"])
    assert run.data.metrics["val/loss"] == pytest.approx(val[-1]["val_loss"])
    assert run.data.params["trainer.max_steps"] == "3" and run.data.params["model.name"] == "tiny_llama"
    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    # the final adapter, the plots and the eval results are the run's artifacts, under the run directory
    adapter = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= adapter
    assert (tracked_run / "mlruns").is_dir()
    assert {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")} >= {"loss.png"}


def test_resume_continues_the_same_mlflow_run(tracked_run, tmp_path, mlflow_at):
    """resume=true: the same MLflow run (its id in tracking.json) goes on; the params that changed, which MLflow
    refuses to overwrite, become resumed.<key> tags."""
    import mlflow
    from accelerate import Accelerator

    from ftctl.train import tracking

    for f in ("mlflow.db", "tracking.json"):
        shutil.copy(tracked_run / f, tmp_path / f)
    cfg, _ = compose(*TINY, "trainer.max_steps=5", "logging.report_to=[mlflow]", f"output_dir={tmp_path}")
    trackers = tracking.Trackers(cfg, tmp_path, Accelerator(cpu=True, log_with=tracking.log_with(cfg, tmp_path, True)),
                                 start_step=3)
    trackers.log({"step": 4, "loss": 1.5, "lr": 0.1}, 4)
    trackers.finish(None)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # put back as it was, for the next run in this process
    mlflow_at(tmp_path)
    runs = mlflow.search_runs(experiment_names=["ftctl"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4] and runs[0].data.metrics["train/loss"] == 1.5
    assert runs[0].data.tags["resumed.trainer.max_steps"] == "5" and runs[0].data.params["trainer.max_steps"] == "3"


def _wandb_records(path: Path):
    """The records of a .wandb file (W&B's LevelDB-style log of protobuf Records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        else:
            break
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run_folder(tracked_run):
    train, val = _train_rows(tracked_run)
    files = glob.glob(str(tracked_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    assert Path(files[0]).name == f"run-{json.loads((tracked_run / 'tracking.json').read_text())['wandb_run_id']}.wandb"
    history, kinds, artifacts = {}, set(), []
    for rec in _wandb_records(Path(files[0])):
        kind = rec.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "history":
            history[rec.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                           for i in rec.history.item}
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, sorted(Path(c.path).name for c in rec.artifact.manifest.contents)))
    assert {"run", "config", "history", "exit"} <= kinds
    assert sorted(history) == [1, 2, 3]
    assert [history[r["step"]]["train/loss"] for r in train] == pytest.approx([r["loss"] for r in train])
    assert [history[r["step"]]["val/loss"] for r in val] == pytest.approx([r["val_loss"] for r in val])
    assert "eval/exact_match" in history[3]
    assert any(t == "model" and "adapter_model.safetensors" in names for t, names in artifacts), artifacts


def test_plots_are_written_when_the_run_ends(tracked_run):
    from PIL import Image

    plots = {p.name for p in (tracked_run / "plots").glob("*.png")}
    assert plots == {"loss.png", "lr.png", "throughput.png", "grad_norm.png", "eval.png"}  # no preference.png
    assert not list((tracked_run / "plots").glob(".*"))  # atomic writes leave no temporary files
    with Image.open(tracked_run / "plots" / "loss.png") as im:
        assert im.width > 1000 and im.height > 300
        assert _color_pixels(im) > 200  # the training-loss curve is drawn, not an empty frame


def test_report_command_writes_one_self_contained_page(tracked_run):
    r = run_cli("report", f"run={tracked_run}")
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tracked_run / "report.html").read_text()
    assert f"wrote {tracked_run / 'report.html'}" in r.stdout
    assert page.count('<img alt=') == 5 and page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # the eval table and the example predictions beside their references
    man = json.loads((tracked_run / "manifest.json").read_text())
    first = json.loads((tracked_run / "eval" / "after_train.predictions.jsonl").read_text().splitlines()[0])
    import html

    assert html.escape(first["prompt"]) in page and html.escape(first["reference"]) in page
    pred = first["prediction_tuned"]  # the random tiny model may write only blanks
    assert (html.escape(pred) in page) if pred.strip() else ('<div class="txt empty">(empty)</div>' in page)
    assert "after_train" in page and "exact_match" in page
    assert f"{man['final_train_loss']:.4g}" in page


def _fake_run(d: Path, rows, status="finished", evals=None, overrides=None, manifest=None):
    d.mkdir(parents=True)
    man = {"status": status, "recipe": "demo", "total_steps": len([r for r in rows if "loss" in r]),
           "final_train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
           "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
           "train_rows": 40, "val_rows": 4, **(manifest or {})}
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "config.yaml").write_text("model:\n  name: tiny_llama\npeft:\n  method: lora\n  r: 8\n  alpha: 16\n"
                                   "trainer:\n  max_grad_norm: 1.0\n  lr: 0.001\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, (results, preds) in (evals or {}).items():
        (d / "eval").mkdir(exist_ok=True)
        (d / "eval" / f"{name}.json").write_text(json.dumps({"rows": len(preds), "results": results,
                                                             "settings": {"split": "validation"}}))
        (d / "eval" / f"{name}.predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return d


def _rows(n, start=2.0, dpo=False, every=5):
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "loss": start * (0.97 ** s), "lr": 1e-3 * (1 - s / n), "grad_norm": 0.5 + 1 / s,
             "tokens": 300 * s, "tokens_per_s": 90 + s % 3, "time": 1000.0 + 3 * s}
        if dpo:
            r.update(rewards_chosen=0.01 * s, rewards_rejected=-0.01 * s, margin=0.02 * s, accuracy=min(1, 0.5 + s / n))
        rows.append(r)
        if s % every == 0:
            rows.append({"step": s, "val_loss": start * (0.975 ** s) + 0.1,
                         **({"val_accuracy": 0.6, "val_margin": 0.015 * s} if dpo else {})})
    return rows


def test_preference_plot_and_escaped_report(tmp_path):
    from ftctl.report import ReportConfig, report

    preds = [{"prompt": "<script>alert(1)</script> Write 1 May 2020", "reference": ["2020-05-01", "05/01/2020"],
              "prediction_tuned": "2020-05-01 & <b>", "prediction_base": "May", "scores_tuned": {"exact_match": 1.0},
              "scores_base": {"exact_match": 0.0}} for _ in range(7)]
    run = _fake_run(tmp_path / "dpo", _rows(30, dpo=True),
                    evals={"exact": ({"tuned": {"exact_match": 0.75, "seconds": 3}, "base": {"exact_match": 0.25}},
                                     preds)})
    out = report(ReportConfig(run=str(run), examples=3))
    assert {p.name for p in (run / "plots").glob("*.png")} == {"loss.png", "lr.png", "throughput.png",
                                                               "grad_norm.png", "preference.png", "eval.png"}
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;b&gt;") == 3  # examples=3 rows of predictions, escaped
    assert "2020-05-01\n— or —\n05/01/2020" in page  # several references
    assert "+0.5" in page  # the tuned − base column


def test_sweep_folder_report(tmp_path):
    from ftctl.report import ReportConfig, find_trials, report

    sweep = tmp_path / "multirun" / "demo" / "20260101-120000"
    for i, (r, lr) in enumerate([(4, 1e-3), (8, 1e-3), (16, 1e-3)]):
        rows = _rows(12, start=2.0 + i / 4)
        _fake_run(sweep / str(i), rows, overrides=["model=tiny_llama", f"peft.r={r}", f"trainer.lr={lr}"],
                  manifest={"eval": {"exact_match": 0.1 * i, "seconds": 2}})
    _fake_run(sweep / "10", [], status="failed", overrides=["model=tiny_llama", "peft.r=0", "trainer.lr=0.001"])
    assert [p.name for p in find_trials(sweep)] == ["0", "1", "2", "10"]  # natural order
    out = report(ReportConfig(run=str(sweep)))
    page = out.read_text()
    assert page.count('<tr class="best">') == 1 and '<tr class="best"><td><a href="#trial-0">' in page
    assert "<b>peft.r=16</b>" in page and "<b>trainer.lr" not in page  # only what varies is bold
    assert page.count("src=\"data:image/png;base64,") == 1 + 3  # all trials together, then each trial with metrics
    assert "no metrics" in page and "failed" in page
    assert (sweep / "plots" / "sweep_loss.png").is_file()


def test_report_of_a_folder_that_holds_no_run(tmp_path):
    r = run_cli("report", f"run={tmp_path}")
    assert r.returncode == 2 and "not a run directory or a sweep folder" in r.stderr


def test_tracker_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"'neptune' is not a tracker; choose from: none, tensorboard, mlflow"):
        compose("model=tiny_llama", "logging.report_to=[tensorboard,neptune]")
    with pytest.raises(ConfigError, match="wandb_mode='sometimes' is not allowed"):
        compose("model=tiny_llama", "logging.wandb_mode=sometimes")
    cfg, _ = compose("model=tiny_llama", "logging.report_to=tensorboard")  # a bare name
    from ftctl.config.checks import names

    assert names(cfg) == ["tensorboard"]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^logging.report_to=wandb needs the wandb package: pip install wandb$"):
        compose("model=tiny_llama", "logging.report_to=[tensorboard,wandb]")


def test_wandb_auto_mode_is_offline_without_an_api_key(tmp_path, monkeypatch):
    from ftctl.train.tracking import _wandb_mode

    cfg, _ = compose("model=tiny_llama")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert _wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B's own setting wins
    assert _wandb_mode(cfg) == "disabled"
    cfg.logging.wandb_mode = "online"
    assert _wandb_mode(cfg) == "online"


def _color_pixels(img, color=PLOT_COLOR, tol=30) -> int:
    import numpy as np

    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(color)).max(axis=-1) < tol).sum())


def test_a_failing_tracker_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from rich.console import Console

    from ftctl.train.trackers import TensorBoard
    from ftctl.train.tracking import Trackers

    class Broken(TensorBoard):
        def log(self, values, step=None, **kw):
            self._safe("logging", self._boom)

        def _boom(self):
            raise OSError("disk full")

    cfg, _ = compose("model=tiny_llama", "logging.report_to=tensorboard")
    t = Broken(tmp_path)
    trackers = Trackers(cfg, tmp_path, Accelerator(cpu=True, log_with=[t]), Console(file=open(os.devnull, "w")))
    trackers.log({"step": 1, "loss": 2.0}, 1)
    trackers.log({"step": 2, "loss": 1.0}, 2)  # dropped after the first failure, no second warning
    trackers.finish(None)
    assert t.broken == "logging: OSError: disk full"
    # and a plot that cannot be drawn is a warning line too
    import io

    from ftctl import report

    def boom(*a, **k):
        raise ValueError("no fonts")
    monkeypatch.setattr(report, "write_plots", boom)
    buf = io.StringIO()
    assert report.plots_after_run(tmp_path, Console(file=buf, width=300)) == []
    assert "warning: could not write plots" in buf.getvalue() and "no fonts" in buf.getvalue()


# ----------------------------------------------------------------------------- the page in a real browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; `make setup` installs it as root)")


class _CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.n, self.events = 0, []

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)


def _open_in_chromium(pages: list[Path], tmp: Path) -> list[dict]:
    chrome = _chromium()
    profile = tmp / "chrome-profile"
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    proc = subprocess.Popen([chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--hide-scrollbars", "--mute-audio", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        while True:  # the port file can come a moment before the server answers
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
                break
            except OSError:
                assert time.time() < deadline, "chromium's DevTools server does not answer"
                time.sleep(0.2)
        cdp = _CDP(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        for domain in ("Page", "Network", "Runtime", "Log"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        results = []
        for page in pages:
            cdp.events.clear()
            cdp.call("Page.navigate", url=page.resolve().as_uri())
            cdp.wait_for("Page.loadEventFired")
            dom = json.loads(cdp.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
                images: document.images.length,
                loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
                height: document.documentElement.scrollHeight, title: document.title,
                tables: document.querySelectorAll('table').length})""")["result"]["value"])
            height = min(dom["height"], 5000)
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
            png = tmp / f"{page.parent.name}-report.png"
            import base64

            png.write_bytes(base64.b64decode(shot["data"]))
            ev = cdp.events
            errors = [e["params"] for e in ev if e.get("method") == "Runtime.exceptionThrown"
                      or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                      or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
            requests = [e["params"]["request"]["url"] for e in ev if e.get("method") == "Network.requestWillBeSent"]
            results.append({"dom": dom, "png": png, "errors": errors,
                            "remote": [u for u in requests if not u.startswith(("file:", "data:"))]})
        cdp.ws.close()
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_report_pages_in_headless_chromium(tracked_run, tmp_path):
    from PIL import Image, ImageStat

    from ftctl.report import ReportConfig, report

    _chromium()
    run_page = report(ReportConfig(run=str(tracked_run)))
    sweep = tmp_path / "sweep"
    for i in range(2):
        _fake_run(sweep / str(i), _rows(20, start=2 + i / 3), overrides=[f"peft.r={4 * (i + 1)}"])
    sweep_page = report(ReportConfig(run=str(sweep)))
    run_res, sweep_res = _open_in_chromium([run_page, sweep_page], tmp_path)
    for res, n_images in ((run_res, 5), (sweep_res, 3)):
        assert res["errors"] == [] and res["remote"] == [], res
        assert res["dom"]["images"] == res["dom"]["loaded"] == n_images, res["dom"]
        assert res["dom"]["tables"] >= 1
        with Image.open(res["png"]) as im:
            rgb = im.convert("RGB")
            assert rgb.width == 1280 and rgb.height >= 900
            assert max(ImageStat.Stat(rgb).stddev) > 20  # not a blank page
            assert _color_pixels(rgb) > 300  # the plots are drawn on the page
    if os.environ.get("FTCTL_REPORT_SCREENSHOT"):  # for a person to look at
        shutil.copy(run_res["png"], os.environ["FTCTL_REPORT_SCREENSHOT"])
