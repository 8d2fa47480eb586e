"""The web page at /ui/ in a real browser (Debian's chromium driven by Playwright) against a real `bentoml
serve`: the breast-cancer server of the session (numbers only) and a server of this module for a model
trained on tests/tables.py's mixed table (numbers, booleans, categories, missing values).

Every page records the requests the browser made: none may leave the server (the page works offline).
Screenshots go to a temporary folder; UI_SCREENSHOTS_DIR=docs/screenshots makes the committed ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from playwright.sync_api import expect, sync_playwright

from serving.auth import digest_of
from tests.conftest import (
    LATEST_DRIFT,
    Server,
    Stores,
    assert_ok,
    free_port,
    require_tool,
    run_train,
    running_server,
)
from tests.tables import breast_cancer_table, mixed_table

MIXED = "ui_mixed"
FOLLOWED = "ui_follow"
API_KEY = "tsk_a-key-for-the-page"
WITH_KEY = {"Authorization": f"Bearer {API_KEY}"}
FEATURES = ["age", "income", "city", "member"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
# Playwright waits at most this long for what the page shows (ms): a cold server's first answers are slow.
WAIT_MS = 20_000
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    # Never a browser download: only the system's chromium is driven.
    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", "/nonexistent")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield launched
        launched.close()


class Visit:
    """A page of the browser, and every URL it requested."""

    def __init__(self, browser: Any, base_url: str, viewport: dict[str, int]) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport=viewport, base_url=base_url, accept_downloads=True)
        self.context.set_default_timeout(WAIT_MS)
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda request: self.requested.append(request.url))
        self.page: Any = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self, *, form: bool) -> Any:
        self.page.goto("/")
        if form:
            expect(self.page.locator("#fields .field").first).to_be_visible()
        return self.page

    def check_and_close(self) -> None:
        self.context.close()
        outside = [
            url for url in self.requested if not url.startswith((self.base_url + "/", "blob:", "data:"))
        ]
        assert outside == [], f"the page requested URLs outside the server: {outside}"
        assert self.errors == [], f"the page's script failed: {self.errors}"


@pytest.fixture
def visit(browser: Any) -> Iterator[Any]:
    """visit(url, viewport=DESKTOP) opens the page at the server's root and waits for its form (unless
    form=False); checked and closed afterwards."""
    opened: list[Visit] = []

    def open_page(url: str, viewport: dict[str, int] = DESKTOP, *, form: bool = True) -> Any:
        made = Visit(browser, url, viewport)
        opened.append(made)
        return made.open(form=form)

    yield open_page
    for made in opened:
        made.check_and_close()


def train_table(stores: Stores, frame: pd.DataFrame, target: str, name: str, *extra: str) -> None:
    """`python train.py` on `frame` (3 folds: quicker) as model `name`."""
    table = stores.data_dir / f"ui-{name}.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(table, index=False)
    options = ["--data", str(table), "--target", target, "--name", name, "--cv-folds", "3", *extra]
    assert_ok(run_train(stores, *options))


def train_mixed(stores: Stores) -> None:
    train_table(stores, mixed_table(300), "segment", MIXED, "--drop", "customer_id")


def serve(stores: Stores, folder: Path, model: str, **settings: str) -> Iterator[Server]:
    """A server of `model` that follows its champion every second."""
    port = free_port()
    env = stores.env(
        BENTOML_HOME=str(stores.server_home(folder / "home")),
        TABSERVE_MODEL_NAME=model,
        TABSERVE_GRPC_PORT="0",
        TABSERVE_PREDICTION_LOG_DIR=str(folder / "predictions"),
        TABSERVE_FEEDBACK_LOG_DIR=str(folder / "feedback"),
        TABSERVE_REPORTS_DIR=str(folder / "reports"),
        TABSERVE_RELOAD_SECONDS="1",
        **settings,
    )
    output = folder / "server-output.txt"
    with running_server(env, port, output) as process:
        url = f"http://127.0.0.1:{port}"
        yield Server(url, "", folder / "predictions", folder / "feedback", process, output)


@pytest.fixture(scope="module")
def mixed(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A model with every kind of feature."""
    train_mixed(stores)
    yield from serve(stores, tmp_path_factory.mktemp("ui-mixed"), MIXED)


def train_following(stores: Stores, *extra: str) -> None:
    train_table(stores, breast_cancer_table(), "diagnosis", FOLLOWED, *extra)


