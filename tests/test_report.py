"""``medcl report``: one self-contained HTML page per run folder, checked as text and rendered in Chromium.

The run folders are synthetic copies of what the jobs write (the layouts of ``medcl pretrain``, ``finetune``,
``benchmark label-efficiency``, ``mil train`` and a demo folder nesting runs), with values whose summaries
are known, a NaN loss, a leakage override, an unfinished run and hostile text to escape.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medcl import __version__
from medcl.cli import main
from medcl.core.errors import MedclDataError
from medcl.core.record import RunRecord
from medcl.engine.plots import plot_curves
from medcl.report import detect_kind, render_report, scan_run, write_report
from medcl.report.html import markdown_html
from medcl.report.readers import summarise_series

HOSTILE = "<script>alert('x')</script>"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


# ---- synthetic run folders -------------------------------------------------------------------------------

def _png(path: Path, seed: int, size: tuple[int, int] = (12, 20)) -> Path:
    rgb = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


LOSS = {s: 3.0 - 0.1 * s for s in range(0, 20, 2)}
LOSS[6] = math.nan
KNN = {0: 0.30, 10: 0.55, 19: 0.50}


def make_pretrain(out: Path, with_plot: bool = True) -> Path:
    """A ``medcl pretrain`` folder: config, record, summary, merged metrics (a NaN loss at step 6), loss.png."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(f"# {HOSTILE}\nmethod: gd\nseed: 0\ntrainer:\n  max_steps: 20\n")
    rec = RunRecord(kind="pretrain", config={"method": "gd", "trainer": {"max_steps": 20}},
                    cases_seen=["c0", "c1", "c2"]).to_dict()
    rec.update(probe_cases=["c3"], data="/data/<phantoms>")
    (out / "record.json").write_text(json.dumps(rec))
    (out / "summary.json").write_text(json.dumps({
        "method": "gd", "steps": 20, "world_size": 1, "volumes_per_step": 4, "step_seconds_median": 0.25,
        "peak_rss_mb": 700.5, "probe_first": {"step": 0, "probe/knn_partition": 0.3, "probe/chance": 0.25},
        "probe_last": {"step": 19, "probe/knn_partition": 0.5, "probe/chance": 0.25}}))
    rows = [[s, LOSS.get(s, ""), 20.0 - s / 2 if s in LOSS else "", KNN.get(s, "")] for s in sorted(set(LOSS) | set(KNN))]
    _csv(out / "metrics.csv", ["step", "train/loss", "train/global_eff_rank", "probe/knn_partition"], rows)
    if with_plot:
        plot_curves(out / "metrics.csv", out / "loss.png", title="pretrain")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 1024)
    return out


def make_finetune(out: Path, overlap: list[str], finished: bool = True) -> Path:
    """A ``medcl finetune`` folder (``finished=False``: killed before its summary)."""
    (out / "logs").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\noptim:\n  lr: 0.01\n")
    (out / "cases.json").write_text(json.dumps({"train": ["c0", "c1"], "validation": [], "test": ["t0", "t1"],
                                                "budget": 2, "combination": 0, "source": "split.json"}))
    _csv(out / "logs" / "metrics.csv", ["epoch", "step", "train/loss"], [[0, s, 1.0 / (s + 1)] for s in range(0, 10, 2)])
    if not finished:
        return out
    plot_curves(out / "logs" / "metrics.csv", out / "loss.png", title="ft")
    init = {"checkpoint": "/runs/pretrain/backbone.pt", "kind": "pretrain", "cases_seen": 3, "test_overlap": overlap}
    (out / "summary.json").write_text(json.dumps({
        "status": "done", "steps": 10, "budget": 2, "combination": 0, "n_train": 2, "n_validation": 0, "n_test": 2,
        "init": init, "seed": 0, "lr": 0.01, "mode": "full",
        "test": {"n_cases": 2, "dice_mean": 0.75, "dice_std": 0.05, "dice_n_undefined": 0}, "seconds": 3.0}))
    _csv(out / "metrics.csv", ["case", "class", "name", "dice", "hd95", "nsd", "ref_voxels", "pred_voxels"],
         [["t0", 1, "liver", 0.8, 2.0, 0.9, 100, 98], ["t1", 1, "liver", 0.7, 3.0, 0.8, 90, 95]])
    (out / "summary.md").write_text("# Fine-tuning summary\n\n| class | Dice |\n|---|---|\n| liver | 0.750 |\n")
    return out


