"""The audit report: one self-contained HTML file (embedded JPEGs, inline SVG, a few lines of inline JS) and a
terminal table.

Top of the page: one sentence per ranked cluster, a sortable table, and a 2-D map (PCA of every cluster's medoid)
where clicking a cluster opens it. Per cluster: its names, the with/without accuracy chart, its top regions cut
out and in their image with the box drawn. Size stays bounded at any scale: at most ``MAX_CLUSTERS`` clusters,
``TOP_CROPS`` crops and ``TOP_CONTEXT`` whole images per cluster are embedded (the full lists are in
discovery.json), and images load lazily: only the open cluster's are decoded, so opening the page does not wait
for every cluster's.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ravl_engine.documents import Cluster, Discovery, Region, TableRow
from ravl_engine.shards import write_atomic

logger = logging.getLogger(__name__)

THUMB = 72  # crop side, pixels
CONTEXT = 128  # longest side of an in-context image, pixels
TOP_CROPS = 24
TOP_CONTEXT = 8
MAX_CLUSTERS = 30
MAX_CHART_CLASSES = 12

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1150px;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    "th[data-key]{cursor:pointer;background:#f3f3f3}th[data-dir=asc]::after{content:' \\25B2'}"
    "th[data-dir=desc]::after{content:' \\25BC'}tr[data-open]{cursor:pointer}tr.sel{background:#fff3c4}"
    "[data-open]:hover{opacity:.75}g.sel circle{stroke:#000;stroke-width:2}.crops img,.context img{margin:2px}"
    ".top{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}.names li{font-family:monospace}"
    "section.cluster{border-top:2px solid #888;margin-top:2em;padding-top:.5em}"
)

# show one cluster (from a click on a table row, a map point or a summary link, or the URL's #cluster-N);
# sort the table by the clicked column (numeric when both cells are numbers)
SCRIPT = """
function show(rank) {
  document.querySelectorAll('section.cluster').forEach(s => { s.hidden = s.dataset.rank !== rank; });
  document.querySelectorAll('[data-open]').forEach(e => e.classList.toggle('sel', e.dataset.open === rank));
}
function sortBy(th) {
  const body = th.closest('table').tBodies[0], col = th.cellIndex;
  const dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => { delete h.dataset.dir; });
  th.dataset.dir = dir;
  const key = r => r.cells[col].dataset.v;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    const c = isNaN(x) || isNaN(y) ? x.localeCompare(y) : x - y;
    return dir === 'asc' ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}
document.addEventListener('click', e => {
  const th = e.target.closest('th[data-key]');
  if (th) { sortBy(th); return; }
  const open = e.target.closest('[data-open]');
  if (!open) return;
  e.preventDefault();
  show(open.dataset.open);
  history.replaceState(null, '', '#cluster-' + open.dataset.open);
  document.getElementById('cluster-' + open.dataset.open).scrollIntoView();
});
function fromHash() {
  const first = document.querySelector('section.cluster'), m = /^#cluster-(\\d+)$/.exec(location.hash);
  if (first) show(m ? m[1] : first.dataset.rank);
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def _data_uri(img: Any) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _open(region: Region, folder: Path) -> Any:
    """The region's image as RGB, or None (logged) when it cannot be read."""
    from PIL import Image  # noqa: PLC0415

    path = Path(region.image)
    path = path if path.is_absolute() else folder / path
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        logger.warning("report: cannot read %s (%s); skipped", path, err)
        return None


def _images(regions: Sequence[Region], folder: Path, *, crops: int, context: int) -> tuple[list[str], list[str]]:
    """JPEG data URIs of the first ``crops`` regions cut out and of the first ``context`` whole images with the
    region's box drawn (regions in rank order; unreadable images skipped)."""
    from PIL import ImageDraw, ImageOps  # noqa: PLC0415

    cut, whole = [], []
    for i, region in enumerate(regions[: max(crops, context)]):
        img = _open(region, folder)
        if img is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in region.box)
        if i < crops:
            box = (round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1))
            cut.append(_data_uri(ImageOps.pad(img.crop(box), (THUMB, THUMB), color=(40, 40, 40))))
        if i < context:
            scale = CONTEXT / max(img.size)
            shown = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            ImageDraw.Draw(shown).rectangle(
                (x1 * scale, y1 * scale, x2 * scale - 1, y2 * scale - 1), outline=(255, 215, 0), width=2
            )
            whole.append(_data_uri(shown))
    return cut, whole


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _chart(table: Sequence[TableRow]) -> str:
    """Inline SVG bar chart: accuracy with (dark) and without (light) the feature per class, with y axis, legend and
    the image counts under each bar; the ``MAX_CHART_CLASSES`` classes that change most."""
    rows = sorted(table, key=lambda r: -abs(r.acc_present - r.acc_absent))[:MAX_CHART_CLASSES]
    rows = [r for r in table if r in rows]  # back in class order
    left, top, height, group = 44, 26, 160, 58
    width = max(left + group * len(rows) + 10, 330)
    y = lambda v: top + height * (1 - v)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 58}" '
        'font-size="11" role="img">'
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{left}" x2="{width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{_pct(tick)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + height}" stroke="#444"/>'
        f'<text transform="translate(10 {top + height / 2}) rotate(-90)" text-anchor="middle">zero-shot accuracy</text>'
        f'<rect x="{left + 6}" y="4" width="10" height="10" fill="#b22222"/><text x="{left + 20}" y="13">with a '
        f'region like these</text><rect x="{left + 150}" y="4" width="10" height="10" fill="#f4a582"/>'
        f'<text x="{left + 164}" y="13">without</text>'
    )
    for i, row in enumerate(rows):
        x0 = left + 8 + i * group
        label = html.escape(str(row.class_name))
        for j, (acc, n, colour, what) in enumerate(
            (
                (row.acc_present, row.n_present, "#b22222", "with"),
                (row.acc_absent, row.n_absent, "#f4a582", "without"),
            )
        ):
            x = x0 + j * 22
            parts.append(
                f'<rect x="{x}" y="{y(acc):.1f}" width="20" height="{height * acc:.1f}" fill="{colour}">'
                f"<title>class {label}, {what}: {_pct(acc)} of {n} images</title></rect>"
                f'<text x="{x + 10}" y="{top + height + 12}" text-anchor="middle" font-size="9">{n}</text>'
            )
        parts.append(f'<text x="{x0 + 21}" y="{top + height + 26}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text x="{left}" y="{top + height + 44}">bars: accuracy; numbers under the bars: images with / without; '
        "below them: the class</text></svg>"
    )
    return "".join(parts)


