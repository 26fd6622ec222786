"""The notebooks run end to end (nbclient) on a smoke checkpoint, and show their results.

One ``configs/demo.py:smoke`` training (seconds) is made by
``notebook_utils.demo_or_tiny_checkpoint`` in a subprocess; both notebooks then load it
through ``$KPTJAX_DEMO_WORKDIR`` (the demo-workdir branch), with the synthetic data in a
temporary ``$KPTJAX_DATA_DIR``.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from kptjax import notebook_utils  # noqa: E402

NOTEBOOKS = notebook_utils.REPO_ROOT / "notebooks"
SMOKE = "configs/demo.py:smoke"
# A parsed answer or the parse-failure message, as the notebooks print them.
ANSWER_RE = re.compile(r"parsed: .*\d|parse failure")


def _env(data_dir: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ, KPTJAX_DATA_DIR=str(data_dir), TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)   # one CPU device, as a user's kernel has (conftest sets 8)
  return env


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  """(workdir, env): a smoke checkpoint trained by the helper's no-demo branch."""
  tmp = tmp_path_factory.mktemp("notebooks")
  env = _env(tmp / "data")
  script = ("import json, sys; from kptjax import notebook_utils as nu; "
            "config, workdir, note = nu.demo_or_tiny_checkpoint(sys.argv[1], sys.argv[2]); "
            "print(json.dumps([workdir, note]))")
  out = subprocess.run([sys.executable, "-c", script, str(tmp / "no_demo"), str(tmp)],
                       env=env, cwd=notebook_utils.REPO_ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  workdir, note = json.loads(out.stdout.strip().splitlines()[-1])
  assert notebook_utils.is_workdir(workdir) and "trained" in note
  return workdir, env


def _run_notebook(name: str, smoke_workdir, monkeypatch):
  workdir, env = smoke_workdir
  monkeypatch.delenv("XLA_FLAGS", raising=False)      # the kernel inherits this env
  monkeypatch.setenv("KPTJAX_DATA_DIR", env["KPTJAX_DATA_DIR"])
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv(notebook_utils.DEMO_WORKDIR_ENV, workdir)
  monkeypatch.setenv(notebook_utils.DEMO_CONFIG_ENV, SMOKE)
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      f"{name}.ipynb is committed with outputs: clear them"
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()   # raises CellExecutionError when a cell fails
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream"
                 and o.get("name") == "stdout")
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  return text, images


def test_attention_inspection(smoke_workdir, monkeypatch):
  text, images = _run_notebook("attention_inspection", smoke_workdir, monkeypatch)
  assert f"checkpoint: {smoke_workdir[0]}" in text
  assert re.search(r"Q: '.*left wrist", text) and "A: '" in text
  assert re.search(r"parsed: x=0\.\d+", text), text[-2000:]   # constrained: always parses
  assert re.search(r"attention to the image: \(\d+, \d+\) .*\(predicting digits\)", text), \
      text[-2000:]
  assert len(images) >= 3   # the crop, the answer, the heatmaps


def test_walkthrough(smoke_workdir, monkeypatch):
  text, images = _run_notebook("walkthrough", smoke_workdir, monkeypatch)
  assert "«[0." in text and re.search(r"<image>\*\d+", text)   # the conversation, its mask
  assert re.search(r"\d+/17 answers parsed", text), text[-2000:]
  assert "left wrist: A: '" in text and ANSWER_RE.search(text), text[-2000:]
  assert len(images) >= 3   # the record, the crop, truth vs model
