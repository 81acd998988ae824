"""The workbench page in a real browser (headless Chromium through Playwright): load the page, load a
tiny recipe into the Train form, train from the form, watch the loss plot appear, merge the adapter
from the Merge form, reload the page and still find the runs. Screenshots of every step are kept in
$WORKBENCH_TEST_ARTIFACTS/ui_browser (or the test's temporary folder).

Uses the system's Chromium (/usr/bin/chromium); nothing is downloaded. Skipped, with the reason,
where Chromium is missing (Playwright itself is in the test extra).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import copy_linked_runs, served_app, tiny_train_recipe
from workbench.recipes import recipe_to_yaml

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
JOB_TIMEOUT_MS = 150_000
DONE = re.compile(r"(^|\s)done · job ")  # the job panel's first line once the job has finished


@pytest.fixture
def sync_api():
    from playwright import sync_api  # in the test extra: without it this fails, not skips

    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium package)")
    return sync_api


@pytest.fixture
def artifacts(tmp_path) -> Path:
    root = os.environ.get("WORKBENCH_TEST_ARTIFACTS")
    folder = Path(root) / "ui_browser" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def served(workspace, tmp_path):
    """The app over a workspace with (a copy of) the tiny base and recipes/tiny.yaml, on a free
    port."""
    copy_linked_runs(workspace)
    (workspace.root / "recipes").mkdir()
    (workspace.root / "recipes" / "tiny.yaml").write_text(
        recipe_to_yaml(tiny_train_recipe(name="browser-lora")))
    with served_app(workspace.root, tmp_path / "app.log") as url:
        yield {"url": url, "ws": workspace}


def _pick(page, label: str, value: str) -> None:
    """Type a value into a Gradio dropdown that takes custom values, and confirm it."""
    box = page.get_by_label(label, exact=True).first
    box.click()
    box.fill(value)
    box.press("Enter")


@pytest.mark.slow
def test_train_from_the_form_watch_the_loss_merge_and_find_it_after_a_reload(sync_api, served,
                                                                              artifacts):
    expect = sync_api.expect
    ws = served["ws"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(served["url"])
            expect(page.get_by_text("Adapter workbench").first).to_be_visible(timeout=30_000)
            page.screenshot(path=artifacts / "1-train-tab.png", full_page=True)

            # the tiny recipe into the Train form: the form and its YAML show it
            _pick(page, "recipe file in the workspace", "recipes/tiny.yaml")
            page.get_by_role("button", name="Load into the form").first.click()
            expect(page.get_by_text("Loaded `recipes/tiny.yaml`").or_(
                page.get_by_text("Loaded recipes/tiny.yaml")).first).to_be_visible(timeout=30_000)
            expect(page.get_by_label("name", exact=True).first).to_have_value("browser-lora")
            expect(page.get_by_label("train.max_steps", exact=True)).to_have_value("6")
            page.screenshot(path=artifacts / "2-recipe-loaded.png", full_page=True)

            # train: the page switches to the job, which runs to the end with a loss curve
            page.get_by_role("button", name="Train (queue the job)").click()
            status = page.locator("#job-status")
            expect(status).to_contain_text("browser-lora", timeout=30_000)
            expect(status).to_have_text(DONE, timeout=JOB_TIMEOUT_MS)
            expect(page.locator("#job-progress")).to_contain_text("step 6 / 6")
            line = page.locator("#job-loss-plot svg .mark-line path").first
            expect(line).to_have_attribute("d", re.compile(r"^M.+L"), timeout=30_000)  # a drawn line
            axis = page.locator("#job-loss-plot [aria-roledescription='axis']").first
            expect(axis).to_have_attribute("aria-label", re.compile("X-axis titled 'step'"))
            page.screenshot(path=artifacts / "3-job-done-loss-plot.png", full_page=True)
            run_id = next(r.id for r in ws.runs() if r.info.get("name") == "browser-lora")
            assert ws.get(run_id).info["status"] == "done"

            # the adapter into the Merge form (weight 0.5), merged as a job
            page.get_by_role("tab", name="Merge").click()
            _pick(page, "inputs.0.path", f"run:{run_id}")
            page.get_by_label("number of inputs").first.fill("1")
            page.get_by_label("number of inputs").first.press("Enter")
            weight = page.get_by_label("inputs.0.weight", exact=True)
            weight.fill("0.5")
            weight.blur()
            preview = page.locator("textarea, .cm-content").filter(has_text="kind: merge").first
            expect(preview).to_contain_text(f"run:{run_id}", timeout=30_000)
            expect(preview).to_contain_text("weight: 0.5")
            page.screenshot(path=artifacts / "4-merge-form.png", full_page=True)
            page.get_by_role("button", name="Merge (queue the job)").click()
            expect(status).to_contain_text("merge merge", timeout=30_000)
            expect(status).to_have_text(DONE, timeout=JOB_TIMEOUT_MS)
            merge_id = next(r.id for r in ws.runs() if r.info.get("kind") == "merge")
            assert ws.get(merge_id).info["parents"][0] == run_id

            # a reload reconnects: the runs are listed, with the merge's lineage
            page.reload()
            expect(page.get_by_text("Adapter workbench").first).to_be_visible(timeout=30_000)
            page.get_by_role("tab", name="Runs").click()
            table = page.locator("#runs-table")
            expect(table).to_contain_text("browser-lora", timeout=30_000)
            expect(table).to_contain_text(merge_id)
            page.screenshot(path=artifacts / "5-runs-after-reload.png", full_page=True)
        finally:
            browser.close()
    assert sorted(p.name for p in artifacts.glob("*.png")) == [
        "1-train-tab.png", "2-recipe-loaded.png", "3-job-done-loss-plot.png", "4-merge-form.png",
        "5-runs-after-reload.png"]
    print(f"screenshots: {artifacts}")
