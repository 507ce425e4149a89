"""End to end in a real headless browser (Debian's chromium driven by Playwright): upload a
scan, see a prediction and five retrievals, ask a question, get an answer."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from neurocbir.app.api import create_app
from neurocbir.data.cases import CLASS_NAMES
from neurocbir.serving.service import RetrievalService

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def launch(playwright):
    """Debian's chromium, headless, with no background network traffic (the machine has none)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            "Debian's chromium is not installed: apt-get install chromium"
        )  # never a skip: `make test` installs it
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def serve_in_thread(app, port: int | None = None) -> tuple[str, object]:
    """Serve ``app`` with uvicorn on a loopback port (a free one by default); returns (base URL, server)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", server


def _handled(page, kind: str) -> int:
    """How many answers of ``kind`` the page has dealt with (shown, or dropped as stale)."""
    return int(page.evaluate(f"() => Number(document.body.dataset.{kind} || 0)"))


def _wait_handled(page, kind: str, n: int) -> None:
    """Wait (on the page's own count, not a timer) until it has dealt with ``n`` answers of ``kind``."""
    page.wait_for_function(f"() => Number(document.body.dataset.{kind} || 0) >= {n}", timeout=30_000)


def open_app(playwright, url: str, width: int = 1400, height: int = 1100):
    """(browser, page) with the app at ``url`` open in a window of ``width`` x ``height``."""
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    return browser, page


def open_compare(page, i: int) -> None:
    """Click retrieval ``i``'s Compare and wait (on the page's own count) until both images are in."""
    from playwright.sync_api import expect

    before = _handled(page, "compare")
    page.locator(".retrieval").nth(i).get_by_role("button", name="Compare").click()
    _wait_handled(page, "compare", before + 1)
    expect(page.locator("#compare")).to_be_visible()


def query_file(page, path) -> None:
    """Upload the scan at ``path`` and query it; wait for its 5 retrievals."""
    from playwright.sync_api import expect

    page.set_input_files("#file", str(path))
    page.click("#run")
    expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)


def fold5_scan(cases, i: int = 0):
    """The JPEG of the i-th held-out (fold 5) slice of the small data set."""
    row = int((cases.fold == 5).nonzero()[0][i])
    return cases.loader.root / "images" / f"{int(cases.idx[row])}.jpg"


def query_example(page, index: int) -> None:
    """Pick the example case at ``index`` in the list and query it; wait for its 5 retrievals."""
    from playwright.sync_api import expect

    page.select_option("#example", index=index)
    page.click("#run")
    expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)


def wait_held(page, held: list, n: int = 1) -> None:
    """Wait until ``n`` requests were caught (and held back) by a route handler."""
    for _ in range(100):
        if len(held) >= n:
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"{n} request(s) expected, {len(held)} sent")


@pytest.fixture(scope="module")
def base_url(small_run, small_cases):
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            "Debian's chromium is not installed: apt-get install chromium"
        )  # never a skip: `make test` installs it
    url, server = serve_in_thread(create_app(RetrievalService.from_run(small_run, table=small_cases)))
    yield url
    server.should_exit = True


