"""Shared fixtures. 8 simulated CPU devices for the sharding tests and kptjax's XLA CPU flags
(``kptjax.xla_cpu``, set before jax starts);
one persistent compilation cache for the whole session (``jax_compilation_cache``)."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kptjax import xla_cpu  # noqa: E402

xla_cpu.configure(devices=8)   # the CPU flags the mains set, on 8 simulated devices

import jax  # noqa: E402
import pytest  # noqa: E402

from kptjax import sharding  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# The settings of the session's persistent compilation cache; each is also the upper-cased
# environment variable that a process started by a test reads when it imports jax.
CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0,   # every program,
                  "jax_persistent_cache_min_entry_size_bytes": -1}   # however small


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """A fresh persistent compilation cache directory for this session, used by this process
  and by every process a test starts (through the environment): a program is compiled once
  per session, and the same program (same HLO, options and devices) is loaded from disk
  after that, in a later test or another process. Fresh per session: nothing compiled by an
  earlier run, or another checkout, is ever loaded."""
  path = tmp_path_factory.mktemp("jax_cache")
  settings = dict(CACHE_SETTINGS, jax_compilation_cache_dir=str(path))
  saved = {name.upper(): os.environ.get(name.upper()) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  yield path
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


def shared_data_dir() -> pathlib.Path:
  """The real dataset samples: $KPTJAX_TEST_DATA, else ../shared/data beside the repo."""
  env = os.environ.get("KPTJAX_TEST_DATA")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = shared_data_dir()
  if not (path / "coco" / "test_coco.json").exists():
    raise FileNotFoundError(
        f"dataset samples not found at {path}; set KPTJAX_TEST_DATA to shared/data")
  return path


@pytest.fixture(scope="module")
def model_params():
  """(VLM, params) of configs/tiny.py with random weights drawn with numpy on the params'
  shapes (no init compilation)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from kptjax.models import vlm  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  rng = np.random.default_rng(3)
  shapes = nn.meta.unbox(vlm.abstract_params(config.model))
  params = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype), shapes)
  return vlm.VLM(config.model), params


@pytest.fixture
def mount_tmpfs(tmp_path):
  """``mount_tmpfs(name, size)``: a fresh tmpfs of ``size`` ('4m') at tmp_path/name (a
  small disk that fills up, or one to remount read-only); unmounted after the test.
  Needs root (this project's test machines run as root)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  mounted = []

  def mount(name, size):
    path = tmp_path / name
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def one_device():
  """A 1 x 1 x 1 mesh on the first device (the train tests' single-device runs)."""
  return jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])
