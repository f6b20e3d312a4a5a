"""Silencing the libraries underneath curate: their loggers, progress bars and warnings.

transformers, sentence-transformers, datasets, TRL, peft and bitsandbytes each print on their own
(loading bars, deprecation warnings about arguments curate sets correctly, a bitsandbytes notice
about an optional CPU kernel package). curate shows its own progress instead; `-v` on the training
commands lets the libraries speak.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIBRARIES = (
    "transformers",
    "sentence_transformers",
    "datasets",
    "huggingface_hub",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "torch",
)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Library loggers at ERROR, their progress bars off, their warnings ignored; all restored after.
    The loggers are set before anything is imported: importing transformers loads bitsandbytes,
    whose notice must find its logger quiet already."""
    loggers = {name: logging.getLogger(name) for name in LIBRARIES}
    levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_level, hf_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            for name in LIBRARIES:
                warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(hf_level)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