def test_upload_predict_and_ask_in_a_browser(base_url, small_cases, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    scan = fold5_scan(small_cases)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(base_url)
        expect(page.locator("#disclaimer")).to_contain_text("not a diagnosis")
        query_file(page, scan)
        expect(page.locator("#pred")).to_contain_text("i")  # a class name is shown
        pred = page.locator("#pred").inner_text().strip()
        assert pred in ("meningioma", "glioma", "pituitary")
        expect(page.locator("#conf")).to_contain_text("calibrated confidence")
        expect(page.locator("#set")).to_contain_text("95% prediction set:")
        assert pred in page.locator("#set").inner_text()
        expect(page.locator("#probs")).to_contain_text("probability (calibrated)")
        expect(page.locator("#summary")).to_contain_text("mm²")
        page.locator("#suggest button").nth(3).click()  # "Which retrieved report shows the largest tumor?"
        expect(page.locator(".answer")).to_contain_text("largest tumor", timeout=15_000)
        expect(page.locator("#tumor")).to_have_text("")  # this model has no tumor decoder: nothing claimed
        # contrastive evidence: the nearest case of another class, named beside the prediction
        expect(page.locator("#contrast")).to_contain_text("Nearest case of another class: case ")
        assert pred not in page.locator("#contrast").inner_text().split(", a ")[1]
        # a clinician's mark on a retrieval reaches the server and is confirmed
        page.locator(".retrieval").nth(2).get_by_role("button", name="Not relevant").click()
        expect(page.locator(".retrieval").nth(2)).to_contain_text("marked not relevant", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "browser_e2e.png"), full_page=True)
        # side by side with zoom and window / level, by keyboard
        open_compare(page, 1)
        expect(page.locator("#cmpTitle")).to_contain_text("retrieval #2")
        before = page.locator("#cmpCase").evaluate("c => c.toDataURL()")
        width = page.locator("#cmpQuery").evaluate("c => c.getBoundingClientRect().width")
        page.locator("#compare").press("+")
        page.locator("#compare").press("ArrowDown")
        expect(page.locator("#cmpZoomV")).to_have_text("1.5x")
        assert page.locator("#cmpQuery").evaluate("c => c.getBoundingClientRect().width") == 1.5 * width
        assert page.locator("#cmpCase").evaluate("c => c.toDataURL()") != before  # narrower window, other pixels
        page.screenshot(path=str(ARTIFACTS / "browser_compare.png"), full_page=True)
        page.locator("#compare").press("Escape")
        expect(page.locator("#compare")).to_be_hidden()
        # why similar: a heat map over the query and over the retrieval, on demand
        page.locator(".retrieval").nth(0).get_by_role("button", name="Why similar?").click()
        expect(page.locator("#heatNote")).to_contain_text("retrieval #1 (case", timeout=30_000)
        assert "% of this similarity" not in page.locator("#heatNote").inner_text()  # no tumor map: not claimed
        expect(page.locator("#heatQuery")).to_be_visible()
        expect(page.locator(".retrieval").nth(0).locator("img.heat")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "browser_similarity.png"), full_page=True)
        browser.close()
    assert not [u for u in requested if not u.startswith((base_url, "data:", "blob:"))]  # nothing from outside
    assert (ARTIFACTS / "browser_e2e.png").stat().st_size > 20_000
    assert (ARTIFACTS / "browser_compare.png").stat().st_size > 20_000
    assert (ARTIFACTS / "browser_similarity.png").stat().st_size > 20_000


def test_a_photo_is_shown_with_no_confidence_in_a_browser(base_url, tmp_path):
    """A scan unlike every archive case: the warning, every class in the set, and no probability
    (the calibration holds only for scans like the archive's)."""
    from playwright.sync_api import expect, sync_playwright
    from skimage import data, io

    photo = tmp_path / "cat.png"
    io.imsave(photo, data.chelsea())
    with sync_playwright() as p:
        browser, page = open_app(p, base_url)
        page.set_input_files("#file", str(photo))
        page.click("#run")
        expect(page.locator("#far")).to_be_visible(timeout=30_000)
        expect(page.locator("#conf")).to_contain_text("confidence withheld")
        expect(page.locator("#set")).to_contain_text("meningioma or glioma or pituitary")
        rows = page.locator("#probs tr")
        expect(rows).to_have_count(4)
        assert [rows.nth(i).locator("td").nth(1).inner_text() for i in (1, 2, 3)] == ["—"] * 3
        # the warning comes before the numbers
        assert page.locator("#far").bounding_box()["y"] < page.locator("#conf").bounding_box()["y"]
        browser.close()


@pytest.mark.parametrize("width", [1024, 390])
def test_nothing_is_wider_than_a_laptop_or_phone_screen(base_url, small_cases, width):
    """A 1024 px laptop window or a 390 px phone: the page never scrolls sideways, and the
    side-by-side comparison shows both scans whole at 1x, each at the pixels the server sent."""
    from playwright.sync_api import sync_playwright

    scan = fold5_scan(small_cases)
    overflow = "() => document.documentElement.scrollWidth - window.innerWidth"
    with sync_playwright() as p:
        browser, page = open_app(p, base_url, width, 800)
        query_file(page, scan)
        assert page.evaluate(overflow) <= 0
        open_compare(page, 0)
        assert page.evaluate(overflow) <= 0
        for pane in ("#paneQ", "#paneC"):  # the scan fits its pane: nothing hidden at 1x
            inner = page.locator(pane).evaluate("p => [p.scrollWidth - p.clientWidth, p.scrollHeight - p.clientHeight]")
            assert inner == [0, 0], (pane, inner)
        case_px = page.locator("#cmpCase").evaluate("c => c.width")
        assert case_px == 512  # the case image is served at 512 px: drawn at that, not at a blurred 256
        browser.close()


