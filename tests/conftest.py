"""Shared test setup: one Ray auth mode for every Ray command, quiet HF progress bars."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ---- where the suite's time goes: wall time per test module, printed last (CI shows the log's tail) ----

_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    slow = sorted(((s, m) for m, s in _MODULE_SECONDS.items() if s >= 10), reverse=True)
    if slow:
        terminalreporter.write_sep("=", f"seconds per test module (>= 10 s; all modules: {sum(_MODULE_SECONDS.values()):.0f} s)")
        for seconds, module in slow:
            terminalreporter.write_line(f"{seconds:7.0f}  {module}")
