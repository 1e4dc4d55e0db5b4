"""The package logger: silent unless configured; the command line's one handler."""

from __future__ import annotations

import io
import logging

import pytest

from lplr_dask import logs


@pytest.fixture
def logger():
    """The package logger as an unconfigured program has it; restored afterwards."""
    saved = logs.logger.handlers[:], logs.logger.level, logs.logger.propagate
    logs.logger.handlers[:] = [h for h in logs.logger.handlers if isinstance(h, logging.NullHandler)]
    logs.logger.setLevel(logging.NOTSET)
    logs.logger.propagate = True
    yield logs.logger
    logs.logger.handlers[:], logs.logger.level, logs.logger.propagate = saved


def test_unconfigured_it_prints_nothing(logger, capfd):
    logs.info("progress")
    logs.warning("a warning")  # the NullHandler keeps Python's last-resort handler out
    assert capfd.readouterr() == ("", "")


def test_messages_reach_a_callers_logging(logger, caplog):
    caplog.set_level(logging.INFO, logger="lplr_dask")
    logs.info("pass 1: sketch: done")
    logs.warning("careful")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("lplr_dask", logging.INFO, "pass 1: sketch: done"),
        ("lplr_dask", logging.WARNING, "careful"),
    ]


@pytest.mark.parametrize(("verbosity", "level"), [(-1, logging.WARNING), (0, logging.INFO), (1, logging.DEBUG)])
def test_configure_installs_one_handler(logger, capfd, verbosity, level):
    logs.configure(verbosity)
    logs.configure(verbosity)  # again (a second command in one process): still one handler
    handlers = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    assert len(handlers) == 1 and logger.level == level and not logger.propagate
    logs.info("a progress line")
    logs.warning("a warning")
    err = capfd.readouterr().err.splitlines()
    assert err == (["a warning"] if verbosity < 0 else ["a progress line", "a warning"])


def test_live_console_only_on_a_terminal_at_info(logger, monkeypatch):
    logs.configure(0)
    assert logs.live_console() is None  # pytest's stderr is not a terminal

    class Tty(io.StringIO):
        def isatty(self):
            return True

    (handler,) = [h for h in logger.handlers if h.get_name() == logs.CLI_HANDLER]
    monkeypatch.setattr(handler, "stream", Tty())
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal even under CI's TERM=dumb
    assert logs.live_console() is not None
    logger.setLevel(logging.WARNING)  # --quiet: no bar
    assert logs.live_console() is None
