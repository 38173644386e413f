"""Log lines, JSON event logs, one-line progress and command-line help shared by every script."""

import argparse
import json
import sys
import time
from pathlib import Path


def log_event(out_dir: str | Path | None, line: str, record: dict) -> None:
    """Print `line` and append `record` as one JSON line to `<out_dir>/log.jsonl`."""
    print(line, flush=True)
    if out_dir is None:
        return
    path = Path(out_dir) / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def save_config(out_dir: str | Path, config: dict) -> None:
    """Print the resolved configuration and save it as `<out_dir>/config.json`."""
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    print(f"config\n{text}", flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text(text + "\n")


def warn(message: str) -> None:
    """Print a warning to stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Progress:
    """One progress line: done/total, rate and time left.

    On a terminal the line is redrawn in place; otherwise it is printed every 10% of the total.
    """

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total = max(total, 1)
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.next_report = self.total / 10

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty or self.done >= self.next_report or self.done >= self.total:
            self.next_report = self.done + self.total / 10
            self._draw(end="" if self.tty else "\n")

    def close(self) -> None:
        if self.tty:
            self._draw(end="\n")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        text = (
            f"{self.desc}: {self.done}/{self.total} | {rate:.1f} {self.unit}/s | "
            f"{elapsed:.0f} s elapsed, {left:.0f} s left"
        )
        prefix = "\r" if self.tty else ""
        print(prefix + text, end=end, file=sys.stderr, flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none (None or off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)
