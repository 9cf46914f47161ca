"""Tables of finished (or running) runs for the terminal: `mbp runs` and `mbp report`."""

from __future__ import annotations

from rich.table import Table

from mbp_cli.run.records import RunRecord
from mbp_cli.units import format_bytes, format_percent


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{value:.1f}s"


def runs_table(records: list[RunRecord]) -> Table:
    """One line per run: folder, status, steps, best eval, wall time; fits 80 columns, where a
    long folder name folds (never cut) and the figures stay whole. The recipe's name is shown
    only where a folder's name does not begin with it (as the default folder's does)."""
    table = Table(title=f"runs in {records[0].path.parent}" if records else "runs")
    has_names = any(not r.path.name.startswith(r.name) for r in records)
    # the folder names fold to make room; the figures never do
    table.add_column("run", overflow="fold")
    if has_names:
        table.add_column("name", overflow="fold")
    for column in ("status", "steps", "best\naccuracy", "best\nloss", "wall\ntime"):
        table.add_column(column, no_wrap=True,
                         justify="right" if column in ("steps", "wall\ntime") else "left")
    for r in records:
        loss = "-" if r.best_eval_loss is None else f"{r.best_eval_loss:.4f}"
        table.add_row(r.path.name, *([r.name] if has_names else []), r.state, r.progress,
                      format_percent(r.best_eval_accuracy), loss, _seconds(r.wall_seconds))
    return table


def comparison_table(records: list[RunRecord]) -> Table:
    """The runs' summaries side by side, a column each."""
    table = Table(title="runs side by side")
    table.add_column("")
    for r in records:
        table.add_column(r.label, justify="right", overflow="fold")

    def row(label: str, value) -> None:
        table.add_row(label, *[value(r, r.summary or {}) for r in records])

    row("status", lambda r, s: r.state)
    row("steps", lambda r, s: r.progress)
    row("target batch", lambda r, s: _start(r, "target_batch"))
    row("micro-batch", lambda r, s: _start(r, "micro_batch"))
    row("final train loss", lambda r, s: _last(r, "step", "loss", "{:.4f}")
        if r.events.get("step") or not s.get("final_train_loss") else
        f"{s['final_train_loss']:.4f}")
    row("eval loss", lambda r, s: _last(r, "eval", "eval_loss", "{:.4f}"))
    row("eval accuracy", lambda r, s: format_percent(_last_value(r, "eval", "eval_accuracy")))
    row("samples/s", lambda r, s: "-" if not s.get("samples_per_second") else
        f"{s['samples_per_second']:,.0f}")
    row("peak memory", lambda r, s: "-" if not s.get("peak_memory_bytes") else
        format_bytes(s["peak_memory_bytes"]))
    row("wall time", lambda r, s: _seconds(r.wall_seconds))
    return table


def _start(record: RunRecord, key: str) -> str:
    starts = record.events.get("start", [])
    return str(starts[-1][key]) if starts else str((record.summary or {}).get(key, "-"))


def _last_value(record: RunRecord, kind: str, key: str) -> float | None:
    values = [e[key] for e in record.events.get(kind, []) if e.get(key) is not None]
    return values[-1] if values else None


def _last(record: RunRecord, kind: str, key: str, spec: str) -> str:
    value = _last_value(record, kind, key)
    return "-" if value is None else spec.format(value)
