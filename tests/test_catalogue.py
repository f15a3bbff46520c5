"""Every catalogue entry passes, and the catalogue machinery reports failures as failures."""
import json
import subprocess
import sys

import pytest

from theory_checks import catalogue
from theory_checks.catalogue import Catalogue, Check, Outcome

CHECKS = catalogue().checks


def test_catalogue_is_large_enough():
    assert len(CHECKS) >= 25
    assert len({c.name for c in CHECKS}) == len(CHECKS)


@pytest.mark.parametrize("chk", CHECKS, ids=[c.name for c in CHECKS])
def test_check_passes(chk):
    r = chk.run()
    assert r.passed, f"{chk.name}: residual {r.residual} > tol {chk.tol} ({r.detail})"
    assert chk.identity, f"{chk.name} has no docstring stating its identity"


def test_claims_are_refuted_with_counterexamples():
    claims = [c for c in CHECKS if c.kind == "claim"]
    assert len(claims) == 4  # attention invariance, Post-LN growth, Laplacian amplification, softmax one-hot limit
    for c in claims:
        r = c.run()
        assert r.verdict == "refuted" and "counterexample" in r.detail


def test_failing_and_crashing_checks_fail():
    bad = Check("bad", "x", "exact", 1e-10, "", "", lambda: 1e-3)
    crash = Check("crash", "x", "exact", 1e-10, "", "", lambda: 1 / 0)
    claim = Check("c", "x", "claim", 0, "", "", lambda: Outcome(0.0, verdict="holds"), expected_verdict="refuted")
    results = Catalogue([bad, crash, claim]).run()
    assert [r.passed for r in results] == [False, False, False]
    assert "ZeroDivisionError" in results[1].detail


def test_module_entry_point_json(tmp_path):
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, "-m", "theory_checks", "--area", "claims", "--json", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["failed"] == 0 and doc["passed"] == len(doc["checks"]) == 6
    assert {"name", "area", "residual", "tol", "pass", "identity"} <= set(doc["checks"][0])
