"""``python -m adlab train`` and ``bench --checkpoint``: the saved detector scores exactly as
the one bench fits in memory, resume continues, and every user mistake is one line, exit 2,
with nothing already written touched."""
import pytest
import torch

from adlab import __main__ as cli
from adlab import bench
from adlab.data.synthetic import generate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, size=64, categories=["weave"], n_train=8, n_test_good=4, n_per_defect=2)
    return root


def _run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err):
    return [line for line in err.splitlines() if "error" in line]


def test_train_then_bench_checkpoint_gives_the_in_memory_scores(root, tmp_path, capsys):
    out = tmp_path / "csflow.pt"
    code, _, err = _run(capsys, "train", "csflow", "--root", str(root), "--category", "weave",
                        "--out", str(out))
    assert code == 0, err
    assert out.exists() and (tmp_path / "csflow.train.pt").exists()
    [saved] = bench.run_checkpoints([out], root, progress=False)
    [fitted] = bench.run(["csflow"], ["weave"], root, progress=False)   # bench's own fit
    assert "error" not in saved and "error" not in fitted
    for metric in bench.METRICS:
        assert saved[metric] == pytest.approx(fitted[metric], abs=1e-6, nan_ok=True), metric
    code, table, err = _run(capsys, "bench", "--checkpoint", str(out), "--root", str(root))
    assert code == 0, err
    row = [line for line in table.splitlines() if line.startswith("| csflow | weave |")]
    assert row and f"{fitted['image_auroc']:.3f}" in row[0]


def test_resume_continues_to_more_steps_like_one_run(root, tmp_path, capsys):
    from adlab.detector import load_detector

    args = ["train", "pyramidflow", "--root", str(root), "--category", "weave"]
    assert _run(capsys, *args, "--out", str(tmp_path / "a.pt"), "--steps", "4")[0] == 0
    assert _run(capsys, *args, "--out", str(tmp_path / "a.pt"), "--steps", "7", "--resume")[0] == 0
    assert _run(capsys, *args, "--out", str(tmp_path / "b.pt"), "--steps", "7")[0] == 0
    a, b = load_detector(tmp_path / "a.pt"), load_detector(tmp_path / "b.pt")
    assert len(a.history) == 7 and a.history == b.history
    for (key, x), y in zip(a.flow.state_dict().items(), b.flow.state_dict().values()):
        assert x.equal(y), key


@pytest.mark.parametrize("argv, message", [
    (["train", "nope", "--category", "weave", "--out", "x.pt"], "unknown method 'nope'"),
    (["train", "cflow", "--category", "weave", "--out", "x.pt", "--steps", "0"], "positive number of steps"),
    (["train", "padim", "--category", "weave", "--out", "x.pt", "--steps", "3"], "no training steps"),
    (["train", "cflow", "--out", "x.pt"], "--category"),
    (["train", "cflow", "--category", "weave", "--out", "x.pt", "--resume"], "nothing|no training checkpoint"),
    (["bench", "--checkpoint", "x.pt", "--methods", "naive"], "drop --methods"),
    (["train", "glad", "--category", "weave", "--out", "x.pt", "--set", "atq=False"],
     "GLADConfig has no such setting"),
    (["train", "glad", "--category", "weave", "--out", "x.pt", "--set", "atp"], "write KEY=VALUE"),
    (["train", "glad", "--category", "weave", "--out", "x.pt", "--set", "seed=3"], "use --seed"),
])
def test_argument_mistakes_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    [line] = _error_lines(err)
    assert any(m in line for m in message.split("|")), line


