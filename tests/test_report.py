"""report.html: summary sentences, the sortable table, the map, per-cluster images and charts, bounded size."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from PIL import Image

from ravl_engine import report
from ravl_engine.documents import Cluster, Discovery
from ravl_engine.report import render_report, sentence, summary_table
from tests.reportdocs import cluster_dict, synthetic_document, table


class Page(HTMLParser):
    """Collects images (by the class of their enclosing div), table rows, sections and map points."""

    def __init__(self):
        super().__init__()
        self.images: dict[str, list[str]] = {"crops": [], "context": []}
        self.div: list[str | None] = []
        self.rows: list[list[str]] = []
        self.sections: list[str] = []
        self.opens: list[tuple[str, str]] = []
        self.headers: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self.div.append(a.get("class"))
        if tag == "img" and self.div and self.div[-1] in self.images:
            self.images[self.div[-1]].append(a["src"])
        if tag == "tr" and "data-open" in a:
            self.rows.append([])
        if tag == "td" and self.rows:
            self.rows[-1].append(a["data-v"])
        if tag == "th" and "data-key" in a:
            self.headers.append(a["data-key"])
        if tag == "section":
            self.sections.append(a["data-rank"])
        if "data-open" in a:
            self.opens.append((tag, a["data-open"]))

    def handle_endtag(self, tag):
        if tag == "div" and self.div:
            self.div.pop()


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    img.load()
    return img.convert("RGB")


def test_the_summary_sentence_says_which_class_gains_and_which_loses():
    rows = table([("three", 1.0, 10, 0.88, 50), ("nine", 0.0, 12, 0.73, 48), ("five", 0.4, 4, 0.5, 40)])
    assert sentence(Cluster.from_dict(cluster_dict(1, "three", rows))) == (
        "Regions like these raise class three's accuracy from 88% to 100% and drop nine's from 73% to 0%."
    )
    rows = table([("three", 0.5, 10, 0.75, 50), ("nine", 0.8, 12, 0.7, 48)])
    assert sentence(Cluster.from_dict(cluster_dict(1, "three", rows))) == (
        "Regions like these lower class three's accuracy from 75% to 50%."
    )


def test_report_of_a_document(tmp_path):
    doc = synthetic_document(tmp_path, n_clusters=4, regions_per_cluster=30)
    doc["clusters"][1]["influence"] = float("-inf")
    text = render_report(Discovery.from_dict(doc), image_folder=tmp_path)
    assert "http" not in text.replace("http://www.w3.org/2000/svg", ""), "no network resource"
    page = Page()
    page.feed(text)
    assert page.headers == ["rank", "name", "class", "gap", "influence", "regions", "images"]
    assert [r[0] for r in page.rows] == ["1", "2", "3", "4"]
    assert page.rows[0][1] == "phrase 0-0" and page.rows[1][4] == "-Infinity"
    assert [r[5:] for r in page.rows] == [["30", "12"]] * 4
    assert page.sections == ["1", "2", "3", "4"]
    # every ranked cluster opens from its table row, its summary link and its map point
    for rank in "1234":
        assert {tag for tag, r in page.opens if r == rank} == {"tr", "a", "g"}
    assert len(page.images["crops"]) == 4 * 24 and len(page.images["context"]) == 4 * 8
    crop = _decode(page.images["crops"][0])
    assert crop.size == (report.THUMB, report.THUMB)
    whole = _decode(page.images["context"][0])
    assert whole.size == (128, 107)  # 48 x 40 scaled to a 128-pixel longest side
    top_edge, inside = whole.getpixel((30, 1)), whole.getpixel((30, 25))
    assert top_edge[2] < 120 < top_edge[0], "the box is drawn in yellow over the white region"
    assert min(inside) > 200
    assert "Regions like these raise class 0&#x27;s accuracy from 88% to 100% and drop 9&#x27;s from 73% to 0%." in text
    assert "phrase 2-4 (+0.1000)" in text and "zero-shot accuracy" in text and "without" in text
    lines = summary_table(Discovery.from_dict(doc)).splitlines()
    assert lines[0].split() == ["rank", "name", "class", "gap", "influence", "regions", "images"]
    assert lines[1].split()[:3] == ["1", "phrase", "0-0"]


def test_report_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_CLUSTERS", 3)
    doc = synthetic_document(tmp_path, n_clusters=5, regions_per_cluster=2000)
    text = render_report(Discovery.from_dict(doc), image_folder=tmp_path)
    page = Page()
    page.feed(text)
    assert page.sections == ["1", "2", "3"] and len(page.rows) == 3
    assert len(page.images["crops"]) == 3 * report.TOP_CROPS and len(page.images["context"]) == 3 * report.TOP_CONTEXT
    assert "the first 3 are shown, 2 more are in discovery.json" in text
    small_doc = synthetic_document(tmp_path, n_clusters=5, regions_per_cluster=40)
    small = render_report(Discovery.from_dict(small_doc), image_folder=tmp_path)
    assert abs(len(text) - len(small)) < 200, "the size does not grow with the regions per cluster"


def test_report_without_clusters_names_or_images(tmp_path):
    doc = synthetic_document(tmp_path, n_clusters=1)
    doc["clusters"][0]["names"] = []
    doc["clusters"][0]["regions"][0]["image"] = "img/missing.png"
    doc["naming"] = {"status": "skipped", "reason": "clusters not named: the audited checkpoint x.pt is gone"}
    text = render_report(Discovery.from_dict(doc), image_folder=tmp_path)
    assert "Clusters are not named: clusters not named: the audited checkpoint x.pt is gone" in text
    page = Page()
    page.feed(text)
    assert len(page.images["crops"]) == 23 and page.rows[0][1] == ""
    none_found = Discovery.from_dict({**synthetic_document(tmp_path, n_clusters=1), "clusters": []})
    empty = render_report(none_found, image_folder=tmp_path)
    assert "No spurious region cluster was found" in empty
    assert summary_table(none_found).splitlines()[1].strip() == "-  no spurious region cluster found"
