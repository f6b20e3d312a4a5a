"""The HTML report and the HTML diff in a real browser (headless Chromium): they render (a screenshot
that is not blank), and hostile record text shows as text and runs nothing.

"Runs nothing" is proven, not assumed: each hostile snippet would mark <body> with a data-pwned
attribute if it ran, and a control page with the same snippet outside curate's escaping does get
marked in the same browser, so the check would catch a script that ran."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it when missing)"
)

HOSTILE = [
    '<script>document.body.setAttribute("data-pwned", "script")</script>',
    "<img src=x onerror=\"document.body.setAttribute('data-pwned', 'img')\">",
    "<a href=\"javascript:document.body.setAttribute('data-pwned', 'link')\">click me</a>",
]


def chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}", *args, url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class Body(HTMLParser):
    """The <body> attributes and the tags of a serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict = {}
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "body":
            self.body = dict(attrs)


def dom(path: Path, tmp: Path) -> Body:
    parsed = Body()
    parsed.feed(chromium(path.as_uri(), tmp, "--virtual-time-budget=3000", "--dump-dom").stdout)
    return parsed


def not_blank(path: Path, tmp: Path) -> None:
    import matplotlib.image

    shot = tmp / f"{path.stem}.png"
    chromium(path.as_uri(), tmp, "--window-size=1000,1400", f"--screenshot={shot}")
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the screenshot is one colour"
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.01, "almost nothing is drawn"


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pages")
    script, img, link = HOSTILE  # each dropped for another reason, so the report shows all three
    rows = [
        {"instruction": f"Quote {script} back", "output": "As an AI language model, I cannot."},  # refusal
        {"instruction": f"Explain {img}", "output": f"It is markup: {img}"},
        {"instruction": f"Explain {img}", "output": f"It is markup: {img}"},  # exact duplicate
        {"instruction": f"Explain {link}"},  # prompt only
        {"instruction": "What is two plus two?", "output": "Four."},
    ]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folders = []
    for name, refusals in (("a", False), ("b", True)):
        recipe = tmp / f"{name}.yaml"
        stages = [{"normalize": {}}, {"filter": {"drop_refusals": refusals}}, {"dedup": {"exact": True}}]
        recipe.write_text(json.dumps({"inputs": [{"path": "rows.jsonl"}], "stages": stages}))
        result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp / name), "--json"])
        assert result.exit_code == 0, result.output
        folders.append(Path(json.loads(result.output)["path"]))
    report, diff = tmp / "report.html", tmp / "diff.html"
    assert CliRunner().invoke(main, ["report", str(folders[1]), "--out", str(report)]).exit_code == 0
    result = CliRunner().invoke(main, ["diff", str(folders[0]), str(folders[1]), "--html", str(diff)])
    assert result.exit_code == 0, result.output
    control = tmp / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body><p>control</p>{HOSTILE[0]}</body></html>")
    return {"report": report, "diff": diff, "control": control, "tmp": tmp}


def test_the_check_sees_a_script_that_runs(pages):
    assert dom(pages["control"], pages["tmp"]).body.get("data-pwned") == "script"


@pytest.mark.parametrize("page", ["report", "diff"])
def test_pages_render_and_hostile_text_runs_nothing(pages, page):
    path, tmp = pages[page], pages["tmp"]
    text = path.read_text()
    for snippet in HOSTILE:  # the records' text is on the page, escaped
        assert snippet not in text
    shown = [s for s in HOSTILE if html.escape(s) in text]
    assert shown == (HOSTILE if page == "report" else [HOSTILE[0]])
    parsed = dom(path, tmp)
    assert "data-pwned" not in parsed.body
    assert not [t for t, _ in parsed.tags if t in ("script", "iframe", "object", "embed")]
    assert not [a for t, a in parsed.tags if t == "a" and "javascript:" in a.get("href", "")]
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in parsed.tags if t == "img")
    not_blank(path, tmp)


def test_report_sections(pages):
    text = pages["report"].read_text()
    for heading in ("Stage funnel", "Dropped records, by reason", "Lengths", "Sources of the kept records"):
        assert heading in text
    assert "filter: refusal (1)" in text and "dedup: exact_duplicate (1)" in text
    assert text.count("data:image/png;base64,") == 3  # funnel, characters, turns
    assert "://" not in text  # nothing to fetch