@pytest.fixture(scope="module")
def following(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A model of its own whose champion the test changes, with API keys."""
    train_following(stores)
    folder = tmp_path_factory.mktemp("ui-follow")
    (folder / "keys.txt").write_text(f"person:{digest_of(API_KEY).hex()}\n")
    # With API keys, the page open to all (TABSERVE_AUTH_DOCS=false) and the API behind a key.
    keys = {"TABSERVE_AUTH_KEYS_FILE": str(folder / "keys.txt"), "TABSERVE_AUTH_DOCS": "false"}
    yield from serve(stores, folder, FOLLOWED, **keys)


def field(page: Any, name: str) -> Any:
    return page.get_by_label(name, exact=True)


def server_answer(server: Server, record: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json=record, timeout=30)


# ---- the pages' addresses ----------------------------------------------------------------------------


def test_the_root_opens_the_page_and_swagger_moved_to_docs(server: Server, visit: Any, browser: Any) -> None:
    page = visit(server.url)
    assert page.url == f"{server.url}/ui/"
    expect(page.get_by_role("heading", level=1)).to_contain_text("breast_cancer")
    expect(page.get_by_role("link", name="API (OpenAPI)")).to_have_attribute("href", "/docs")
    # The Swagger page at /docs, with BentoML's Swagger UI assets and the spec, and nothing from the web
    # (BentoML's own page loads Google Tag Manager): every request the page makes must reach the server.
    swagger = browser.new_context(base_url=server.url)
    elsewhere: list[str] = []
    swagger.route("**/*", lambda route: _loopback_only(route, server.url, elsewhere))
    docs = swagger.new_page()
    docs.goto("/docs")
    expect(docs.get_by_role("link", name="/docs.json")).to_be_visible(timeout=WAIT_MS)
    expect(docs.locator("#swagger-ui")).to_contain_text("Predictions of breast_cancer")
    assert elsewhere == []
    swagger.close()


def _loopback_only(route: Any, base_url: str, elsewhere: list[str]) -> None:
    if route.request.url.startswith(base_url + "/"):
        route.continue_()
    else:
        elsewhere.append(route.request.url)
        route.abort()


# ---- scoring a row -----------------------------------------------------------------------------------


def test_a_row_with_a_new_category_a_boolean_and_missing_values(mixed: Server, visit: Any) -> None:
    page = visit(mixed.url)
    # The form is the schema's: a choice list of the seen categories, a boolean, ranges, missing allowed.
    choices = page.locator("#" + field(page, "city").get_attribute("list") + " option")
    assert sorted(choices.evaluate_all("options => options.map(o => o.value)")) == [
        "lille",
        "lyon",
        "nice",
        "paris",
    ]
    assert field(page, "member").locator("option").all_inner_texts() == ["true", "false", "missing"]
    expect(page.locator("#f-0-hint")).to_contain_text("training range")
    field(page, "age").fill("")  # missing
    field(page, "income").fill("41000")
    field(page, "city").fill("marseille")  # never seen in training
    field(page, "member").select_option("true")
    page.get_by_role("button", name="Predict").click()

    expected = server_answer(mixed, {"age": None, "income": 41000, "city": "marseille", "member": True})
    assert expected.status_code == 200
    answer = expected.json()
    expect(page.locator(".prediction")).to_have_text(f"Prediction: {answer['prediction']}")
    expect(page.locator("#answer")).to_contain_text('city = "marseille"')
    chart = page.locator("#answer figure").first
    expect(chart.locator("svg[role=img]")).to_have_attribute("aria-label", _probabilities_said(answer))
    # The chart's table, for screen readers and exact figures: one row per class.
    assert chart.locator("tbody tr").count() == len(answer["probabilities"])


def _probabilities_said(answer: dict[str, Any]) -> str:
    ordered = sorted(answer["probabilities"].items(), key=lambda item: -item[1])
    return "Probability of each class: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in ordered)


def test_the_answer_shows_why(server: Server, visit: Any) -> None:
    page = visit(server.url)
    page.get_by_role("button", name="Predict").click()
    chart = page.locator("#answer figure", has_text="contribution")
    expect(chart.locator("svg[role=img]")).to_be_visible(timeout=5000)
    assert chart.locator("tbody tr").count() >= 2


def test_an_invalid_value_shows_the_servers_message_beside_its_field(server: Server, visit: Any) -> None:
    page = visit(server.url)
    radius = field(page, "mean radius")
    record = _record_in_form(page)
    for typed, sent in [("big", "big"), ("1e300", 1e300)]:
        radius.fill(typed)
        page.get_by_role("button", name="Predict").click()
        body = server_answer(server, {**record, "mean radius": sent}).json()
        detail = body.get("detail")
        message = detail[0]["msg"] if detail else body["error"].removeprefix("'mean radius': ")
        error = page.locator(f"#{radius.get_attribute('id')}-error")
        expect(error).to_have_text(message)
        # Tied to its field and announced: described by the error, marked invalid, focused, and the
        # form's alert names the field.
        assert error.get_attribute("id") in radius.get_attribute("aria-describedby").split()
        expect(radius).to_have_attribute("aria-invalid", "true")
        expect(radius).to_be_focused()
        expect(page.locator("#form-error[role=alert]")).to_contain_text("mean radius")
    assert _low_contrast(page) == []  # the errors too
    radius.fill(str(record["mean radius"]))
    page.get_by_role("button", name="Predict").click()
    expect(page.locator(".prediction")).to_be_visible()
    expect(radius).not_to_have_attribute("aria-invalid", "true")


def _record_in_form(page: Any) -> dict[str, Any]:
    """The record the page's default values make (numbers only: the breast-cancer model)."""
    values = page.locator("[data-feature]").evaluate_all(
        "controls => controls.map(c => [c.dataset.feature, Number(c.value)])"
    )
    return dict(values)


def test_keyboard_only_scoring_with_a_visible_focus(mixed: Server, visit: Any) -> None:
    page = visit(mixed.url)
    focused: list[str] = []
    for _ in range(12):  # skip link, navigation, then the form's first field
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if focused[-1] == "f-0":
            break
    assert focused[-1] == "f-0", focused
    style, width = page.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement); "
        "return [s.outlineStyle, s.outlineWidth] })()"
    )
    assert style != "none"
    assert float(width.removesuffix("px")) >= 2
    page.keyboard.type("50")
    page.keyboard.press("Enter")  # submits the form from any field
    expect(page.locator(".prediction")).to_be_visible()


