"""The audit report: one self-contained HTML file (embedded PNG montages, inline SVG bars) and a terminal table."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

THUMB = 72


def _montage(regions: list[dict[str, Any]], folder: Path, *, columns: int = 8) -> tuple[str, int]:
    """PNG (base64) of the regions cut from their images, in rank order; returns (data, regions shown)."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    thumbs = []
    for region in regions:
        path = Path(region["image"])
        path = path if path.is_absolute() else folder / path
        try:
            with Image.open(path) as img:
                x1, y1, x2, y2 = (round(v) for v in region["box"])
                crop = img.convert("RGB").crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
        except OSError as err:
            logger.warning("report: cannot read %s (%s); skipped", path, err)
            continue
        thumbs.append(ImageOps.pad(crop, (THUMB, THUMB), color=(40, 40, 40)))
    if not thumbs:
        return "", 0
    rows = -(-len(thumbs) // columns)
    sheet = Image.new("RGB", (columns * (THUMB + 4), rows * (THUMB + 4)), (255, 255, 255))
    for i, thumb in enumerate(thumbs):
        sheet.paste(thumb, ((i % columns) * (THUMB + 4) + 2, (i // columns) * (THUMB + 4) + 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), len(thumbs)


def _bars(table: list[dict[str, Any]]) -> str:
    """Inline SVG: accuracy with (dark) and without (light) the feature, per class."""
    width, row = 360, 18
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 60}" height="{row * 2 * len(table) + 10}">']
    for i, entry in enumerate(table):
        y = i * 2 * row + 4
        label = html.escape(str(entry["class"]))
        for j, (key, colour) in enumerate((("acc_present", "#b22222"), ("acc_absent", "#f4a582"))):
            value = float(entry[key])
            parts.append(
                f'<rect x="50" y="{y + j * (row - 4)}" width="{value * width:.1f}" height="{row - 6}" fill="{colour}">'
                f"<title>{label} {key}: {value:.3f}</title></rect>"
            )
        parts.append(f'<text x="0" y="{y + row - 2}" font-size="12">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(document: dict[str, Any], *, image_folder: Path, top: int = 24, max_clusters: int = 10) -> str:
    """The report's HTML for a discovery.json document."""
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ravl-engine audit</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}.cluster{margin-bottom:2.5em}</style>",
        "</head><body><h1>ravl-engine audit</h1>",
        f"<p>K = {document['k']} clusters; {len(document['clusters'])} passed RaVL's filter, ranked by performance gap."
        " Each montage shows a cluster's regions most similar to its medoid first.</p>",
    ]
    if not document["clusters"]:
        out.append("<p><b>No spurious region cluster was found.</b></p>")
    for cluster in document["clusters"][:max_clusters]:
        data, shown = _montage(cluster["regions"][:top], image_folder)
        out.append(f"<div class='cluster'><h2>#{cluster['rank']}: class {html.escape(str(cluster['class']))}</h2>")
        out.append(
            f"<p>gap {cluster['gap']:.3f}, influence {cluster['influence']:.3f}, {len(cluster['regions'])} regions"
            f" (top {shown} shown)</p>"
        )
        if data:
            out.append(f"<img alt='top regions of cluster {cluster['rank']}' src='data:image/png;base64,{data}'>")
        out.append(
            "<table><tr><th>class</th><th>acc. with</th><th>n with</th><th>acc. without</th><th>n without</th></tr>"
        )
        for entry in cluster["table"]:
            out.append(
                f"<tr><td>{html.escape(str(entry['class']))}</td><td>{entry['acc_present']:.3f}</td>"
                f"<td>{entry['n_present']}</td><td>{entry['acc_absent']:.3f}</td><td>{entry['n_absent']}</td></tr>"
            )
        out.append("</table>")
        out.append(_bars(cluster["table"]))
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(document: dict[str, Any], path: Path, *, image_folder: Path, top: int = 24) -> Path:
    """Write the report next to discovery.json (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(document, image_folder=image_folder, top=top), encoding="utf-8")
    tmp.replace(path)
    return path


def summary_table(document: dict[str, Any], *, max_clusters: int = 10) -> str:
    """Plain-text table of the ranked clusters (for the terminal)."""
    lines = [f"{'rank':>4}  {'class':<12} {'gap':>7} {'influence':>9} {'regions':>8}"]
    for c in document["clusters"][:max_clusters]:
        lines.append(
            f"{c['rank']:>4}  {str(c['class']):<12} {c['gap']:>7.3f} {c['influence']:>9.3f} {len(c['regions']):>8}"
        )
    if not document["clusters"]:
        lines.append("   -  no spurious region cluster found")
    return "\n".join(lines)