def _name(cluster: Cluster) -> str:
    return str(cluster.names[0].phrase) if cluster.names else ""


def sentence(cluster: Cluster) -> str:
    """One plain-text sentence: how images with the cluster's regions change the accuracy of its class and of the
    class that loses most."""
    rows = {str(r.class_name): r for r in cluster.table}
    own = rows.get(str(cluster.class_name))
    if own is None:
        return f"Regions like these (cluster #{cluster.rank}) change no scored class's accuracy."
    verb = "raise" if own.acc_present >= own.acc_absent else "lower"
    text = f"Regions like these {verb} class {own.class_name}'s accuracy"
    text += f" from {_pct(own.acc_absent)} to {_pct(own.acc_present)}"
    others = [r for r in cluster.table if str(r.class_name) != str(cluster.class_name)]
    worst = min(others, key=lambda r: r.acc_present - r.acc_absent, default=None)
    if worst is not None and worst.acc_present < worst.acc_absent:
        text += f" and drop {worst.class_name}'s from {_pct(worst.acc_absent)} to {_pct(worst.acc_present)}"
    return text + "."


def _sort_key(value: Any) -> str:
    """A table cell's sort value as JavaScript's Number() reads it (-inf influence is '-Infinity')."""
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return str(value)


def _map(document: Discovery, shown: set[int]) -> str:
    """Inline SVG: every cluster's medoid projected on the first two principal components; ranked clusters are
    coloured, labelled with their rank and open on click; size follows the region count."""
    medoids = np.asarray(document.medoids, dtype=np.float64)
    if medoids.ndim != 2 or medoids.shape[0] < 2:
        return ""
    centred = medoids - medoids.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(centred))]
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    w, h, pad = 440, 320, 24
    pos = pad + (xy - lo) / span * np.array([w - 2 * pad, h - 2 * pad])
    sizes = np.asarray(document.cluster_sizes or [1] * len(medoids), dtype=np.float64)
    radius = 3 + 9 * np.sqrt(sizes / max(sizes.max(), 1))
    rank_of = {c.cluster_id: c.rank for c in document.clusters if c.rank in shown}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11" role="img">'
        f'<rect width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>'
    ]
    for cid in sorted(range(len(pos)), key=lambda c: c in rank_of):  # ranked clusters drawn last, on top
        x, y = pos[cid]
        size = int(sizes[cid]) if cid < len(sizes) else 0
        if cid in rank_of:
            rank = rank_of[cid]
            parts.append(
                f'<g data-open="{rank}"><circle cx="{x:.1f}" cy="{h - y:.1f}" r="{radius[cid]:.1f}" fill="#b22222" '
                f'fill-opacity=".8"/><text x="{x + radius[cid] + 2:.1f}" y="{h - y + 4:.1f}">#{rank}</text>'
                f"<title>#{rank}, cluster {cid}: {size} regions</title></g>"
            )
        else:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{h - y:.1f}" r="{radius[cid]:.1f}" fill="#999" fill-opacity=".5">'
                f"<title>cluster {cid}: {size} regions, not ranked</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def render_report(document: Discovery, *, image_folder: Path, top: int = TOP_CROPS) -> str:
    """The report's HTML for a discovery.json document (``top`` crops per cluster)."""
    clusters = document.clusters[:MAX_CLUSTERS]
    esc = html.escape
    more = len(document.clusters) - len(clusters)
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ravl-engine audit</title>",
        f"<style>{STYLE}</style></head><body><h1>ravl-engine audit</h1>",
        f"<p>K = {document.k} clusters; {len(document.clusters)} passed RaVL's filter, ranked by performance gap"
        + (f" (the first {MAX_CLUSTERS} are shown, {more} more are in discovery.json)" if more else "")
        + ".</p>",
    ]
    if not clusters:
        out.append("<p><b>No spurious region cluster was found.</b></p>")
    else:
        out.append("<h2>Summary</h2><ol>")
        for c in clusters:
            name = f" “{esc(_name(c))}”" if _name(c) else ""
            out.append(
                f"<li><a href='#cluster-{c.rank}' data-open='{c.rank}'>#{c.rank}{name}, class "
                f"{esc(str(c.class_name))}</a>: {esc(sentence(c))}</li>"
            )
        out.append("</ol><div class='top'><table id='clusters'><thead><tr>")
        for key in ("rank", "name", "class", "gap", "influence", "regions", "images"):
            out.append(f"<th data-key='{key}'>{key}</th>")
        out.append("</tr></thead><tbody>")
        for c in clusters:
            cells = [
                (c.rank, str(c.rank)),
                (_name(c), esc(_name(c))),
                (str(c.class_name), esc(str(c.class_name))),
                (c.gap, f"{c.gap:.3f}"),
                (c.influence, f"{c.influence:.3f}"),
                (c.n_regions, str(c.n_regions)),
                (c.n_images, str(c.n_images)),
            ]
            row = "".join(f"<td data-v='{esc(_sort_key(v), quote=True)}'>{text}</td>" for v, text in cells)
            out.append(f"<tr data-open='{c.rank}'>{row}</tr>")
        out.append("</tbody></table>")
        out.append(
            "<figure>" + _map(document, {c.rank for c in clusters}) + "<figcaption>Cluster medoids, first two "
            "principal components; red: ranked (click to open), size: regions.</figcaption></figure></div>"
        )
    naming = document.naming
    if naming.status == "skipped":
        out.append(f"<p><i>Clusters are not named: {esc(str(naming.reason or ''))}</i></p>")
    for c in clusters:
        crops, context = _images(c.regions, image_folder, crops=top, context=TOP_CONTEXT)
        name = f" “{esc(_name(c))}”" if _name(c) else ""
        out.append(f"<section class='cluster' id='cluster-{c.rank}' data-rank='{c.rank}'>")
        out.append(f"<h2>#{c.rank}{name}: class {esc(str(c.class_name))}</h2><p>{esc(sentence(c))}</p>")
        out.append(
            f"<p>gap {c.gap:.3f}, influence {c.influence:.3f}, {c.n_regions} regions in "
            f"{c.n_images} images (top {len(crops)} shown, most similar to the medoid first)</p>"
        )
        if c.names:
            out.append("<p>Names (score: " + esc(str(naming.score or "similarity")) + "):</p><ol class='names'>")
            out.extend(f"<li>{esc(n.phrase)} ({n.score:+.4f})</li>" for n in c.names)
            out.append("</ol>")
        out.append(_chart(c.table))
        out.append("<h3>Top regions</h3><div class='crops'>")
        out.extend(
            f"<img alt='region {i + 1} of cluster {c.rank}' loading='lazy' src='{uri}'>" for i, uri in enumerate(crops)
        )
        out.append("</div><h3>In context</h3><div class='context'>")
        out.extend(f"<img alt='image of region {i + 1}' loading='lazy' src='{uri}'>" for i, uri in enumerate(context))
        out.append("</div></section>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def write_report(document: Discovery, path: Path, *, image_folder: Path, top: int = TOP_CROPS) -> Path:
    """Write the report next to discovery.json (temporary name, then rename)."""
    page = render_report(document, image_folder=image_folder, top=top)
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def summary_table(document: Discovery, *, max_clusters: int = 10) -> str:
    """Plain-text table of the ranked clusters (for the terminal)."""
    lines = [f"{'rank':>4}  {'name':<20} {'class':<12} {'gap':>7} {'influence':>9} {'regions':>8} {'images':>7}"]
    for c in document.clusters[:max_clusters]:
        lines.append(
            f"{c.rank:>4}  {_name(c)[:20]:<20} {str(c.class_name):<12} {c.gap:>7.3f} {c.influence:>9.3f} "
            f"{c.n_regions:>8} {c.n_images:>7}"
        )
    if not document.clusters:
        lines.append("   -  no spurious region cluster found")
    return "\n".join(lines)
