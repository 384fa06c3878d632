"""A pytest plugin (``-p benchmarks.gpu.pytest_record``): one JSON line per test outcome, appended to
``$LOPT_TEST_RECORD`` as each one ends, so a pytest run cut short by its time limit still says what ran
(a junit file is written only at the end). Under pytest-xdist only the controller writes (it sees every
worker's reports)."""

from __future__ import annotations

import json
import os


class _Recorder:
    def __init__(self, path: str):
        self.sink = open(path, "a", buffering=1)  # noqa: SIM115 - closed at unconfigure

    def pytest_runtest_logreport(self, report):
        # the call's outcome; setup / teardown only where they fail or skip (a skip is raised in setup)
        if report.when != "call" and report.outcome == "passed":
            return
        message = report.longreprtext[-1500:] if report.outcome != "passed" and report.longreprtext else None
        self.sink.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                    "duration": round(report.duration, 3), "message": message}) + "\n")

    def close(self):
        self.sink.close()


def pytest_configure(config):
    path = os.environ.get("LOPT_TEST_RECORD")
    if path and not hasattr(config, "workerinput"):  # an xdist worker: its controller records
        config._lopt_recorder = _Recorder(path)
        config.pluginmanager.register(config._lopt_recorder, "lopt_recorder")


def pytest_unconfigure(config):
    recorder = getattr(config, "_lopt_recorder", None)
    if recorder is not None:
        recorder.close()
