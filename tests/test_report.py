"""The HTML report: what it holds, that it is self-contained, and (in a real Chromium driven by Playwright) that it
loads offline without errors, that hovering and dragging do what they say, and that the page's decoder agrees with
PyTorch's. The browser tests skip when Playwright or Chromium is missing; `.ci/run` installs both."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
from vaekit.uses.report import _align, _coords, page_data, report

CHROMIUM = os.environ.get("VAEKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REFERENCE = Path(__file__).with_name("data") / "report-digits.png"
CONV = {"model.net": "conv", "model.channels": [8]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits) -> dict[str, vaekit.Run]:
    """Small digits runs: an MLP with 2 latent dimensions, one with 3 (a PCA plane) and a conv net (a grid)."""
    root = tmp_path_factory.mktemp("report")
    quiet = {"dataset": digits, "verbose": False}
    return {
        "mlp": vaekit.train("digits", root / "mlp", epochs=8, **quiet),
        "mlp3": vaekit.train("digits", root / "mlp3", epochs=8, latent=3, seed=2, **quiet),
        "conv": vaekit.train(
            "digits", root / "conv", epochs=3, **{"model.net": "conv", "model.channels": [8]}, **quiet
        ),
    }


def _latents(explorer: dict) -> np.ndarray:
    """The latent each point of an explorer's map stands for: origin + p @ axes."""
    return np.array(explorer["origin"]) + _coords(explorer) @ np.array(explorer["axes"])


def test_each_point_of_the_map_is_its_posterior_mean_or_its_projection(runs):
    """With two latent dimensions a point is the posterior mean itself; with more, the plane holds the means'
    orthogonal projection on their first two principal components."""
    for name, exact in (("mlp", True), ("mlp3", False)):
        run = runs[name]
        e = page_data(run, points=200)["explorer"]
        model = run.model_on(torch.device("cpu"))
        with torch.no_grad():
            mean = model.encode(run.examples("test", 200).x)[0].double().numpy()
        latents = _latents(e)
        if exact:
            np.testing.assert_allclose(latents, mean, atol=1e-6)
        else:
            axes = np.array(e["axes"])
            np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-5)  # orthonormal
            projected = np.array(e["origin"]) + (mean - np.array(e["origin"])) @ axes.T @ axes
            np.testing.assert_allclose(latents, projected, atol=1e-5)
            assert np.abs(latents - mean).max() > 1e-3  # a projection, not the means


def test_aligning_two_maps_keeps_every_points_latent_and_brings_them_together(runs):
    """Procrustes alignment moves the second map onto the first, and changes its plane so that every point still
    stands for the same latent."""
    pages = [page_data(runs["mlp"], points=300), page_data(runs["mlp3"], points=300)]
    before = _latents(pages[1]["explorer"])
    distance = np.abs(_coords(pages[1]["explorer"]) - _coords(pages[0]["explorer"])).mean()
    _align(pages, [runs["mlp"], runs["mlp3"]])
    np.testing.assert_allclose(_latents(pages[1]["explorer"]), before, atol=1e-4)
    assert np.abs(_coords(pages[1]["explorer"]) - _coords(pages[0]["explorer"])).mean() < distance
    assert pages[1]["explorer"]["aligned"] == 300
    # Maps of other examples are left as they are: pairing them by index would mean nothing.
    other = [page_data(runs["mlp"], points=300), page_data(runs["mlp3"], points=200)]
    coords = other[1]["explorer"]["coords"]
    _align(other, [runs["mlp"], runs["mlp3"]])
    assert other[1]["explorer"]["coords"] == coords and "aligned" not in other[1]["explorer"]


def _data(page: str) -> list[dict]:
    """The runs' data a report page holds."""
    block = page[page.index('<script type="application/json" id="data">') :].split(">", 1)[1].split("</script>")[0]
    return json.loads(block)


def test_the_page_is_self_contained(runs, tmp_path):
    """One file: no address outside it (a content security policy forbids any), the page's script and data inline;
    the settings, curves and evaluation are in it."""
    vaekit.evaluate(runs["mlp"], k=10, limit=50)
    page = report(runs["mlp"], tmp_path / "r.html", points=300).read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page
    (data,) = _data(page)
    assert "evaluation (evaluation-first50.json)" in data["tables"] and "<polyline" in data["curves"]
    assert "latent = 2" in data["settings"]


