"""Fixtures shared by several test files."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


#: Tests that take minutes. They start first, then the notebooks (the heaviest, 4x, first),
#: then the rest in file order, so that the two pytest-xdist workers finish together: in file
#: order the diffusion notebooks and these tests came last, and one worker ran them alone for
#: minutes at the end. (With --dist loadscope a test's whole module moves with it.)
SLOW_FIRST = ("tests/test_tdad.py::test_the_train_command_reproduces",
              "tests/test_glad.py::test_the_train_command_reproduces",
              "tests/test_dryrun.py::test_every_method_runs_at_paper_settings")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.nodeid.startswith(SLOW_FIRST):
            return 0
        return 1 if item.nodeid.startswith("notebooks/") else 2

    notebooks = sorted({i.nodeid.split("::")[0] for i in items if rank(i) == 1}, reverse=True)
    order = {name: k for k, name in enumerate(notebooks)}
    items.sort(key=lambda i: (rank(i), order.get(i.nodeid.split("::")[0], 0)))   # stable


@pytest.fixture(autouse=True)
def live_output(monkeypatch):
    """Unit tests see live progress bars and widgets: ``notebooks/conftest.py`` sets
    ``ADLAB_STATIC_OUTPUT=1`` for notebook kernels, and a pytest-xdist worker may run a
    unit test after a notebook in the same process. Tests that want the static
    output set it themselves."""
    monkeypatch.delenv("ADLAB_STATIC_OUTPUT", raising=False)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The whole session runs on one torch thread (restored after), module-scoped fixtures
    included. The test command runs one pytest-xdist worker per core; with torch's default of
    one thread per core in each worker, the 2-core CI machine is oversubscribed and small
    kernels (a small UNet's) ran ~10x slower (the GLAD reproduction test: 911 s instead of
    ~70 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shipped_and_retrained(tmp_path, monkeypatch):
    """``scores(method, shipped_file)``: image and pixel AUROC on the stone test set of a
    shipped detector (``adlab/checkpoints``) and of the one `python -m adlab train METHOD
    --category stone --seed 0 --half` writes now: the shipped-checkpoint rule of the diffusion
    chapter (the repository's command reproduces a checkpoint's quality)."""
    from adlab.cli_train import main
    from adlab.data.mvtec import load_dataset
    from adlab.detector import load_detector
    from adlab.diffusion.reconstruct import CHECKPOINTS
    from adlab.metrics import image_auroc, pixel_auroc

    monkeypatch.delenv("ADLAB_PROFILE", raising=False)

    def scores(method: str, shipped: str):
        out = tmp_path / f"{method}.pt"
        assert main([method, "--category", "stone", "--seed", "0", "--half", "--out",
                     str(out)]) == 0
        test = load_dataset("stone", "test")
        result = []
        for path in (CHECKPOINTS / shipped, out):
            pred = load_detector(path, method).predict(test.images)
            result.append((image_auroc(test.labels, pred.scores),
                           pixel_auroc(test.masks, pred.maps)))
        return result

    return scores


def _load_script(name: str):
    """``data_scripts/<name>.py`` imported as a module (its ``main(argv)`` is the CLI)."""
    spec = importlib.util.spec_from_file_location(f"adlab_script_{name}",
                                                  REPO / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    """``data_scripts/download.py`` as a module."""
    return _load_script("download")


@pytest.fixture(scope="module")
def synthetic_cli():
    """``data_scripts/make_synthetic.py`` as a module."""
    return _load_script("make_synthetic")