def make_benchmark(out: Path) -> Path:
    """A ``medcl benchmark label-efficiency`` folder with one finished and one unfinished fine-tune."""
    out.mkdir(parents=True)
    (out / "split.json").write_text(json.dumps({"format": "medcl.label_budget_split", "seed": 0, "test": ["t0", "t1"],
                                                "pool": ["c0", "c1", "c2"], "budgets": {"1": [["c0"]], "2": [["c0", "c1"]]}}))
    (out / "lr_selection.json").write_text(json.dumps({"selection": "validation", "chosen": {"random|1": 0.01}}))
    _csv(out / "results.csv", ["init", "budget", "case", "dice"], [["random", 1, f"t{i}", 0.5 + i / 100] for i in range(7)])
    (out / "results.md").write_text(f"# Label-efficiency benchmark\n\n- data: `/x` {HOSTILE}\n\n"
                                    "| init | N=1 |\n|---|---|\n| random | 0.500 +- 0.010 (n=1) |\n\n"
                                    '<img src="http://example.com/track.png">\n')
    _png(out / "dice_vs_labels.png", 1)
    make_finetune(out / "runs" / "random" / "n1" / "c0" / "s0" / "lr0.01", [])
    make_finetune(out / "runs" / "random" / "n2" / "c0" / "s0" / "lr0.01", [], finished=False)
    return out


def make_mil(out: Path) -> Path:
    """A ``medcl mil train`` folder (the record inside model.pt) with an undefined AUC and a heatmap PNG."""
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"data": "bags.csv", "n_bags": 12, "classes": ["0", "1"], "in_dim": 5,
                                              "grouped_by_patient": False, "heads": ["abmil"]}))
    _csv(out / "results.csv", ["head", "seed", "fold", "accuracy", "balanced_accuracy", "auc", "f1"],
         [["abmil", 0, 0, 0.75, 0.75, 0.8, 0.7], ["abmil", 0, 1, 1.0, 1.0, "", 1.0]])
    _csv(out / "predictions.csv", ["head", "seed", "fold", "bag", "label", "pred"],
         [["abmil", 0, f % 2, f"b{f}", "1", "1"] for f in range(80)])
    (out / "results.md").write_text("# MIL cross-validation\n\n| head | accuracy |\n|---|---|\n| abmil | 0.875 |\n")
    (out / "config_abmil.yaml").write_text("head: abmil\ntrain:\n  epochs: 4\n")
    rec = RunRecord(kind="mil", config={"head": "abmil"}, cases_seen=[f"b{i}" for i in range(12)]).to_dict()
    torch.save({"format": "medcl-mil-model", "state_dict": {"w": torch.zeros(2)}, "record": rec}, out / "model.pt")
    _png(out / "slide0_heatmap.png", 2)
    return out


def make_demo(out: Path) -> Path:
    """A demo folder: a pretraining run, two fine-tunes (one with a leakage override), dice.png, examples.png."""
    out.mkdir(parents=True)
    make_pretrain(out / "pretrain")
    make_finetune(out / "finetune_pretrained", overlap=["t0"])
    make_finetune(out / "finetune_random", overlap=[])
    _png(out / "dice.png", 3)
    _png(out / "examples.png", 4, (30, 40))
    (out / "summary.json").write_text(json.dumps({"kind": "demo", "dice": {"pretrained": 0.75, "random": 0.6}}))
    (out / "results.md").write_text("| init | Dice |\n|---|---|\n| pretrained | 0.75 |\n| random | 0.60 |\n")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"pretrain": make_pretrain(root / "pretrain"), "benchmark": make_benchmark(root / "bench"),
            "mil": make_mil(root / "mil"), "demo": make_demo(root / "demo")}


# ---- helpers ---------------------------------------------------------------------------------------------

