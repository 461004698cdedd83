"""``python -m adlab dryrun``: paper-size builds, one step, one predict, one line per method."""
import pytest

from adlab import __main__ as cli
from adlab import dryrun


def test_every_method_runs_at_paper_settings_one_line_each(capsys, monkeypatch):
    """What CI asks of a GPU user's first minute: ``python -m adlab dryrun`` over all methods."""
    from adlab.bench import METHODS

    monkeypatch.delenv("ADLAB_PROFILE", raising=False)
    assert cli.main(["dryrun"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", name] for name in METHODS]
    # the paper architectures were built (quick DifferNet has ~2M flow parameters, paper ~172M)
    differnet = lines[list(METHODS).index("differnet")]
    assert float(differnet.split("trainable ")[1].split("M")[0]) > 150
    assert "ADLAB_PROFILE" not in __import__("os").environ       # the profile is restored


def test_a_failing_method_is_a_fail_line_and_exit_1(capsys, monkeypatch):
    from adlab.flows.pyramidflow import PyramidFlow

    def broken(self, train, steps=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(PyramidFlow, "training_run", broken)
    assert cli.main(["dryrun", "naive", "pyramidflow"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok") and lines[1].startswith("FAIL")
    assert "RuntimeError: boom" in lines[1]


def test_an_unknown_method_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        dryrun.main(["nope"])
    assert info.value.code == 2 and "unknown method(s) nope" in capsys.readouterr().err
