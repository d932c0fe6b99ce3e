"""The report as files: a PNG chart, or one self-contained HTML page (tables and the chart).

Drawn with matplotlib (the ``charts`` extra: ``pip install 'agent-supervise[charts]'``),
imported only here, with the Agg backend, so no display is ever needed. The HTML page has
no scripts and loads nothing: the chart is inline SVG.
"""

from __future__ import annotations

import html
import io
import time
from typing import Any

from .errors import SupervisorError
from .report import Charge, breakdown, daily, money

__all__ = ["write_html", "write_png"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SupervisorError(
            "charts need matplotlib, which is not installed",
            hint="pip install 'agent-supervise[charts]' (or leave out --html/--png)",
        ) from None
    matplotlib.use("Agg")  # files only: never look for a display
    import matplotlib.pyplot as plt

    return plt


def _figure(charges: list[Charge]) -> Any:
    """Spend per day per agent, stacked bars, USD."""
    plt = _pyplot()
    days, agents, spend = daily(charges)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(days) + 3), 4), dpi=100)
    bottom = [0.0] * len(days)
    for agent in agents:
        heights = [spend.get((day, agent), 0) / 1e6 for day in days]  # drawing only: floats
        ax.bar(days, heights, bottom=bottom, label=agent)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("USD")
    ax.set_title("LLM spend per day (UTC) by agent")
    if agents:
        ax.legend(loc="upper left", fontsize="small")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return fig


def _save(charges: list[Charge], fmt: str) -> bytes:
    plt = _pyplot()
    fig = _figure(charges)
    try:
        out = io.BytesIO()
        # No timestamps in the file: the same ledger gives the same bytes.
        meta = {"Date": None} if fmt == "svg" else {"Software": None}
        fig.savefig(out, format=fmt, metadata=meta)
        return out.getvalue()
    finally:
        plt.close(fig)


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as error:
        raise SupervisorError(
            f"cannot write {path}: {error.strerror or error}", hint="check the path"
        ) from None


def write_png(path: str, charges: list[Charge]) -> None:
    """The chart of spend per day per agent as a PNG file."""
    _write(path, _save(charges, "png"))


def write_html(path: str, charges: list[Charge], by: list[str], title: str) -> None:
    """One page: the total, the chart (inline SVG) and a table per dimension."""
    total = sum(charge.micro_usd for charge in charges)
    svg = _save(charges, "svg").decode("utf-8") if charges else "<p>No spend.</p>"
    svg = svg[svg.find("<svg") :] if "<svg" in svg else svg  # drop the XML prolog
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{padding:.2em .8em;border-bottom:1px solid #ddd}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Total: <b>{money(total)}</b> over {sum(c.calls for c in charges)} calls · "
        f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
        svg,
    ]
    for name in by:
        rows = breakdown(charges, name)
        parts.append(f"<h2>By {html.escape(name)}</h2><table>")
        parts.append(
            "<tr><th>" + html.escape(name) + "</th><th>calls</th><th>input</th>"
            "<th>output</th><th>cost</th><th>share</th></tr>"
        )
        for row in rows:
            cells = [
                str(row.calls),
                str(row.input_tokens),
                str(row.output_tokens),
                money(row.micro_usd),
                f"{row.share(total):.1%}",
            ]
            parts.append(
                f"<tr><td>{html.escape(row.name)}</td>"
                + "".join(f'<td class="n">{c}</td>' for c in cells)
                + "</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    _write(path, "\n".join(parts).encode("utf-8"))