class _Tags(HTMLParser):
    """The real tags and attributes of a page (text that merely looks like a tag is not one)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def check_self_contained(page: str) -> list[bytes]:
    """Assert no resource is referenced from outside the page; return the decoded bytes of every image."""
    parser = _Tags()
    parser.feed(page)
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "frame"), tag
        for name in ("src", "href", "srcset", "action", "data", "poster", "background", "formaction"):
            if name in attrs:
                assert attrs[name].startswith(("data:image/png;base64,", "#")), f"<{tag} {name}={attrs[name][:60]!r}>"
        assert "url(" not in attrs.get("style", "")
    assert not any("url(" in css or "@import" in css for css in parser.styles)
    pngs = []
    for tag, attrs in parser.tags:
        if tag != "img":
            continue
        raw = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "PNG"
            im.verify()
        pngs.append(raw)
    return pngs


# ---- detection and content -------------------------------------------------------------------------------

def test_detect_kind(runs):
    assert detect_kind(runs["pretrain"]) == "pretrain"
    assert detect_kind(runs["benchmark"]) == "label-efficiency"
    assert detect_kind(runs["mil"]) == "mil"
    assert detect_kind(runs["demo"]) == "demo"
    assert detect_kind(runs["demo"] / "finetune_random") == "finetune"
    assert detect_kind(runs["pretrain"] / "checkpoints") is None


def test_kind_comes_from_the_record_and_folders_without_one_are_legacy(runs, tmp_path):
    """A folder whose record.json names its kind is that kind whatever files it holds; the old-style folders of
    the fixture (finetune without record.json) still render, labelled "(legacy)"."""
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "results.csv").write_text("a,b\n1,2\n")  # would look like a benchmark or MIL run to the old detection
    rec = RunRecord(kind="wsi-features", complete=False, step=2).to_dict()
    (odd / "record.json").write_text(json.dumps(rec))
    assert detect_kind(odd) == "wsi-features"
    sec = scan_run(odd)
    assert sec.kind == "wsi-features" and not sec.legacy
    assert any("incomplete" in p for p in sec.problems)  # complete: false is a listed problem
    legacy = runs["demo"] / "finetune_random"
    assert not (legacy / "record.json").exists()
    page = render_report(legacy)
    assert "finetune (legacy)" in page and "Test metrics per case and class (metrics.csv)" in page


def test_metric_summary_against_reference():
    series = {"train/loss": [(float(s), v) for s, v in sorted(LOSS.items())], "probe/knn": sorted(KNN.items()),
              "train/other": [(0.0, 1.0), (1.0, 2.0)]}
    table, problems = summarise_series(series, "t")
    rows = {r[0]: r for r in table.rows}
    finite = {s: v for s, v in LOSS.items() if not math.isnan(v)}
    best_step = min(finite, key=finite.get)
    assert rows["train/loss"][1:5] == [str(len(LOSS)), "0-18", "3", f"{LOSS[18]:.6g}"]
    assert float(rows["train/loss"][5]) == pytest.approx(min(finite.values()))
    assert float(rows["train/loss"][6]) == pytest.approx(max(finite.values()))
    assert rows["train/loss"][7].endswith(f"(min, step {best_step})") and rows["train/loss"][8] == "1"
    assert rows["probe/knn"][7] == "0.55 (max, step 10)"
    assert rows["train/other"][7] == "" and problems == ["train/loss: 1 non-finite value(s) (nan first at step 6)"]


def test_pretrain_page(runs):
    page = render_report(runs["pretrain"])
    assert ">pretrain<" in page and f"medcl {__version__}" in page
    rec = json.loads((runs["pretrain"] / "record.json").read_text())
    for value in (rec["created"], rec["environment"]["torch"], rec["environment"]["python"]):
        assert f"<td>{value}</td>" in page
    assert "<th>cases seen in training</th><td>3</td>" in page
    assert "&lt;script&gt;" in page and "/data/&lt;phantoms&gt;" in page and not re.search("https?:", page)
    assert "train/loss: 1 non-finite value(s)" in page            # the NaN loss is a listed problem
    assert "method: gd" in page and "<details" in page             # the config, collapsible
    pngs = check_self_contained(page)
    assert pngs == [(runs["pretrain"] / "loss.png").read_bytes()]   # the run's own plot, byte for byte


def test_curves_drawn_when_the_run_wrote_none(tmp_path):
    run = make_pretrain(tmp_path / "p", with_plot=False)
    page = render_report(run)
    assert len(check_self_contained(page)) == 1
    assert "drawn for this report" in page


def test_benchmark_page(runs):
    page = render_report(runs["benchmark"])
    pngs = check_self_contained(page)
    assert (runs["benchmark"] / "dice_vs_labels.png").read_bytes() in pngs
    assert (runs["benchmark"] / "runs/random/n1/c0/s0/lr0.01/loss.png").read_bytes() in pngs
    assert "&lt;img src=&quot;http://example.com/track.png&quot;&gt;" in page   # raw HTML in markdown stays text
    assert "<th>init</th><th>N=1</th>" in page and "<td>0.500 +- 0.010 (n=1)</td>" in page
    assert "1 of 2 fine-tuning runs unfinished" in page and "runs/random/n2/c0/s0/lr0.01" in page
    assert "<th>test cases (fixed)</th><td>2</td>" in page


def test_mil_page_reads_the_record_inside_the_model(runs):
    page = render_report(runs["mil"])
    pngs = check_self_contained(page)
    assert pngs == [(runs["mil"] / "slide0_heatmap.png").read_bytes()]
    rec = torch.load(runs["mil"] / "model.pt", weights_only=True)["record"]
    assert f"<td>{rec['created']}</td>" in page and "<th>cases seen in training</th><td>12</td>" in page
    assert "auc undefined in 1 of 2 folds" in page
    assert "first 50 of 80 rows" in page                           # long predictions are cut, and say so


def test_nested_demo(runs):
    root = scan_run(runs["demo"])
    assert root.kind == "demo"
    assert [(c.title, c.kind) for c in root.children] == [   # pretraining first: the fine-tunes start from it
        ("pretrain", "pretrain"), ("finetune_pretrained", "finetune"), ("finetune_random", "finetune")]
    leak = [p for p in root.children[1].problems if p.startswith("leakage override")]
    assert len(leak) == 1 and "1 of the test cases" in leak[0]
    assert not any("leakage" in p for p in root.children[2].problems)
    page = render_report(runs["demo"])
    pngs = check_self_contained(page)
    expected = [runs["demo"] / n for n in ("dice.png", "examples.png", "finetune_pretrained/loss.png",
                                           "finetune_random/loss.png", "pretrain/loss.png")]
    assert sorted(pngs) == sorted(p.read_bytes() for p in expected)
    for anchor in re.findall(r'<section class="run" id="([^"]+)"', page):
        assert f'href="#{anchor}"' in page                          # every run section is in the contents


def test_markdown_is_escaped():
    out = markdown_html("## T <b>\n\n- a **b** `<c>`\n\n| x | <y> |\n|---|---|\n| 1 | - |\n\ntext *e* <i>")
    assert "<h4>T &lt;b&gt;</h4>" in out and "<li>a <strong>b</strong> <code>&lt;c&gt;</code></li>" in out
    assert "<th>&lt;y&gt;</th>" in out and "<td>-</td>" in out and "<p>text <em>e</em> &lt;i&gt;</p>" in out


def test_errors(tmp_path, capsys):
    with pytest.raises(MedclDataError, match="no such folder"):
        scan_run(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(MedclDataError, match="nothing medcl recognises"):
        scan_run(tmp_path / "empty")
    with pytest.raises(MedclDataError, match="not a folder"):
        scan_run(tmp_path / "empty" / "notes.txt")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "nothing medcl recognises" in err and str(tmp_path / "empty") in err


def test_cli_writes_default_and_chosen_file(runs, tmp_path, capsys):
    run = make_mil(tmp_path / "m")
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "1 image(s)" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "x" / "r.html")]) == 0
    assert (tmp_path / "x" / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert write_report(run, tmp_path / "y.html") == tmp_path / "y.html"


# ---- headless Chromium -----------------------------------------------------------------------------------

IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var failed = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt; });
  var out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify({total: imgs.length, failed: failed});
  document.body.appendChild(out);
});
</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_renders_in_headless_chromium(runs, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"headless Chromium not installed ({CHROMIUM} absent; .ci/run installs the Debian packages "
                    "chromium and chromium-driver)")
    # the folder holding every synthetic run: one page with every kind, images in collapsed blocks included
    page_path = write_report(runs["demo"].parent, tmp_path / "report.html")
    page = page_path.read_text()
    n_images = len(check_self_contained(page))
    assert n_images == 9 and "<details" in page
    # a test copy: the check script (the page's policy otherwise forbids scripts, and keeps forbidding any image
    # that is not a data: URI) plus one broken image, to show the check can fail
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probe = probe.replace("</body>", '<img src="data:image/png;base64,AAAA" alt="broken-control">'
                                     f"{IMAGE_CHECK}</body>", 1)
    (tmp_path / "probe.html").write_text(probe)
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", (tmp_path / "probe.html").as_uri()], tmp_path)
    found = re.search(r'<pre id="img-check">(.*?)</pre>', res.stdout)
    assert found, f"no image check in Chromium's DOM (rc {res.returncode}): {res.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result == {"total": n_images + 1, "failed": ["broken-control"]}

    shot = tmp_path / "shot.png"
    res = _chromium(["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000", page_path.as_uri()],
                    tmp_path)
    assert shot.is_file() and shot.stat().st_size > 0, f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1200, 2000)
        assert len(im.convert("L").getcolors(maxcolors=2**16) or range(2**16)) > 10   # not a blank page
    shutil.rmtree(tmp_path / "profile0", ignore_errors=True)
