"""`ftctl train -m ...`: Hydra's multirun over the same composition. Each trial gets its own run
directory under multirun/<recipe>/<time>/<n>; a failed trial is recorded and the sweep goes on."""
from __future__ import annotations

import sys
from datetime import datetime


def multirun(overrides: list[str], debug: bool = False) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from .config import prepare_overrides, recipe_search_path, register_schemas, validate
    from .errors import Preempted
    from .paths import config_dir

    register_schemas()
    overrides = prepare_overrides(overrides)
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "train")
    sweep_dir = f"multirun/{recipe.replace(',', '+')}/{datetime.now():%Y%m%d-%H%M%S}"
    results: list[tuple[str, str]] = []
    stopped: list[Exception] = []

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def job(cfg):
        hc = HydraConfig.get()
        label = " ".join(hc.overrides.task) or "(defaults)"
        if stopped:
            results.append((label, "not run: the sweep was stopped"))
            return
        try:
            validate(cfg)
            with open_dict(cfg):
                if not cfg.output_dir:
                    cfg.output_dir = hc.runtime.output_dir
            from .train.runner import train

            train(cfg, {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v},
                  debug=debug)
            results.append((label, "finished"))
        except Preempted as e:  # SIGTERM/SIGINT stops the whole sweep; the finished trials stay
            stopped.append(e)
            results.append((label, "preempted"))
        except Exception as e:  # one failed trial must not end the sweep
            if debug:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"ftctl: trial [{label}] failed: {msg}", file=sys.stderr)
            results.append((label, f"failed: {msg}"))

    argv = sys.argv
    sys.argv = ["ftctl-train", "-m", *overrides, recipe_search_path(),
                f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
                "hydra/job_logging=none", "hydra/hydra_logging=none"]
    try:
        job()
    except KeyboardInterrupt:
        print(f"ftctl: sweep interrupted; finished trials are in {sweep_dir}", file=sys.stderr)
        return 130
    finally:
        sys.argv = argv
    if stopped:
        print(f"ftctl: sweep stopped: {stopped[0]}; finished trials are in {sweep_dir}", file=sys.stderr)
        return stopped[0].exit_code
    failed = [r for r in results if r[1] != "finished"]
    print(f"sweep {sweep_dir}: {len(results) - len(failed)} finished, {len(failed)} failed")
    return 1 if failed else 0
