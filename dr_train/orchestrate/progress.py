"""The live progress table of a run: relation, state, step/total, last loss, ETA, retries.

The driver calls `refresh()` between its waits on Ray (every --refresh-seconds); each call reads only what the
relations appended to their metrics.jsonl and attempts.jsonl since the last call (read-only, shared storage) and
redraws: a `rich` live table on a terminal, or, in logs (not a terminal, or without rich), one line per change of a
relation's state or retry count and the whole table at the start and every `plain_every` seconds while steps
move.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dr_train.orchestrate import records
from dr_train.run_folder import RelationFolder

STATES = ("queued", "running", "finished", "failed", "skipped")


@dataclass
class Row:
    relation: str
    total: int
    state: str = "queued"
    step: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    retries: int = 0
    tail: records.MetricsTail | None = None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Per-relation progress of one run, redrawn on `refresh()`."""

    def __init__(self, storage: Path, run_id: str, relations: list[str], total_steps: int, mode: str = "auto",
                 out: TextIO | None = None, plain_every: float = 60.0):
        self.storage, self.run_id, self.out = Path(storage), run_id, out or sys.stdout
        self.rows = {name: Row(name, total_steps) for name in relations}
        if mode == "auto":
            mode = "rich" if rich_available() and self.out.isatty() else "plain"
        if mode == "rich" and not rich_available():
            mode = "plain"
        self.mode, self.plain_every = mode, plain_every
        self.started = time.time()
        self._live = None
        self._seen: dict[str, tuple] = {}
        self._last_print, self._last_steps = 0.0, -1

    # ---- state ----------------------------------------------------------------------------------------------
    def set_state(self, relation: str, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        if state in ("finished", "failed"):
            self._poll(self.rows[relation])          # its last steps and retries, before it stops being polled
        self.rows[relation].state = state
        if state in ("finished", "failed", "skipped"):
            self.rows[relation].eta_seconds = None

    def _poll(self, row: Row) -> None:
        rel_dir = records.relation_dir(self.storage, row.relation)
        if row.tail is None:
            row.tail = records.MetricsTail(RelationFolder(rel_dir).metrics)
        last = row.tail.poll()
        if last is not None:
            row.step, row.loss = int(last["step"]), last.get("loss")
        if row.state in ("queued", "running"):
            summary = records.attempt_summary(rel_dir, self.run_id)
            row.retries = max(0, summary["attempts"] - 1)
            if summary["attempts"] and row.state == "queued":
                row.state = "running"
        sec = row.tail.seconds_per_step()
        if row.state == "running" and sec is not None:
            row.eta_seconds = max(0, row.total - row.step) * sec

    def refresh(self) -> None:
        """Read what the relations wrote since the last call and redraw."""
        for row in self.rows.values():
            if row.state in ("queued", "running") or row.tail is None:
                self._poll(row)
        self._draw()

    # ---- drawing --------------------------------------------------------------------------------------------
    def summary_line(self) -> str:
        counts = {s: sum(r.state == s for r in self.rows.values()) for s in STATES}
        parts = [f"{n} {s}" for s, n in counts.items() if n]
        return f"run {self.run_id}: " + ", ".join(parts) + f"; elapsed {_eta(time.time() - self.started)}"

    def cells(self, row: Row) -> list[str]:
        return [row.relation, row.state, f"{row.step}/{row.total}", "" if row.loss is None else f"{row.loss:.4g}",
                _eta(row.eta_seconds), str(row.retries)]

    HEADER = ("relation", "state", "step", "loss", "ETA", "retries")

    def text(self) -> str:
        rows = [list(self.HEADER)] + [self.cells(r) for r in self.rows.values()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([self.summary_line(), *lines])

    def _rich_table(self):
        from rich.table import Table  # deferred: rich is an optional dependency

        table = Table(title=self.summary_line(), title_justify="left")
        for name in self.HEADER:
            table.add_column(name, justify="right" if name in ("step", "loss", "ETA", "retries") else "left")
        styles = {"running": "cyan", "finished": "green", "failed": "bold red", "skipped": "dim", "queued": ""}
        for row in self.rows.values():
            table.add_row(*self.cells(row), style=styles[row.state])
        return table

    def _draw(self) -> None:
        if self.mode == "off":
            return
        if self.mode == "rich":
            if self._live is None:
                from rich.console import Console  # deferred: rich is an optional dependency
                from rich.live import Live  # deferred: rich is an optional dependency

                self._live = Live(self._rich_table(), console=Console(file=self.out), auto_refresh=False,
                                  transient=False)
                self._live.start()
            self._live.update(self._rich_table(), refresh=True)
            return
        now, lines = time.time(), []
        for row in self.rows.values():
            seen = (row.state, row.retries)
            if self._seen.get(row.relation) != seen:
                if row.relation in self._seen or row.state != "queued":
                    lines.append(self.event(row))
                self._seen[row.relation] = seen
        steps = sum(r.step for r in self.rows.values())
        if self._last_print == 0.0 or (steps != self._last_steps and now - self._last_print >= self.plain_every):
            lines.append(self.text() + "\n")
            self._last_print, self._last_steps = now, steps
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def event(self, row: Row) -> str:
        """One log line for a relation's change of state or retry count."""
        where = f"{row.step}/{row.total}" + (f", loss {row.loss:.4g}" if row.loss is not None else "")
        retries = f", retries {row.retries}" if row.retries else ""
        return f"[{_eta(time.time() - self.started)}] {row.relation}: {row.state} ({where}{retries})"

    def close(self) -> None:
        """Draw the final state and stop redrawing."""
        self.refresh()
        if self._live is not None:
            self._live.stop()
            self._live = None
