"""pipelines/serve/loadgen.py without a server: its input file and what its command refuses (the measurements
against a real server are in test_serving.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.config import REPO_ROOT
from pipelines.data import decode
from pipelines.serve import loadgen
from pipelines.siglip import SO400M_PREPROCESSOR, Preprocess

PIXEL_VALUES_JSON = REPO_ROOT / "data" / "siglip" / "pixel_values.json"


def test_pixel_values_json_is_the_preprocessed_photo():
    import sklearn.datasets

    pixels = loadgen.load_pixel_values(PIXEL_VALUES_JSON)
    photo = (Path(sklearn.datasets.__file__).parent / "images" / "china.jpg").read_bytes()
    expected = Preprocess.from_config(SO400M_PREPROCESSOR)(decode(photo)).numpy()
    assert pixels.shape == (1, 3, 384, 384) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[0], expected)
    assert PIXEL_VALUES_JSON.stat().st_size < 4 << 20


def test_loadgen_cli_refuses_what_it_cannot_send():
    run = [sys.executable, "-m", "pipelines.serve.loadgen", "duration_s=1"]
    no_image = subprocess.run([*run, "triton_model=embed_image"], check=False, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
    assert no_image.returncode == 2 and "triton_model=embed_image needs image=FILE" in no_image.stderr
    bad_protocol = subprocess.run([*run, "protocols=[udp]"], check=False, cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=120)
    assert bad_protocol.returncode == 2 and "protocol='udp'" in bad_protocol.stderr
