"""Self-contained HTML pages: inline CSS, plots as embedded PNG, no script and no network.

Records are untrusted input, so every text goes through `esc`, and each page carries a content
security policy that forbids scripts, frames and any fetch: even an escaping mistake could not run
code or call out. Opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
  padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .5em; margin: .2em 0; }
.dim { color: #777; } img { max-width: 100%; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
    """A table; cells are escaped; columns whose index is in `numeric` align right."""

    def cell(tag: str, i: int, value) -> str:
        klass = ' class="n"' if i in numeric else ""
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else esc(value)
        return f"<{tag}{klass}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure_png(draw, size: tuple[float, float] = (6.4, 3.2)) -> bytes:
    """PNG bytes of a matplotlib figure drawn by `draw(ax)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    draw(ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def text_block(text: str, limit: int = 600) -> str:
    text = text or ""
    cut = text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit:,} more characters)"
    return f"<pre>{esc(cut)}</pre>"
