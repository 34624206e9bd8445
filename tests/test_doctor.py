"""``python -m prunekit.doctor``: the contract table on every family's tiny twin, and a failure when the seam
is broken."""
import pytest

from prunekit import doctor
from helpers import no_cache_adapter, use_adapter

pytestmark = pytest.mark.contract


def test_the_doctor_passes_on_every_family_and_names_the_install(capsys):
    assert doctor.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "attention backends: eager, sdpa" in out
    for family in doctor.FAMILIES:
        for check in ("keep_all == vanilla", "detach restores", "prunes in prefill", "cache == recompute",
                      "padded batch == rows"):
            assert f"{family:<11} {check}" in out
    assert f"{5 * len(doctor.FAMILIES)} passed, 0 failed" in out and "FAIL" not in out


def test_the_doctor_fails_on_a_broken_seam(monkeypatch, capsys):
    use_adapter(monkeypatch, no_cache_adapter())  # the cache kwarg is not found: decode steps look like prefills
    assert doctor.main(["--device", "cpu", "--families", "llava-1.5"]) == 1
    out = capsys.readouterr().out
    assert "SeamError: a second prefill started inside one generate() call" in out
    assert "0 passed, 5 failed" in out  # even keep_all refuses: no result comes from a seam it cannot see
