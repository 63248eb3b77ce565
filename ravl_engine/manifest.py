"""Input manifests: one row per image, as CSV, JSON lines or Parquet.

Columns: ``image`` (path, relative to the manifest's folder or absolute; required), ``label`` (class name),
``caption``, ``split``, ``boxes`` (JSON list of [x1, y1, x2, y2] pixels) and ``region_labels`` (JSON list aligned with
``boxes``, evaluation only). Unknown columns are ignored. Each image is listed once (its ``image`` string is its id
in the run directory); text manifests are UTF-8, with or without a byte-order mark.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ravl_engine.errors import ConfigError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One image of a manifest.

    Attributes:
        image: the ``image`` string as written in the manifest (the run directory's image id).
        path: resolved file path.
        label: class name or None.
        caption: caption or None.
        split: split name or None.
        boxes: list of [x1, y1, x2, y2] pixels, or None when the manifest gives none.
        region_labels: labels aligned with ``boxes``, or None.
    """

    image: str
    path: Path
    label: str | None = None
    caption: str | None = None
    split: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    region_labels: tuple[str, ...] | None = None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value)


def _json_list(value: Any, *, where: str, column: str) -> list[Any] | None:
    if _blank(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: column {column!r} is not valid JSON ({err.msg}); write a JSON list") from err
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: column {column!r} must be a JSON list, got {type(value).__name__}")
    return list(value)


def _parse_row(raw: dict[str, Any], *, folder: Path, where: str) -> ManifestRow:
    image = raw.get("image")
    if _blank(image):
        raise ConfigError(f"{where}: empty 'image' value; every row needs an image path")
    image = str(image)
    path = Path(image) if Path(image).is_absolute() else folder / image
    boxes_raw = _json_list(raw.get("boxes"), where=where, column="boxes")
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    if boxes_raw is not None:
        try:
            parsed = [tuple(float(v) for v in box) for box in boxes_raw]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] numbers") from err
        if any(len(box) != 4 for box in parsed):
            raise ConfigError(f"{where}: every box in 'boxes' needs 4 numbers [x1, y1, x2, y2]")
        bad = next((j for j, box in enumerate(parsed) if not all(math.isfinite(v) for v in box)), None)
        if bad is not None:
            raise ConfigError(f"{where}: box {bad + 1} of 'boxes' is {list(parsed[bad])}; coordinates must be finite")
        boxes = tuple((b[0], b[1], b[2], b[3]) for b in parsed)
    region_raw = _json_list(raw.get("region_labels"), where=where, column="region_labels")
    region_labels = None
    if region_raw is not None:
        region_labels = tuple(str(v) for v in region_raw)
        if boxes is None or len(region_labels) != len(boxes):
            n_boxes = 0 if boxes is None else len(boxes)
            raise ConfigError(
                f"{where}: 'region_labels' has {len(region_labels)} entries but 'boxes' has {n_boxes}; "
                "give one label per box"
            )

    def text(key: str) -> str | None:
        value = raw.get(key)
        return None if _blank(value) else str(value)

    return ManifestRow(
        image=image,
        path=path,
        label=text("label"),
        caption=text("caption"),
        split=text("split"),
        boxes=boxes,
        region_labels=region_labels,
    )


def _read_records(path: Path) -> list[dict[str, Any]]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown manifest format; use .csv, .jsonl or .parquet")
    if kind == "parquet":
        return _read_parquet(path)
    try:
        return _read_text_records(path, kind)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r}); "
            "save the manifest as UTF-8"
        ) from err


def _read_text_records(path: Path, kind: str) -> list[dict[str, Any]]:
    # utf-8-sig: a byte-order mark (as spreadsheet programs write it) is not part of the first column's name
    if kind == "csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise ConfigError(f"{path}: the file is empty; the first line must be a header with an 'image' column")
            if "image" not in reader.fieldnames:
                raise ConfigError(f"{path}: missing column 'image' (found: {', '.join(reader.fieldnames)})")
            return list(reader)
    records = []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: each line must be a JSON object")
            records.append(record)
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow  # noqa: PLC0415  (optional)
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as err:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert to CSV") from err
    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable Parquet file ({first}); rewrite it or convert to CSV") from err


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read and validate a manifest.

    Raises:
        ConfigError: missing, empty or non-UTF-8 file, no ``image`` column, an image listed twice, malformed or
            non-finite ``boxes``, malformed ``region_labels``; the message names the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    records = _read_records(path)
    if not records:
        raise ConfigError(f"{path}: the manifest has no rows")
    if "image" not in records[0]:
        raise ConfigError(f"{path}: missing column 'image' (found: {', '.join(records[0])})")
    rows = [_parse_row(r, folder=path.parent, where=f"{path} row {i + 1}") for i, r in enumerate(records)]
    _reject_duplicates(path, rows)
    return rows


def _reject_duplicates(path: Path, rows: Sequence[ManifestRow]) -> None:
    """The ``image`` string is the image's id in the run directory and discovery.json, so it must be unique:
    a repeated row would be embedded, counted and scored twice."""
    numbers: defaultdict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        numbers[row.image].append(i + 1)
    repeated = {image: rows_ for image, rows_ in numbers.items() if len(rows_) > 1}
    if repeated:
        image, where = next(iter(repeated.items()))
        more = f" and {len(repeated) - 1} more image(s)" if len(repeated) > 1 else ""
        raise ConfigError(
            f"{path}: image {image!r} is listed in rows {', '.join(map(str, where))}{more}; list each image once"
        )


def resolve_classes(
    rows: Sequence[ManifestRow], *, classes: Sequence[str] | None = None, classes_file: str | Path | None = None
) -> list[str]:
    """The class list: ``classes``, else one name per line of ``classes_file``, else the sorted distinct labels.

    Raises:
        ConfigError: no classes at all, duplicate names, or a label outside the classes (names the row).
    """
    if classes is None and classes_file is not None:
        file = Path(classes_file)
        if not file.is_file():
            raise ConfigError(f"classes file {file} does not exist")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ConfigError(f"classes file {file} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if classes is None:
        classes = sorted({r.label for r in rows if r.label is not None})
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError("no classes: give --classes a,b,c, a --classes-file, or a 'label' column")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"duplicate class names in {classes}")
    known = set(classes)
    for i, r in enumerate(rows):
        if r.label is not None and r.label not in known:
            raise ConfigError(
                f"row {i + 1} ({r.image}) has label {r.label!r}, which is not among the classes "
                f"({', '.join(classes)}); fix the label or add the class"
            )
    return classes
