"""alignkit label end to end in a real browser: headless Chromium (Debian's) driven by Playwright.

Open the printed URL, log in, rank four responses by keyboard alone on one task and by dragging on
another, fill the rubric, submit, reload: the label is there; untrusted text stays text; export;
``alignkit rm`` trains on the export. A screenshot of the task page is kept as a test artefact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_label import XSS, served, write_jsonl

from alignkit import cli
from alignkit.label import cli as label_cli
from alignkit.label.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTEFACT = Path(__file__).resolve().parents[1] / "test-artifacts" / "label_page.png"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (make test installs it)")

ROWS = [
    {"prompt": "Write one sentence about tea. <b>bold?</b>",
     "responses": ["Tea is brewed from leaves.", XSS[0], XSS[1], "Tea is a drink enjoyed worldwide."]},
    {"prompt": "Name a prime number greater than 10.",
     "responses": ["11", "12 is prime.", "13", "I cannot answer that."]},
]
# what the person means, by ORIGINAL response index (1 = best; 2 and 2 is a tie)
WANT = [[1, 3, 4, 2], [1, 4, 1, 3]]
OVERALL = [[6, 2, 1, 5], [7, 1, 7, 2]]


def shown_order(page) -> list[int]:
    """Original index of the response at each display position, read from the page's text."""
    texts = [page.locator(f"#text-{p}").text_content() for p in range(4)]
    return [ROWS[int(page.url.rsplit("/", 1)[1]) - 1]["responses"].index(t) for t in texts]


def tab_to(page, element_id: str, limit: int = 80) -> None:
    """Press Tab until ``element_id`` has focus: proves it is reachable by keyboard alone."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable with Tab")


def fill_rubric(page, order: list[int], task: int) -> None:
    for pos, original in enumerate(order):
        page.check(f"#overall-{pos}-{OVERALL[task][original]}")
        if original == 2 and task == 0:
            page.check(f"#flag-{pos}-hallucination")


def test_label_in_a_real_browser_then_export_and_train(tmp_path, tiny_model_dir):
    from playwright.sync_api import sync_playwright

    data = write_jsonl(tmp_path / "to_label.jsonl", ROWS)
    db = tmp_path / "labels.sqlite"
    dialogs: list[str] = []
    with served(data, db) as (url, _proc), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            assert "token=" not in page.url  # traded for a cookie at once
            page.fill("#name", "ana")
            page.click("#start")
            page.wait_for_url("**/task/1")

            # untrusted text: shown verbatim, no element created, nothing ran
            order = shown_order(page)
            for pos, original in enumerate(order):
                if original in (1, 2):
                    node = page.locator(f"#text-{pos}")
                    assert node.text_content() == ROWS[0]["responses"][original]
                    assert node.evaluate("n => n.children.length") == 0
            assert page.locator("#prompt").text_content() == ROWS[0]["prompt"]
            assert page.locator("main img, main b").count() == 0 and page.title() != "pwned"

            # task 1: rank by keyboard alone (Tab to each letter, press its place), rubric, note
            for pos, original in enumerate(order):
                tab_to(page, f"chip-{pos}")
                page.keyboard.press(str(WANT[0][original]))
                assert page.evaluate("document.activeElement.id") == f"chip-{pos}"  # focus kept after the move
                assert page.locator(f"#slot-{WANT[0][original]} #chip-{pos}").count() == 1
            tab_to(page, f"overall-{order.index(0)}-0")  # digits inside the quality scale score, not rank
            page.keyboard.press("6")
            assert page.locator(f"#overall-{order.index(0)}-6").is_checked()
            assert page.locator(f"#rank-{order.index(0)}").input_value() == str(WANT[0][0])  # rank untouched
            fill_rubric(page, order, 0)
            page.fill("#note", "keyboard only")
            summary = page.locator("#rank-summary").text_content()
            assert summary.startswith("Ranking: ") and "unranked" not in summary
            ARTEFACT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(tmp_path / "label_page.png"), full_page=True)
            shutil.copy(tmp_path / "label_page.png", ARTEFACT)
            page.click("#submit")
            page.wait_for_url("**/task/2")

            # task 2: rank by dragging the letters into places (a tie: two letters in place 1)
            order2 = shown_order(page)
            for pos, original in enumerate(order2):
                page.locator(f"#chip-{pos}").drag_to(page.locator(f"#slot-{WANT[1][original]}"))
                assert page.locator(f"#rank-{pos}").input_value() == str(WANT[1][original])
            fill_rubric(page, order2, 1)
            page.click("#submit")
            page.wait_for_selector("#all-done")

            # reload task 1: the label is there, in the same shuffled order
            page.goto(url.split("/?")[0] + "/task/1")
            page.reload()
            assert shown_order(page) == order
            assert page.locator("#task-status").text_content() == "labelled"
            for pos, original in enumerate(order):
                assert page.locator(f"#rank-{pos}").input_value() == str(WANT[0][original])
                assert page.locator(f"#slot-{WANT[0][original]} #chip-{pos}").count() == 1
                assert page.locator(f"#overall-{pos}-{OVERALL[0][original]}").is_checked()
            assert page.locator("#note").input_value() == "keyboard only"
            assert dialogs == [] and page.title() != "pwned"
        finally:
            browser.close()

    store = Store(str(db), create=False)
    labels = store.current_labels()
    store.close()
    assert [x["ranks"] for x in labels] == WANT
    assert [[r["overall"] for r in x["rubric"]] for x in labels] == OVERALL
    assert labels[0]["rubric"][2]["hallucination"] is True and labels[0]["note"] == "keyboard only"

    export = tmp_path / "ranked.jsonl"
    assert label_cli.main(["export", "--db", str(db), "--output", str(export)]) == 0
    rows = [json.loads(x) for x in export.read_text().splitlines()]
    assert [r["ranks"] for r in rows] == WANT and [r["responses"] for r in rows] == [r["responses"] for r in ROWS]
    out = tmp_path / "rm"
    assert cli.main(["rm", "--model", str(tiny_model_dir), "--data", str(export), "--output-dir", str(out),
                     "--batch-size", "2", "--max-steps", "2", "--lr", "5e-3", "--no-progress", "--log-every", "1",
                     "--warmup-ratio", "0"]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and (out / "model.safetensors").exists()