def test_data_and_checkpoint_mistakes_are_one_line_and_nothing_is_lost(root, tmp_path, capsys):
    args = ["train", "pyramidflow", "--root", str(root), "--out", str(tmp_path / "p.pt")]
    code, _, err = _run(capsys, *args, "--category", "nope")
    assert code == 2 and "Traceback" not in err and "nope" in _error_lines(err)[0]
    assert _run(capsys, *args, "--category", "weave", "--steps", "2")[0] == 0
    partial = tmp_path / "p.train.pt"
    before = (partial.read_bytes(), (tmp_path / "p.pt").read_bytes())
    code, _, err = _run(capsys, *args, "--category", "weave", "--steps", "2")   # no --resume
    assert code == 2 and "--resume" in _error_lines(err)[0]
    code, _, err = _run(capsys, *args, "--category", "weave", "--steps", "4", "--resume",
                        "--seed", "1")                                          # other settings
    [line] = _error_lines(err)
    assert code == 2 and "seed 0 there, 1 here" in line and "Traceback" not in err
    assert (partial.read_bytes(), (tmp_path / "p.pt").read_bytes()) == before
    code, _, err = _run(capsys, "bench", "--checkpoint", str(partial), "--root", str(root))
    assert code == 2 and "training checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("name, crash_after, saved", [("cflow", 5, 3), ("fastflow", 7, 6)])
def test_a_crashed_run_resumes_exactly(name, crash_after, saved, tmp_path):
    """CFlow's steps are fibres of an encoded image batch: a resume re-encodes that batch.
    FastFlow validates every 5 steps here and keeps the best weights: a resume keeps both."""
    from adlab.bench import detector_class
    from adlab.train import train_detector

    images = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def detector_and_run():
        det = detector_class(name)()
        return det, det.training_run(images, steps=9)

    whole, run = detector_and_run()
    train_detector(whole, run, progress=False)

    det, run = detector_and_run()
    calls, loss_fn = [0], run.loss_fn

    def crashing(batch):  # a crash after `crash_after` steps; the last checkpoint stays
        calls[0] += 1
        if calls[0] > crash_after:
            raise KeyboardInterrupt
        return loss_fn(batch)
    run.loss_fn = crashing
    with pytest.raises(KeyboardInterrupt):
        train_detector(det, run, progress=False, checkpoint=tmp_path / "c.pt", checkpoint_every=3)
    assert torch.load(tmp_path / "c.pt")["step"] == saved

    resumed, run = detector_and_run()
    train_detector(resumed, run, progress=False, checkpoint=tmp_path / "c.pt")
    assert resumed.history == whole.history
    if name == "fastflow":
        assert resumed.val_history == whole.val_history and len(whole.val_history) == 2
        assert resumed.best_step == whole.best_step
    a, b = resumed.state_dict(), whole.state_dict()
    module = "decoders" if name == "cflow" else "model"
    for (key, x), y in zip(a[module].items(), b[module].values()):
        assert x.equal(y), key


def test_set_changes_the_config_and_half_stores_float16(root, tmp_path, capsys):
    """--set KEY=VALUE reaches the saved config (Python literals and plain strings); --half
    writes float16 tensors, which load back as float32 and predict within float16 rounding of
    the float32 file's scores."""
    import torch

    from adlab.data.mvtec import load_dataset
    from adlab.detector import load_detector

    args = ["train", "padim", "--root", str(root), "--category", "weave"]
    assert _run(capsys, *args, "--out", str(tmp_path / "full.pt"))[0] == 0
    assert _run(capsys, *args, "--out", str(tmp_path / "half.pt"), "--half",
                "--set", "d=20", "--set", "backbone=resnet18")[0] == 0
    assert _run(capsys, *args, "--out", str(tmp_path / "half20.pt"), "--set", "d=20",
                "--set", "backbone=resnet18")[0] == 0
    disk = torch.load(tmp_path / "half.pt", weights_only=True)
    assert disk["stored_as"] == "float16" and disk["config"]["d"] == 20
    floats = [v for v in disk["state"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    half, full = load_detector(tmp_path / "half.pt"), load_detector(tmp_path / "half20.pt")
    assert half.config == full.config and half.config.backbone == "resnet18"
    images = load_dataset("weave", "test", root=root).images
    a, b = half.predict(images), full.predict(images)
    assert a.scores.dtype == torch.float32
    torch.testing.assert_close(a.scores, b.scores, rtol=2e-2, atol=1e-3)
