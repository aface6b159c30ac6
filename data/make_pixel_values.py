"""Write data/siglip/pixel_values.json: perf_analyzer `--input-data` for the `siglip` model.

One real photo (scikit-learn's china.jpg, 427x640 JPEG) decoded and preprocessed exactly as the embed job does
for so400m-patch14-384, stored as base64 of the float32 [3, 384, 384] tensor (exact, 2.4 MB):
    python data/make_pixel_values.py [--image FILE] [--output FILE]
`python -m pipelines.serve.loadgen` reads the same file, so both tools send the same pixels.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import sklearn.datasets

from pipelines.data import decode
from pipelines.presets import SO400M_PREPROCESSOR
from pipelines.serve.names import PIXEL_VALUES
from pipelines.siglip import Preprocess

OUTPUT = Path(__file__).resolve().parent / "siglip" / "pixel_values.json"
PHOTO = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"


def pixel_values_json(image: bytes) -> dict:
    """Encoded image -> perf_analyzer input data holding its float32 [3, 384, 384] pixel values."""
    pixels = Preprocess.from_config(SO400M_PREPROCESSOR)(decode(image)).numpy()
    content = base64.b64encode(pixels.astype("<f4").tobytes()).decode("ascii")
    return {"data": [{PIXEL_VALUES: {"b64": content, "shape": list(pixels.shape)}}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=PHOTO, help="image file to preprocess")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON file to write")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(pixel_values_json(args.image.read_bytes())) + "\n")
    print(f"wrote {args.output} from {args.image}")


if __name__ == "__main__":
    main()