def test_api_docs_render_with_no_outside_request(base_url):
    """The API docs page works on a hospital network with no internet, and the browser never
    contacts another host (FastAPI's default pages load Swagger UI from a public CDN)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{base_url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("neurocbir", timeout=15_000)
        expect(page.locator(".swagger-ui")).to_contain_text("/query")
        browser.close()
    outside = [u for u in requested if not u.startswith((base_url, "data:", "blob:"))]
    assert not outside, outside


def test_the_scan_chosen_last_is_the_query_and_a_dropped_scan_runs(base_url, small_cases):
    """A file, then an example: the example is queried (not the file still in the file box).
    Dropping a scan on the query panel makes it the query and runs it."""
    import base64

    from playwright.sync_api import expect, sync_playwright

    scan = fold5_scan(small_cases, 1)
    with sync_playwright() as p:
        browser, page = open_app(p, base_url)
        query_file(page, scan)
        assert page.locator("#queryImg").get_attribute("src").startswith("blob:")
        page.select_option("#example", index=1)
        case = page.locator("#example").input_value()
        page.click("#run")
        expect(page.locator("#queryImg")).to_have_attribute("src", f"/cases/{case}/image.png?size=512")
        expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)
        assert page.locator("#file").evaluate("f => f.files.length") == 0
        # drag and drop: the dropped scan is the query, queried at once
        page.locator("#example").select_option(index=1)
        dropped = page.evaluate_handle(
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
                return dt;
            }""",
            base64.b64encode(scan.read_bytes()).decode(),
        )
        page.dispatch_event("#queryPanel", "drop", {"dataTransfer": dropped})
        expect(page.locator("#queryImg")).to_have_attribute("src", re.compile("^blob:"), timeout=30_000)
        expect(page.locator("#example")).to_have_value("")
        assert page.locator("#file").evaluate("f => f.files[0].name") == "dropped.jpg"
        expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)
        browser.close()


def test_a_failed_query_leaves_no_earlier_result_on_screen(base_url, tmp_path):
    """After a good query, a file the server rejects shows its error alone: the earlier scan's
    prediction, cases, summary, outline and comparison would now read as this file's."""
    from playwright.sync_api import expect, sync_playwright

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with sync_playwright() as p:
        browser, page = open_app(p, base_url)
        query_example(page, 1)
        open_compare(page, 0)
        page.set_input_files("#file", str(bad))
        page.click("#run")
        expect(page.locator("#error")).not_to_be_empty(timeout=30_000)
        for box in ("#predBox", "#galleryBox", "#summaryBox", "#chatBox", "#compare"):
            expect(page.locator(box)).to_be_hidden()
        expect(page.locator("#tumorSvg polygon")).to_have_count(0)
        expect(page.locator("#tumor")).to_have_text("")
        browser.close()


