"""Discovery's results pinned: the planted bench inputs (every strategy) and a tiny embed + cluster run directory give
today what they gave when tests/assets/pinned/discovery.json was written (``python -m tests.regen_pinned``).

Integers and ids compare exactly, floats to 1e-6 relative; region indices whose similarities tie (within 1e-6) compare
as sets, since which of two equal values sorts first is not part of the contract.

The run directory's silhouettes are the exception: its blank quadrants embed to near-duplicate regions, whose
silhouettes come from float32 sums of nearly equal terms, so they move with the CPU's BLAS kernels. The same committed
embeddings gave silhouettes 3e-4 apart under MKL's AVX2 and AVX-512 paths on one Intel Xeon, and the golden (written
on an AMD EPYC) is 3.5e-3 apart from an AVX-512 Xeon's run; its floats compare to RUN_DIR_REL, its ids still exactly
(the chosen K leads the next by 0.05).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.regen_pinned import GOLDEN, PLANTED_CASES, RUN_DIR_CASE, planted_case, run_dir_case

REL = 1e-6
RUN_DIR_REL = 1e-2


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def _close(a: Any, b: Any, rel: float = REL) -> bool:
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def _assert_floats(got: list[Any], want: list[Any], what: str, rel: float = REL) -> None:
    assert len(got) == len(want), what
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _close(g, w, rel)]
    assert not bad, f"{what}: entry {bad[0]} is {got[bad[0]]}, pinned {want[bad[0]]}"


def _tie_groups(regions: list[int], sims: list[Any]) -> list[set[int]]:
    """Regions grouped by runs of equal (within REL) similarity, in ranked order."""
    groups: list[list[int]] = []
    last = None
    for r, s in zip(regions, sims, strict=True):
        if last is None or not _close(s, last):
            groups.append([])
        groups[-1].append(r)
        last = s
    return [set(g) for g in groups]


def _assert_same_regions(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    _assert_floats(got["similarities"], want["similarities"], f"{what} similarities")
    g, w = _tie_groups(got["regions"], got["similarities"]), _tie_groups(want["regions"], want["similarities"])
    assert len(g) == len(w), what
    # the last group may be cut at the prefix length: its members are any of the tied regions, only its size counts
    assert g[:-1] == w[:-1], f"{what}: ranked regions differ"
    assert [len(x) for x in g] == [len(x) for x in w], what


def _assert_same(got: dict[str, Any], want: dict[str, Any], case: str, silhouette_rel: float = REL) -> None:
    assert got["k"] == want["k"], case
    assert list(got["silhouettes"]) == list(want["silhouettes"]), case
    sils = list(got["silhouettes"].values()), list(want["silhouettes"].values())
    _assert_floats(*sils, f"{case} silhouettes", silhouette_rel)
    for key in ("medoids", "cluster_sizes", "assignments"):
        assert got[key] == want[key], f"{case}: {key} differ"
    _assert_floats(got["gap_total"], want["gap_total"], f"{case} gap_total")
    _assert_floats(got["influence"], want["influence"], f"{case} influence")
    assert len(got["clusters"]) == len(want["clusters"]), f"{case}: number of ranked clusters"
    for g, w in zip(got["clusters"], want["clusters"], strict=True):
        what = f"{case} rank {w['rank']}"
        for key in ("rank", "cluster_id", "class_index", "medoid", "n_regions"):
            assert g[key] == w[key], f"{what}: {key}"
        _assert_floats([g["gap"], g["influence"]], [w["gap"], w["influence"]], f"{what} gap/influence")
        _assert_same_regions(g, w, what)


def test_golden_holds_every_case(golden):
    assert set(golden) == {*PLANTED_CASES, RUN_DIR_CASE}
    assert golden["planted_4000x256_auto"]["clusters"], "the bench input must pin at least one ranked cluster"


@pytest.mark.parametrize("case", list(PLANTED_CASES))
def test_planted_discovery_is_pinned(golden, case):
    _assert_same(planted_case(case), golden[case], case)


def test_run_directory_discovery_is_pinned(golden, tmp_path):
    got = run_dir_case(tmp_path)
    _assert_same(got, golden[RUN_DIR_CASE], "run_dir", silhouette_rel=RUN_DIR_REL)
    assert got["document"] == golden[RUN_DIR_CASE]["document"]


def test_the_comparison_catches_a_changed_result(golden):
    """The checks above can fail: a moved region, a nudged gap or another medoid is reported."""
    want = golden["planted_4000x256_auto"]
    moved = json.loads(json.dumps(want))
    top = moved["clusters"][0]
    top["regions"][0], top["regions"][-1] = top["regions"][-1], top["regions"][0]
    with pytest.raises(AssertionError):
        _assert_same(moved, want, "moved")
    nudged = json.loads(json.dumps(want))
    nudged["clusters"][0]["gap"] *= 1 + 1e-4
    with pytest.raises(AssertionError):
        _assert_same(nudged, want, "nudged")
    other = json.loads(json.dumps(want))
    other["medoids"][0] += 1
    with pytest.raises(AssertionError):
        _assert_same(other, want, "medoid")


def test_tied_regions_compare_as_sets():
    a = {"regions": [5, 3, 9, 1], "similarities": [0.9, 0.8, 0.8, 0.7]}
    b = {"regions": [5, 9, 3, 1], "similarities": [0.9, 0.8, 0.8, 0.7]}
    _assert_same_regions(a, b, "tie")
    c = {"regions": [3, 5, 9, 1], "similarities": [0.9, 0.8, 0.8, 0.7]}
    with pytest.raises(AssertionError):
        _assert_same_regions(c, b, "no tie")
