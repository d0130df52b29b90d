"""What tests share besides fixtures (those are in tests/conftest.py): the repository's paths, running
a job in this process, and writing a model run folder. Helpers with a subject of their own live
beside this one: hostile_corpus, outputs, multinode, netinfo, s3local, stalling_s3."""

from __future__ import annotations

import logging
import re
import runpy
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_PHOTOS = REPO.parent / "shared" / "data" / "catdog-dev"


# A line the session's Ray forwards from one of its processes: "(RayTrainWorker pid=123) ...", "(raylet) ..."
_FORWARDED_BY_RAY = re.compile(r"(\x1b\[\d+m)?\((raylet|\S+ pid=\d+)")


def job_lines(text: str) -> list[str]:
    """The lines of captured output that the job in this process wrote (not those Ray forwards)."""
    return [line for line in text.splitlines() if not _FORWARDED_BY_RAY.match(line)]


def run_job_module(module: str, *argv: str) -> int:
    """`python -m <module> <argv>` in this process (runpy runs it as `__main__`, as -m does), for
    jobs that need no fresh interpreter (help, user mistakes, one prediction, an export): returns
    the exit code; the output is in capsys.

    The job's logging set-up (catdog.cli.configure_logging replaces the root handlers with one on
    the captured stderr) is undone after, so later tests log as before."""
    root = logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level
                                           for name in ["", *logging.root.manager.loggerDict]}
    saved_argv = sys.argv
    sys.argv = [module, *argv]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": imported by a test before
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_info:
        return 0 if exit_info.code is None else exit_info.code
    finally:
        sys.argv = saved_argv
        root.handlers[:] = handlers
        for name in ["", *logging.root.manager.loggerDict]:
            logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))
    raise AssertionError(f"{module} returned without exiting")


def write_model_run(run: Path, image_size: int = 32, classes: tuple[str, ...] = ("cats", "dogs"), seed: int = 0) -> Path:
    """A run folder as training writes it (model.keras, classes.json, config.json), with a randomly
    initialised (seeded) backbone and head: no download, a few seconds to build."""
    import json

    from catdog.model.build import ModelSpec, build_feature_extractor, build_head, build_model, save_model

    import keras  # after catdog.model.build, which imports TensorFlow quietly

    spec = ModelSpec(num_classes=len(classes), image_size=image_size)
    extractor = build_feature_extractor(spec, None, seed=seed)
    keras.utils.set_random_seed(seed)
    save_model(build_model(extractor, build_head(spec)), str(run / "model.keras"))
    (run / "classes.json").write_text(json.dumps(list(classes)))
    (run / "config.json").write_text(json.dumps({"model_spec": spec.to_dict()}))
    return run
