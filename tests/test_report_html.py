"""The notebook view of a report (FusionReport._repr_html_), rendered by a real
headless browser (Debian's chromium, which `make test` installs): what it
shows, in what order, and that its text can be read on a light and on a dark
page. The browser runs the page's script and we read back what it measured
from the rendered document (innerText is the text as laid out: a closed
<details> shows only its summary)."""
import json
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

from fusion import analyze, fuse
from zoo import calibrate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Jupyter's own page colours: JupyterLab light, and its dark theme.
THEMES = {"light": ("#ffffff", "rgba(0, 0, 0, 0.87)"),
          "dark": ("#111111", "rgba(255, 255, 255, 0.87)")}

MEASURE = r"""
function rgba(s) {
  const p = s.match(/rgba?\(([^)]+)\)/)[1].split(",").map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
}
function over(top, bottom) {
  const a = top[3];
  return [0, 1, 2].map(i => top[i] * a + bottom[i] * (1 - a)).concat([1]);
}
function chain(el) {
  const c = [];
  for (let e = el; e; e = e.parentElement) c.push(e);
  return c.reverse();
}
function background(el) {
  let bg = [255, 255, 255, 1];
  for (const e of chain(el)) bg = over(rgba(getComputedStyle(e).backgroundColor), bg);
  return bg;
}
function lum(c) {
  const f = v => {
    v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
}
function contrast(el) {
  const bg = background(el);
  let fg = rgba(getComputedStyle(el).color);
  for (const e of chain(el)) fg[3] *= Number(getComputedStyle(e).opacity);
  const a = lum(over(fg, bg)), b = lum(bg);
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}
const out = {};
for (const theme of document.querySelectorAll(".theme")) {
  const report = theme.querySelector(".fusion-report");
  let worst = 100, where = "";
  for (const el of report.querySelectorAll("*")) {
    const text = [...el.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim());
    if (!text.length || !el.getClientRects().length) continue;
    const c = contrast(el);
    if (c < worst) { worst = c; where = el.tagName + ": " + text[0].textContent.trim(); }
  }
  const closed = report.innerText;
  report.querySelectorAll("details").forEach(d => d.open = true);
  out[theme.id] = {closed: closed, open: report.innerText, contrast: worst, where: where};
}
document.getElementById("out").textContent = JSON.stringify(out);
"""


def render(html_fragment, tmp_path, doctype=True):
    """What chromium shows of the fragment on each theme's page. Without a
    doctype the page is in quirks mode, where tables do not inherit the page's
    colour unless told to (a notebook is in standards mode; an HTML export or an
    email of the report may not be)."""
    assert CHROMIUM, "the browser test needs chromium: `make test` installs it"
    themes = "".join(
        f'<div class="theme" id="{name}" style="background:{bg};color:{fg};'
        f'font-family:sans-serif;padding:8px">{html_fragment}</div>'
        for name, (bg, fg) in THEMES.items())
    page = tmp_path / "report.html"
    page.write_text(f"{'<!doctype html>' if doctype else ''}<html><body style='margin:0'>{themes}"
                    f"<pre id='out'></pre><script>{MEASURE}</script></body></html>")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", proc.stdout, re.S)
    assert found and found.group(1), proc.stderr[-2000:]
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">").replace("&quot;", '"'))


class Mixed(nn.Module):
    """Two pairs that fold, and two norms left for two reasons."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.after_relu = nn.BatchNorm2d(4)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.batch_stats(self.after_relu(torch.relu(x)))


@pytest.fixture(scope="module")
def report_html():
    model = calibrate(Mixed(), shape=(2, 3, 8, 8))
    _, report = fuse(model, example_inputs=torch.randn(1, 3, 8, 8), return_report=True)
    assert sorted(p.norm for p in report.fused) == ["bn1", "bn2"]
    assert len(report.left) == 2
    return report._repr_html_()


@pytest.fixture(scope="module")
def shown(report_html, tmp_path_factory):
    return render(report_html, tmp_path_factory.mktemp("html"))


@pytest.mark.slow
def test_summary_then_left_norms_then_fused(shown):
    text, at = shown["light"]["open"], 0
    for part in ("FusionReport", "fused 2 norm(s)", "left 2", "verified: rel_err",
                 "Left (2)", "after_relu", "not_after_producer", "batch_stats",
                 "Fused (2)", "bn1", "conv1"):
        found = text.find(part, at)
        assert found >= 0, (part, text)
        at = found + len(part)
    assert text.count("Left (2)") == 1 and text.index("Left (2)") < text.index("Fused")


@pytest.mark.slow
def test_fused_names_are_hidden_while_details_is_closed(shown):
    closed, opened = shown["light"]["closed"], shown["light"]["open"]
    assert "Fused (2)" in closed and "after_relu" in closed  # the left ones show
    for name in ("conv1", "conv2"):
        assert name not in closed and name in opened  # the control: opening shows them


@pytest.mark.slow
@pytest.mark.parametrize("theme", sorted(THEMES))
def test_text_contrast_passes_on_light_and_dark_pages(shown, theme):
    # WCAG AA for normal text: 4.5
    assert shown[theme]["contrast"] >= 4.5, shown[theme]


@pytest.mark.slow
def test_text_contrast_passes_in_quirks_mode_too(report_html, tmp_path):
    quirks = render(report_html, tmp_path, doctype=False)
    for theme in THEMES:
        assert quirks[theme]["contrast"] >= 4.5, (theme, quirks[theme])


@pytest.mark.slow
def test_the_contrast_check_can_fail(tmp_path):
    """The control: dark grey text fixed on a dark page is caught."""
    bad = '<div class="fusion-report"><p style="color:#444">FusionReport</p></div>'
    assert render(bad, tmp_path)["dark"]["contrast"] < 4.5


def test_the_root_norm_is_named_and_its_reason_is_true():
    report = analyze(nn.BatchNorm2d(3))
    assert [(n.norm, n.reason) for n in report.left] == [("(model)", "not_after_producer")]
    assert "no layer to fold it into" in report.left[0].detail
    assert "(model)" in report._repr_html_()