def test_only_the_latest_query_is_shown(base_url):
    """Two queries in a row, the first answered last: the screen shows the second scan's result
    only (not the first's, nor a mix of both galleries)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = open_app(p, base_url)
        cases = [page.locator("#example option").nth(i).get_attribute("value") for i in (1, 2)]
        expected = [
            [
                r["case_id"]
                for r in page.request.post(f"{base_url}/query?k=5", multipart={"case_id": c}).json()["retrievals"]
            ]
            for c in cases
        ]
        assert expected[0] != expected[1]  # else the test could not tell them apart
        held = []
        page.route("**/query?*", lambda route: held.append(route) if not held else route.continue_())
        page.select_option("#example", cases[0])
        page.click("#run")
        wait_held(page, held)
        page.select_option("#example", cases[1])
        page.click("#run")
        expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)
        handled = _handled(page, "query")
        with page.expect_response(lambda r: "/query?" in r.url, timeout=30_000):
            held[0].continue_()  # the first query's answer arrives last
        _wait_handled(page, "query", handled + 1)  # the page has dealt with it
        expect(page.locator("#queryImg")).to_have_attribute("src", f"/cases/{cases[1]}/image.png?size=512")
        shown = page.locator(".retrieval img:not(.heat)").evaluate_all(
            "imgs => imgs.map(i => Number(new URL(i.src).pathname.split('/')[2]))"
        )
        assert shown == expected[1]
        expect(page.locator("#status")).to_have_text("")
        browser.close()


def test_an_app_over_a_case_archive_answers_in_a_browser(small_run, small_cases, tmp_path):
    """`neurocbir serve --archive`: no empty example list (an archive has no held-out examples),
    and an uploaded scan that is in the archive finds itself first."""
    import csv
    import shutil

    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    from neurocbir.models.inference import load_model
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.retrieval.casefiles import scan_folder
    from neurocbir.retrieval.ingest import add_folder

    folder = tmp_path / "scans"
    folder.mkdir()
    rows = np.flatnonzero(small_cases.fold != 5)[::8][:12]
    with open(folder / "cases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id", "plane", "area_mm2"])
        for r in rows:
            name = f"{int(small_cases.idx[r])}.jpg"
            shutil.copy(small_cases.loader.root / "images" / name, folder / name)
            w.writerow([name, int(small_cases.label[r]) + 1, small_cases.patient_id[r], small_cases.plane[r], 500.0])
    model = load_model(small_run)
    archive = CaseArchive.create(tmp_path / "archive", model.embedding_dim, model.checkpoint_sha256)
    assert add_folder(archive, scan_folder(folder), model.embed)["added"] == len(rows)
    archive.close()
    url, server = serve_in_thread(create_app(RetrievalService.from_archive(small_run, tmp_path / "archive")))
    try:
        with sync_playwright() as p:
            browser, page = open_app(p, url)
            expect(page.locator("#disclaimer")).to_contain_text("not a diagnosis")
            expect(page.locator("#example")).to_be_hidden()  # its row: an empty list is not shown
            query_file(page, folder / f"{int(small_cases.idx[rows[3]])}.jpg")
            expect(page.locator(".retrieval").nth(0)).to_contain_text("distance 0.000")
            expect(page.locator(".retrieval").nth(0)).to_contain_text(CLASS_NAMES[int(small_cases.label[rows[3]])])
            browser.close()
    finally:
        server.should_exit = True


def test_maps_and_answers_are_shown_only_with_the_scan_they_are_about(base_url):
    """Maps ("Why similar?"), an answer or a comparison's image that arrive after a new query
    started are dropped, not laid over the new scan, put in its chat or opened beside it. Two
    map clicks: one pair of maps at a time."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = open_app(p, base_url)
        query_example(page, 1)
        page.locator(".retrieval").nth(0).get_by_role("button", name="Why similar?").click()
        expect(page.locator(".retrieval").nth(0).locator("img.heat")).to_be_visible(timeout=30_000)
        held = []
        page.route("**/similarity?*", lambda route: held.append(route))
        page.locator(".retrieval").nth(1).get_by_role("button", name="Why similar?").click()
        wait_held(page, held, 2)
        # while the second pair is computed the first is gone, and the note says which is coming
        expect(page.locator("#heatNote")).to_contain_text("Computing why retrieval #2")
        expect(page.locator(".retrieval").nth(0).locator("img.heat")).to_be_hidden()
        expect(page.locator("#heatQuery")).to_be_hidden()
        for route in held:
            route.continue_()
        expect(page.locator("#heatNote")).to_contain_text("retrieval #2 (case", timeout=30_000)
        expect(page.locator(".retrieval").nth(0).locator("img.heat")).to_be_hidden()
        expect(page.locator(".retrieval").nth(1).locator("img.heat")).to_be_visible()
        expect(page.locator("#heatQuery")).to_be_visible()

        held.clear()
        page.locator(".retrieval").nth(2).get_by_role("button", name="Why similar?").click()
        wait_held(page, held, 2)
        query_example(page, 2)
        handled = _handled(page, "similarity")
        for route in held:  # the old scan's maps arrive now
            with page.expect_response(lambda r: "/similarity?" in r.url, timeout=30_000):
                route.continue_()
        _wait_handled(page, "similarity", handled + 1)  # the page has dealt with the pair
        expect(page.locator("#heatQuery")).to_be_hidden()
        expect(page.locator("#heatNote")).to_have_text("")
        expect(page.locator(".retrieval img.heat:visible")).to_have_count(0)

        # the same for an answer about the earlier scan's cases: not shown in the new scan's chat
        held.clear()
        page.route("**/ask", lambda route: held.append(route))
        page.locator("#suggest button").nth(3).click()
        wait_held(page, held)
        page.select_option("#example", index=1)
        page.click("#run")
        expect(page.locator("#chatBox")).to_be_visible(timeout=30_000)
        handled = _handled(page, "ask")
        with page.expect_response(lambda r: r.url.endswith("/ask"), timeout=30_000):
            held[0].continue_()
        _wait_handled(page, "ask", handled + 1)
        expect(page.locator("#chatLog")).to_be_empty()

        # and for a comparison whose images arrive after a new query started
        held.clear()
        page.route("**/cases/*/image.png?size=512", lambda route: held.append(route))
        page.locator(".retrieval").nth(0).get_by_role("button", name="Compare").click()
        wait_held(page, held)  # the retrieval's image (the query's comes from the browser's cache)
        handled = _handled(page, "compare")
        query_example(page, 2)
        page.unroute("**/cases/*/image.png?size=512")
        for route in list(held):  # the comparison's images arrive now (and the new query's own)
            route.continue_()
        _wait_handled(page, "compare", handled + 1)
        expect(page.locator("#compare")).to_be_hidden()
        browser.close()