def test_names_that_look_like_markup_cannot_break_the_page(runs, tmp_path):
    """A run named like the end of a script element and an HTML comment: the page's data holds no "<" at all and
    still reads back as the same JSON, and the title shows the name escaped."""
    run = tmp_path / "x<!--<script>{{script}}"
    shutil.copytree(runs["mlp"].dir, run)
    page = report(run, tmp_path / "r.html", points=50).read_text()
    block = page[page.index('<script type="application/json" id="data">') :].split(">", 1)[1].split("</script>")[0]
    assert "<" not in block
    assert _data(page)[0]["name"] == run.name
    assert "<title>vaekit report: x&lt;!--&lt;script&gt;{{script}}</title>" in page


def test_a_damaged_result_is_shown_as_unreadable_and_one_point_is_a_map(runs, tmp_path):
    """A run's damaged evaluation.json becomes a note in the page, not a failed report (training writes one at its
    end); a map of a single example (PCA of one point) is still a plane."""
    run = tmp_path / "run"
    shutil.copytree(runs["mlp3"].dir, run)
    (run / "evaluation.json").write_text("{")
    page = report(run, tmp_path / "r.html", points=1).read_text()
    assert "unreadable" in page and "evaluation.json" in page
    e = page_data(run, points=1)["explorer"]
    assert e["n"] == 1 and np.array(e["axes"]).shape == (2, 3)
    np.testing.assert_allclose(np.array(e["axes"]) @ np.array(e["axes"]).T, np.eye(2), atol=1e-6)


def test_the_report_command(runs, tmp_path, capsys):
    """`vaekit report RUN` writes RUN/report.html; several runs need -o; what is not a run is one line, exit 2."""
    from conftest import assert_one_line_error, run_cli

    code, out, _ = run_cli(["report", runs["mlp"].dir], capsys)
    assert code == 0 and (runs["mlp"].dir / "report.html").is_file() and "report.html" in out
    code, _, err = run_cli(["report", runs["mlp"].dir, runs["conv"].dir], capsys)
    assert_one_line_error(code, err)
    assert "-o FILE.html" in err
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert_one_line_error(code, err)
    code, _, _ = run_cli(["report", runs["mlp"].dir, runs["mlp3"].dir, "-o", tmp_path / "both.html"], capsys)
    assert code == 0 and (tmp_path / "both.html").is_file()


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    # .ci/run sets VAEKIT_REQUIRE_BROWSER, so that CI fails rather than skipping these tests.
    missing = pytest.fail if os.environ.get("VAEKIT_REQUIRE_BROWSER") else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("the browser tests need Playwright (pip install -e '.[dev]')")
    if CHROMIUM is None:
        missing("the browser tests need Chromium (apt install chromium, or set VAEKIT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A report opened in the browser, with the console errors and every request it made."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_function("window.vaekitReport && window.vaekitReport.ready !== null")

    def state(self, expression: str):
        return self.page.evaluate(f"(() => {{ const s = window.vaekitReport; return {expression}; }})()")

    def hover(self, panel: int, example: int) -> None:
        x, y = self.state(f"s.panels[{panel}].toPixel({example})")
        self.page.mouse.move(x, y)

    def drag(self, panel: int, start: tuple[float, float], end: tuple[float, float]) -> None:
        box = self.page.locator("canvas.map").nth(panel).bounding_box()
        self.page.mouse.move(box["x"] + start[0], box["y"] + start[1])
        self.page.mouse.down()
        self.page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=5)
        self.page.mouse.up()


def _decoded(run: vaekit.Run, latent: list[float]) -> np.ndarray:
    with torch.no_grad():
        return run.model_on(torch.device("cpu")).decode(torch.tensor([latent])).flatten().double().numpy()


def test_the_page_loads_from_disk_without_errors_or_requests(browser, runs, tmp_path):
    """From file://, no console error and no request but the page itself."""
    page = Page(browser, report(runs["mlp"], tmp_path / "r.html"))
    assert page.errors == []
    assert page.requests == [page.url]
    assert page.state("s.panels.length") == 1


