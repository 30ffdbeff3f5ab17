"""The experiment table of task=classify runs: one row per run directory (strategy, trainable share,
train / validation / test accuracy, test F1 of the positive label, time), read from each run's
manifest.json. Give run directories or folders holding them (a sweep's multirun/<recipe>/<time>):

    python benchmarks/classify_table.py outputs/sms_spam_strategies [--positive spam] [--csv FILE]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

COLUMNS = ["strategy", "balance", "trainable", "trainable share", "train acc", "val acc", "test acc",
           "test F1 {pos}", "test F1 macro", "time (s)"]


def manifests(paths: list[str]) -> list[tuple[Path, dict]]:
    found = []
    for p in map(Path, paths):
        files = [p / "manifest.json"] if (p / "manifest.json").is_file() else sorted(p.rglob("manifest.json"))
        for f in files:
            m = json.loads(f.read_text())
            if m.get("task") == "classify" and m.get("status") == "finished":
                found.append((f.parent, m))
    return found


def rows(found, positive: str | None) -> list[dict]:
    out = []
    for run, m in found:
        labels = m["classify"]["labels"]
        pos = positive or labels[-1]
        out.append({
            "run": str(run), "strategy": m["strategy"], "balance": m["classify"].get("balance", "none").split(":")[0],
            "trainable": f"{m['trainable_params']:,}", "trainable share": f"{m['trainable_percent']:.3g}%",
            "train acc": f"{m['train_accuracy']:.2f}%", "val acc": f"{m['val_accuracy']:.2f}%",
            "test acc": f"{m['test_accuracy']:.2f}%", "test F1 pos": f"{m[f'test_f1_{pos}']:.2f}",
            "test F1 macro": f"{m['test_f1_macro']:.2f}", "time (s)": f"{m['train_time_s']:.0f}", "pos": pos})
    order = ["features", "head", "last_block", "lora", "full"]
    return sorted(out, key=lambda r: (order.index(r["strategy"]) if r["strategy"] in order else 99, r["run"]))


def markdown(table: list[dict]) -> str:
    pos = table[0]["pos"] if table else "positive"
    head = [c.format(pos=pos) for c in COLUMNS]
    keys = [c.replace("{pos}", "pos") for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in table]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--positive", help="the label whose F1 is shown (default: the last label)")
    ap.add_argument("--csv", help="also write the table as CSV to this file")
    a = ap.parse_args(argv)
    table = rows(manifests(a.paths), a.positive)
    if not table:
        print("no finished task=classify runs under " + ", ".join(a.paths), file=sys.stderr)
        return 1
    print(markdown(table))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