def test_draw_a_region_and_search_by_it(bundled_service, small_cases, test_seed):
    """The clinician draws on the query scan (pointer events from the mouse, and from a finger),
    moves and clears the region, and searches by a rectangle and by a free outline; the answer
    says it searched by the region, and a region away from the tumor gets 'no tumor in the region'."""
    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    from neurocbir.data.regions import away_box, box_region, tumor_box

    url, server = serve_in_thread(create_app(bundled_service))
    rng = np.random.default_rng(test_seed)
    sent: list[str] = []
    try:
        with sync_playwright() as p:
            browser, page = open_app(p, url)
            page.on(
                "request",
                lambda r: sent.append((r.post_data_buffer or b"").decode("latin-1")) if "/query?" in r.url else None,
            )
            query_example(page, 1)
            row = int(np.flatnonzero(small_cases.idx == int(page.locator("#example").input_value()))[0])
            image, mask = small_cases.load_image(row), small_cases.load_mask(row) > 0
            rows, cols = image.shape
            expect(page.locator("#regionTools")).to_be_visible()
            expect(page.locator("#searchRegion")).to_be_disabled()
            svg = page.locator("#regionSvg").bounding_box()

            def at(x: float, y: float) -> tuple[float, float]:  # scan pixels -> page coordinates
                return svg["x"] + x / cols * svg["width"], svg["y"] + y / rows * svg["height"]

            def drag(points) -> None:
                page.mouse.move(*at(*points[0]))
                page.mouse.down()
                for q in points[1:]:
                    page.mouse.move(*at(*q), steps=4)
                page.mouse.up()

            x0, y0, x1, y1 = tumor_box(mask, 1.2)
            drag([(x0, y0), (x1, y1)])
            expect(page.locator("#regionNote")).to_contain_text("Rectangle")
            page.click("#searchRegion")
            _wait_handled(page, "query", 2)
            expect(page.locator("#regionAnswer")).to_contain_text("Searched by the drawn region (rectangle")
            assert 'name="region"' in sent[-1]
            drawn = [int(v) for v in sent[-1].split('name="region"')[1].split()[0].split(",")]
            assert all(abs(a - b) <= 0.02 * cols for a, b in zip(drawn, (x0, y0, x1, y1))), drawn
            expect(page.locator("#pred")).to_contain_text(CLASS_NAMES[small_cases.label[row]])
            page.screenshot(path=str(ARTIFACTS / "browser_region.png"), full_page=True)
            # moved by dragging it: its rectangle follows the pointer
            before = page.locator("#regionNote").inner_text()
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            drag([(cx, cy), (cx + 20, cy + 10)])
            moved = page.locator("#regionNote").inner_text()
            assert moved != before and "Rectangle" in moved
            # a finger draws too (touch pointer events)
            page.click("#clearRegion")
            expect(page.locator("#regionNote")).to_contain_text("No region drawn")
            for kind, (x, y) in (("pointerdown", (10, 10)), ("pointermove", (60, 50)), ("pointerup", (60, 50))):
                cx_, cy_ = at(x, y)
                page.locator("#regionSvg").dispatch_event(
                    kind, {"pointerId": 7, "pointerType": "touch", "isPrimary": True, "clientX": cx_, "clientY": cy_}
                )
            expect(page.locator("#regionNote")).to_contain_text("Rectangle 10,10 to 60,50")
            # a free outline around the tumor: sent as a binary mask of the scan's size
            page.click("#clearRegion")
            page.select_option("#regionKind", "outline")
            x0, y0, x1, y1 = tumor_box(mask, 1.3)
            drag([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)])
            expect(page.locator("#regionNote")).to_contain_text("Free outline")
            page.click("#searchRegion")
            _wait_handled(page, "query", 3)
            expect(page.locator("#regionAnswer")).to_contain_text("Searched by the drawn region (free outline")
            # (the request's body holds a Blob, which Playwright does not capture: the answer says a mask came)
            # a rectangle away from the tumor (one the service answers 'no tumor' for, seeded)
            for _ in range(20):
                box = away_box(image, mask, rng)
                if bundled_service.query(image, region=box_region(box, image.shape))["tumor_found"] is False:
                    break
            else:
                raise AssertionError("no away-from-tumor box was answered 'no tumor'")
            page.click("#clearRegion")
            page.select_option("#regionKind", "box")
            drag([(box[0] + 0.5, box[1] + 0.5), (box[2] - 0.5, box[3] - 0.5)])
            page.click("#searchRegion")
            _wait_handled(page, "query", 4)
            expect(page.locator("#noTumorTitle")).to_have_text("No tumor found in the drawn region")
            decoder = bundled_service.region_search.decoder  # the page names the map it read
            expect(page.locator("#noTumorWhy")).to_contain_text(f"The {decoder} decoder's highest probability inside")
            expect(page.locator("#typeAnswer")).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "browser_region_none.png"), full_page=True)
            # "Find similar cases" searches the whole slice again, the region kept on screen
            page.click("#run")
            _wait_handled(page, "query", 5)
            expect(page.locator("#regionAnswer")).to_be_hidden()
            assert 'name="region' not in sent[-1]
            browser.close()
    finally:
        server.should_exit = True


