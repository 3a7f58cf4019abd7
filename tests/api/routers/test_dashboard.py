"""The server-rendered dashboard (/, /ui/jobs/{id}, /ui/sweeps/{id}) rendered in-process; the real-browser
check is tests/e2e/test_dashboard.py."""

from __future__ import annotations

from html.parser import HTMLParser

from tests.api.fakework import point, run_job

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3},
        "measure": {"every": 1}}


class Page(HTMLParser):
    """Collects links, image sources and table cell texts."""

    def __init__(self, html: str):
        super().__init__()
        self.links, self.images, self.cells, self.refresh = [], [], [], False
        self._cell = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.links.append(a.get("href"))
        elif tag == "img":
            self.images.append(a.get("src"))
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = True
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None


def test_index_lists_sweeps_and_jobs_with_state(client, sessionmaker):
    out = client.post("/sweeps", json={"base": BASE, "grid": {"model.batch_norm": ["affine", "none"],
                                                              "model.width": [8, 16]},
                                       "name": "<b>bn</b> & wd"}).json()
    j0, j1 = (j["id"] for j in out["jobs"])
    run_job(sessionmaker, j0)
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = Page(resp.text)
    assert f"/ui/sweeps/{out['id']}" in page.links
    assert f"/ui/jobs/{j0}" in page.links and f"/ui/jobs/{j1}" in page.links
    assert "<b>bn</b> & wd" in page.cells and "<b>bn</b>" not in resp.text  # escaped, shown as text
    assert page.cells.count("succeeded") == 1 and page.cells.count("queued") == 1
    assert "running" in page.cells  # the sweep: one job done, one waiting
    assert "3/3" in page.cells and page.refresh  # j0's progress; the page refreshes while work is left


def test_job_page_has_curves_and_metric_table(client, sessionmaker):
    jid = client.post("/jobs", json={"kind": "train", "config": BASE}).json()["id"]
    assert "No metric point yet" in client.get(f"/ui/jobs/{jid}").text
    runs = run_job(sessionmaker, jid)
    page = Page(client.get(f"/ui/jobs/{jid}").text)
    assert any(src.startswith(f"/jobs/{jid}/figures/training_curves.png") for src in page.images)
    want = point(2, -1, runs[0], 3)["metrics"]  # the last epoch's point, recomputed
    assert f"{want['train_loss']:.6g}" in page.cells and f"{want['intra_cos_min']:.6g}" in page.cells
    assert not page.refresh
    missing = client.get(f"/ui/jobs/{'0' * 32}")  # an HTML page, not problem+json (tests/api/test_ui_404.py)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")


def test_sweep_page_shows_its_figures(client, sessionmaker):
    out = client.post("/sweeps", json={"base": {**BASE, "measure": {"every": 1, "layers": "all"}},
                                       "grid": {"optim.weight_decay": [1e-4, 1e-3]}}).json()
    assert "Figures appear" in client.get(f"/ui/sweeps/{out['id']}").text
    for job in out["jobs"]:
        run_job(sessionmaker, job["id"], layers=[0, 1])
    page = Page(client.get(f"/ui/sweeps/{out['id']}").text)
    srcs = [s.split("?")[0] for s in page.images]
    assert srcs == [f"/sweeps/{out['id']}/figures/fig3.1.png", f"/sweeps/{out['id']}/figures/fig3.3.png"]
    for src in page.images:  # every image the page shows is served
        assert client.get(src).headers["content-type"] == "image/png"
