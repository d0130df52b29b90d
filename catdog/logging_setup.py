"""catdog's log line format, shared by drivers (`catdog.cli.configure_logging`) and Ray actors."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def log_from_actor() -> None:
    """Inside a Ray actor, send catdog's INFO lines to stderr, which Ray shows in the driver.

    Ray workers log at WARNING and without catdog's handler; elsewhere this changes nothing.
    """
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    catdog_logger = logging.getLogger("catdog")
    if not catdog_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        catdog_logger.addHandler(handler)
        catdog_logger.setLevel(logging.INFO)
        catdog_logger.propagate = False