def test_a_slice_of_a_study_opens_as_the_query_and_a_region_of_it_is_searched(bundled_service, small_cases, tmp_path):
    """In the study view, clicking a slice makes it the query; a rectangle drawn on it is searched."""
    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    from neurocbir.data.regions import tumor_box

    pid = small_cases.patient_id[np.flatnonzero(small_cases.fold == 5)[0]]
    rows = [int(r) for r in np.flatnonzero(small_cases.patient_id == pid)][:4]
    paths = [small_cases.loader.root / "images" / f"{int(small_cases.idx[r])}.jpg" for r in rows]
    row = next(r for r in rows if small_cases.load_mask(r).any())
    name = f"{int(small_cases.idx[row])}.jpg"
    url, server = serve_in_thread(create_app(bundled_service))
    try:
        with sync_playwright() as p:
            browser, page = open_app(p, url)
            page.set_input_files("#studyFiles", [str(x) for x in paths])
            page.click("#runStudy")
            expect(page.locator("#strip figure")).to_have_count(len(rows), timeout=60_000)
            before = _handled(page, "query")
            page.locator(f'#strip figure[data-name="{name}"]').click()
            _wait_handled(page, "query", before + 1)
            expect(page.locator("#regionTools")).to_be_visible()
            expect(page.locator("#studyBox")).to_be_hidden()
            mask = small_cases.load_mask(row) > 0
            rows_px, cols_px = mask.shape
            svg = page.locator("#regionSvg").bounding_box()
            x0, y0, x1, y1 = tumor_box(mask, 1.2)
            page.mouse.move(svg["x"] + x0 / cols_px * svg["width"], svg["y"] + y0 / rows_px * svg["height"])
            page.mouse.down()
            page.mouse.move(svg["x"] + x1 / cols_px * svg["width"], svg["y"] + y1 / rows_px * svg["height"], steps=4)
            page.mouse.up()
            page.click("#searchRegion")
            _wait_handled(page, "query", before + 2)
            expect(page.locator("#regionAnswer")).to_contain_text("Searched by the drawn region (rectangle")
            expect(page.locator("#pred")).to_contain_text(CLASS_NAMES[small_cases.label[row]])
            browser.close()
    finally:
        server.should_exit = True
