"""transformers' CLIPImageProcessor on the PNGs of a folder: writes
`<name>.<edge>.f32` (the pixel values, float32, (3, H, W) row-major) for
every image and every shortest edge given, crop 28x28."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

folder = Path(sys.argv[1])
for edge in (int(e) for e in sys.argv[2].split(",")):
    proc = CLIPImageProcessor(
        size={"shortest_edge": edge}, crop_size={"height": 28, "width": 28}
    )
    for png in sorted(folder.glob("*.png")):
        px = proc(images=Image.open(png), return_tensors="np")["pixel_values"][0]
        assert px.dtype == np.float32 and px.shape == (3, 28, 28), (px.dtype, px.shape)
        px.tofile(folder / f"{png.stem}.{edge}.f32")
print("ok")