# ---- a file ------------------------------------------------------------------------------------------


def test_upload_a_table_and_download_its_predictions(mixed: Server, visit: Any, tmp_path: Path) -> None:
    upload = tmp_path / "customers.csv"
    table = mixed_table(40, seed=3)[FEATURES]
    assert table.isna().any().all()  # a missing value in every column, a boolean one included
    table.to_csv(upload, index=False)
    page = visit(mixed.url)
    page.get_by_label("A CSV or Parquet table").set_input_files(upload)
    page.get_by_role("button", name="Score the file").click()
    result = page.locator("#file-result")
    expect(result).to_contain_text("40 rows scored")
    assert result.locator("tbody tr").count() == 40
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download the predictions (CSV)").click()
    download = download_info.value
    assert download.suggested_filename == "customers-predictions.csv"
    downloaded = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    # The service's own CSV of the same file: the same rows, columns and values.
    served = httpx.post(
        f"{mixed.url}/predict_file?format=csv",
        content=upload.read_bytes(),
        headers={"Content-Type": "text/csv"},
        timeout=60,
    )
    assert served.status_code == 200
    expected = list(csv.DictReader(io.StringIO(served.text)))
    assert list(downloaded[0]) == list(expected[0])
    for got, want in zip(downloaded, expected, strict=True):
        assert got["prediction"] == want["prediction"]
        assert json.loads(got["unknown_categories"]) == json.loads(want["unknown_categories"])
        for column in (c for c in want if c.startswith("probability_")):
            assert float(got[column]) == pytest.approx(float(want[column]), abs=1e-12)


def test_a_refused_file_shows_the_servers_reason(mixed: Server, visit: Any, tmp_path: Path) -> None:
    upload = tmp_path / "with-target.csv"
    mixed_table(5).to_csv(upload, index=False)  # still has its target and id columns
    page = visit(mixed.url)
    page.get_by_label("A CSV or Parquet table").set_input_files(upload)
    page.get_by_role("button", name="Score the file").click()
    expect(page.locator("#file-error")).to_contain_text("unknown column(s) 'customer_id', 'segment'")


# ---- the model's card --------------------------------------------------------------------------------


def test_the_model_page(server: Server, visit: Any) -> None:
    info = httpx.get(f"{server.url}/model", timeout=30).json()
    page = visit(server.url)
    card = page.locator("#card")
    for fact in [info["version"], info["mlflow_run_id"], info["data_digest"], info["estimator"]]:
        expect(card.locator("dl")).to_contain_text(fact)
    expect(card).to_contain_text("roc_auc (the metric it was chosen by)")
    # The verdicts the session's server found in its reports folder (tests/conftest.py).
    expect(card).to_contain_text("drift detected")
    expect(card).to_contain_text(", ".join(LATEST_DRIFT.drifted_features))
    expect(card).to_contain_text("Live performance: degraded")
    if "evaluation" in info:
        assert card.locator("table", has_text="predicted benign").count() == 1
    else:
        expect(card).to_contain_text("Not recorded for this version.")
    if "importance" in info:
        expect(card.locator("figure", has_text="Permutation importance")).to_be_visible()
    assert _low_contrast(page) == []