def test_hovering_a_point_shows_that_example(browser, runs, tmp_path):
    """Moving the mouse onto a known point shows its index, label and loss, and its picture."""
    page = Page(browser, report(runs["mlp"], tmp_path / "r.html", points=400))
    e = page_data(runs["mlp"], points=400)["explorer"]
    coords = _coords(e)
    # An example far from its neighbours, so that no other point is nearer to the mouse.
    gaps = np.sort(((coords[:, None] - coords[None]) ** 2).sum(-1), 1)[:, 1]
    example = int(gaps.argmax())
    page.hover(0, example)
    info = page.page.locator(".info[data-example]").first
    assert info.get_attribute("data-example") == str(example)
    assert f"label {e['labels'][example]}" in info.text_content()
    assert f"{e['loss'][example]:.2f} nats" in info.text_content()
    assert page.errors == []


def test_dragging_decodes_the_latent_under_the_cursor_as_pytorch_does(browser, runs, tmp_path):
    """Dragging changes the decoded image; the pixels the page computed equal PyTorch's decoding of the latent it
    reports to within 1e-5, and the parity check shown on the page agrees."""
    for name in ("mlp", "mlp3"):
        run = runs[name]
        page = Page(browser, report(run, tmp_path / f"{name}.html"))
        page.drag(0, (100, 100), (150, 260))
        first = page.state("[s.panels[0].lastLatent, s.panels[0].lastDecoded]")
        page.drag(0, (300, 300), (320, 90))
        second = page.state("[s.panels[0].lastLatent, s.panels[0].lastDecoded]")
        assert np.abs(np.array(first[1]) - np.array(second[1])).max() > 0.05  # the image changed
        for latent, pixels in (first, second):
            assert len(latent) == run.model.latent
            np.testing.assert_allclose(pixels, _decoded(run, latent), atol=1e-5)
        parity = page.state("s.parity[0]")
        assert parity is not None and parity < 1e-5
        assert "largest absolute difference" in page.page.locator(".parity").text_content()
        assert page.errors == []


def test_a_conv_decoder_shows_the_nearest_precomputed_image(browser, runs, tmp_path):
    """A decoder the page cannot run comes as a grid decoded over the plane: dragging shows the grid image at the
    nearest grid latent, which is PyTorch's decoding of that latent (to 8-bit precision), also when its map is
    rotated onto another run's."""
    for name, shown in (("conv", [runs["conv"]]), ("beside", [runs["mlp"], runs["conv"]])):
        page = Page(browser, report(shown if len(shown) > 1 else shown[0], tmp_path / f"{name}.html"))
        panel = len(shown) - 1
        page.drag(panel, (120, 200), (210, 230))
        latent, pixels = page.state(f"[s.panels[{panel}].lastLatent, s.panels[{panel}].lastDecoded]")
        np.testing.assert_allclose(pixels, _decoded(runs["conv"], latent), atol=0.5 / 255 + 1e-6)
        assert page.state(f"s.parity[{panel}]") is None
        assert "does not run in the page" in page.page.locator(".parity").nth(panel).text_content()
        assert page.errors == []


def test_two_runs_side_by_side_link_their_selection(browser, runs, tmp_path):
    """Two maps; hovering an example in one marks and shows the same example in the other."""
    page = Page(browser, report([runs["mlp"], runs["mlp3"]], tmp_path / "two.html", points=300))
    assert page.page.locator("canvas.map").count() == 2
    page.hover(1, 17)
    assert page.state("s.selected") == 17
    shown = page.page.locator(".info[data-example]")
    assert [shown.nth(i).get_attribute("data-example") for i in range(2)] == ["17", "17"]
    assert page.errors == []


def test_the_page_looks_as_it_did(browser, runs, tmp_path):
    """A screenshot of the top of a report at a fixed viewport matches the reference to within a tolerance: at most
    3% of pixels differ by more than 48 levels (fonts and point positions may move a pixel between machines)."""
    page = Page(browser, report(runs["mlp"], tmp_path / "r.html"))
    page.hover(0, 0)
    shot = tmp_path / "shot.png"
    page.page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1280, "height": 900})
    assert REFERENCE.exists(), f"no reference screenshot: copy {shot} to {REFERENCE} after checking it"
    a = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(REFERENCE).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape
    differ = (np.abs(a - b).max(-1) > 48).mean()
    assert differ < 0.03, f"{differ:.1%} of pixels differ from {REFERENCE}"
