"""The web page in a real browser: Debian's headless Chromium, driven by Playwright, against a live server."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from conftest import serving_artifact
from skindistil.serve import create_app, serve_in_background

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the browser tests")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    artifact = serving_artifact(tmp_path_factory.mktemp("browser"))
    with serve_in_background(create_app(artifact)) as url:
        yield url


@pytest.fixture(scope="module")
def page(chromium_path, base_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_page_shows_the_api_probabilities_and_the_overlay(page, base_url, ham_root, tmp_path):
    from playwright.sync_api import expect

    image = sorted((ham_root / "images").glob("*.jpg"))[3]
    expected = httpx.post(f"{base_url}/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    expected = expected.json()

    page.goto(base_url)
    notice = page.get_by_role("note")
    assert notice.is_visible() and "not a diagnostic device" in notice.inner_text()
    # (locator waits, not wait_for_function: the page's CSP forbids the eval that polling needs)
    expect(page.locator("#model-name")).to_have_text("lesions")
    assert "test balanced accuracy 0.5000" in page.locator("#model-details").inner_text()

    page.get_by_label("Choose a dermoscopic image").set_input_files(image)
    bars = page.locator("#bars li")
    bars.nth(7).wait_for()
    expect(page.locator("#overlay-figure")).to_be_visible()  # shown by the overlay's load event
    assert page.locator("#overlay").evaluate("img => img.complete && img.naturalWidth") > 0
    assert page.locator("#overlay").get_attribute("alt").startswith("Left: the image as the model sees it")

    shown = [
        (bar.get_attribute("data-class"), float(bar.get_attribute("data-probability")), bar.locator(".bar-value").inner_text())
        for bar in bars.all()
    ]
    ranked = sorted(expected["probabilities"].items(), key=lambda item: -item[1])
    assert [name for name, _, _ in shown] == [name for name, _ in ranked]
    for (name, probability, text), (_, api_probability) in zip(shown, ranked, strict=True):
        assert probability == pytest.approx(api_probability, abs=1e-9), name
        assert abs(float(text) - api_probability) <= 5e-5 and len(text.split(".")[1]) == 4
    # the bars are drawn to scale: fill width / track width = probability
    for bar, (name, probability, _) in zip(bars.all(), shown, strict=True):
        fill = bar.locator(".bar-fill").bounding_box()["width"]
        track = bar.locator(".bar-track").bounding_box()["width"]
        assert fill == pytest.approx(probability * track, abs=1.0), name
    assert expected["top_class"] in page.locator("#top-class").inner_text()
    assert page.locator("#results").get_attribute("aria-live") == "polite"
    assert "Prediction for" in page.get_by_role("status").inner_text()

    screenshot = tmp_path / "serve_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_page_reports_a_bad_upload(page, base_url, tmp_path):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.png"
    notes.write_bytes(b"these are not pixels")
    page.goto(base_url)
    page.get_by_label("Choose a dermoscopic image").set_input_files(notes)
    expect(page.get_by_role("alert")).to_contain_text("notes.png: not an image")
    assert page.locator("#results").is_hidden() and page.locator("#overlay-figure").is_hidden()


def test_api_docs_render_offline(page, base_url):
    """/docs (Swagger UI) loads every script and style from this server: with every other host
    unreachable, as on an offline machine, it still renders the API. (/redoc is off: ReDoc's bundle
    fetches its logo from a CDN.)"""
    from playwright.sync_api import expect

    own, elsewhere = [], []

    def offline(route):
        url = route.request.url
        if url.startswith(base_url):
            own.append(url)
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.route("**/*", offline)
    try:
        page.goto(base_url + "/docs")
        # Swagger UI's bundle is large: a busy 2-core machine can take well over the default 5 s
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("skindistil", timeout=60_000)
        expect(page.locator(".opblock-summary-path").first).to_be_visible()
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/v1/predict" in paths and "/v1/explain" in paths
    finally:
        page.unroute("**/*")
    assert elsewhere == []
    assert any(u.endswith("/swagger-ui-bundle.js") for u in own) and any(u.endswith("/openapi.json") for u in own)
    assert httpx.get(base_url + "/redoc").status_code == 404
def test_page_shows_the_decisions_at_the_stored_operating_points(page, ham_root, tmp_path):
    import numpy as np
    from playwright.sync_api import expect

    from skindistil.evaluation.operating_points import fit_operating_points
    from skindistil.models.artifact import set_operating_points

    artifact = serving_artifact(tmp_path)
    rng = np.random.default_rng(0)
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    points, _ = fit_operating_points(rng.dirichlet(np.ones(8), 300), rng.integers(0, 8, 300), classes)
    set_operating_points(artifact, points, fitted_on="data:val", default="cancer@sens95")
    image = sorted((ham_root / "images").glob("*.jpg"))[3]
    with serve_in_background(create_app(artifact, operating_point="all")) as url:
        expected = httpx.post(f"{url}/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        page.goto(url)
        page.get_by_label("Choose a dermoscopic image").set_input_files(image)
        decisions = page.locator("#decisions li")
        decisions.nth(11).wait_for()
        expect(page.locator("#decisions")).to_be_visible()
    api = {d["name"]: d for d in expected.json()["operating_points"]}
    shown = {item.get_attribute("data-point"): item for item in decisions.all()}
    assert list(shown) == list(api) and len(api) == 12
    for name, item in shown.items():
        text = item.inner_text()
        assert item.get_attribute("data-positive") == str(api[name]["positive"]).lower()
        assert text.startswith(f"{name}: {'positive' if api[name]['positive'] else 'negative'} (score "
                               f"{api[name]['score']:.4f}")
        assert f"threshold {api[name]['threshold']:.4f}" in text
