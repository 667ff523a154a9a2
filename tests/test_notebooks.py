"""The notebooks run top to bottom (so they cannot rot): samplers.ipynb, quickstart.ipynb, and any
other notebook in notebooks/, each in a fresh kernel whose working directory is a temporary one."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(HERE, "..", "notebooks")) if f.endswith(".ipynb"))


def test_quickstart_is_collected():
    assert "quickstart.ipynb" in NOTEBOOKS and "samplers.ipynb" in NOTEBOOKS, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    path = os.path.join(HERE, "..", "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    env_cwd = str(tmp_path)
    # The kernel inherits this environment. conftest.py emulates 8 host devices for the mesh tests;
    # a notebook runs as a user runs it, on the one CPU device (8 emulated devices on 2 cores make
    # the quickstart's training ~1.4x slower).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("TMPDIR", env_cwd)   # the notebooks' tempfile.mkdtemp() workdirs go away with tmp_path
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": env_cwd}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