def _low_contrast(page: Any) -> list[Any]:
    """Visible text whose contrast with the background it sits on is below 4.5:1 (WCAG AA)."""
    return page.evaluate(
        """() => {
        const parse = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
        const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
        const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
        const background = (node) => {
          for (let e = node; e; e = e.parentElement) {
            const [r, g, b, a = 1] = parse(getComputedStyle(e).backgroundColor);
            if (a > 0) return [r, g, b].map((v) => a * v + (1 - a) * 255);  // over the white page
          }
          return [255, 255, 255];
        };
        const low = [];
        for (const e of document.querySelectorAll("body *")) {
          if (!(e instanceof HTMLElement) || !e.checkVisibility()) continue;
          if (![...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
          const [a, b] = [luminance(parse(getComputedStyle(e).color)), luminance(background(e))];
          const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
          if (ratio < 4.5) low.push([e.tagName, e.textContent.slice(0, 40), ratio.toFixed(2)]);
        }
        return low;
      }"""
    )


# ---- phone size, screenshots -------------------------------------------------------------------------


def test_screenshots_at_desktop_and_phone_sizes(server: Server, visit: Any, tmp_path: Path) -> None:
    folder = Path(os.environ.get("UI_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    desktop = visit(server.url, DESKTOP)
    desktop.get_by_role("button", name="Predict").click()
    expect(desktop.locator(".prediction")).to_be_visible()
    desktop.locator("#answer").scroll_into_view_if_needed()
    desktop.screenshot(path=folder / "ui-desktop.png")
    desktop.locator("#card").screenshot(path=folder / "ui-model-desktop.png")
    phone = visit(server.url, PHONE)
    # Usable at 375 px: nothing wider than the screen, so nothing needs sideways scrolling.
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.screenshot(path=folder / "ui-phone.png")
    for name in ["ui-desktop.png", "ui-model-desktop.png", "ui-phone.png"]:
        assert (folder / name).stat().st_size > 10_000


# ---- following the champion -------------------------------------------------------------------------


def test_the_page_asks_for_a_key_and_follows_a_new_champion(
    following: Server, stores: Stores, visit: Any
) -> None:
    page = visit(following.url, form=False)
    # The API answered 401: the page asks for a key, says why, and keeps it for the tab only.
    key = page.get_by_label("API key", exact=True)
    expect(key).to_be_focused()
    expect(page.locator("#key-why")).to_contain_text("an API key is required")
    key.fill("tsk_not-a-key")
    key.press("Enter")
    expect(page.locator("#key-why")).to_contain_text("the API key is not valid")
    key.fill(API_KEY)
    key.press("Enter")
    expect(page.locator("#key-form")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('tabserve.apiKey')") == API_KEY
    before = httpx.get(f"{following.url}/model", headers=WITH_KEY, timeout=30).json()
    expect(page.locator("#served")).to_contain_text(before["version"])
    field(page, "mean radius").fill("17.5")
    train_following(stores, "--force")
    after = _wait_for_new_version(following, before["version"])
    # The next answer names the new version: the page reads the model again and rebuilds the form, keeping
    # what was typed.
    page.get_by_role("button", name="Predict").click()
    expect(page.locator("#served")).to_contain_text(after)
    expect(page.locator("#card dl")).to_contain_text(after)
    expect(field(page, "mean radius")).to_have_value("17.5")


def _wait_for_new_version(server: Server, old: str) -> str:
    """The new version, once every worker serves it (the page's next answer must name it); fails at once
    when a worker refuses it."""
    record = breast_cancer_table().drop(columns="diagnosis").iloc[0].to_dict()
    for _ in range(120):
        following = httpx.get(f"{server.url}/model", headers=WITH_KEY, timeout=30).json()["following"]
        if following["last_problem"]:
            raise AssertionError(following["last_problem"])
        versions = {
            httpx.post(f"{server.url}/predict", json=record, headers=WITH_KEY, timeout=30)
            .json()
            .get("version")
            for _ in range(6)
        }
        if len(versions) == 1 and old not in versions:
            return str(versions.pop())
        time.sleep(0.5)
    raise AssertionError(f"the server still serves {old}")
