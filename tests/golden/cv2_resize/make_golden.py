#!/usr/bin/env python3
"""tests/golden/cv2_resize/make_golden.py: cv2.resize(..., interpolation=INTER_LINEAR) (the resize
Automodel's video preprocessing uses) of a small RGB image, for tests/lua/test_encode.lua
(nemo.data.encode.resize_bilinear).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

src.png: 37 x 23 RGB, numpy RandomState(7) uint8 with a smooth gradient added (so both noise and
ramps are resized). bilinear_<W>x<H>.raw: cv2.resize(src, (W, H)) as raw RGB bytes, for upscales,
downscales (by 2 and by other factors) and mixed ones. cases.json lists them.

  /tmp/wanref/bin/python tests/golden/cv2_resize/make_golden.py     (opencv-python-headless)
"""
import json, os, sys
import numpy as np, cv2
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
W, H = 37, 23
rs = np.random.RandomState(7)
noise = rs.randint(0, 96, size=(H, W, 3))
yy, xx = np.mgrid[0:H, 0:W]
ramp = np.stack([xx * 4, yy * 6, (xx + yy) * 3], axis=-1)
src = np.clip(noise + ramp, 0, 255).astype(np.uint8)
Image.fromarray(src, "RGB").save(os.path.join(HERE, "src.png"))
sizes = [(64, 40), (74, 46), (18, 11), (16, 10), (50, 9), (9, 50), (37, 23), (100, 61)]
for w, h in sizes:
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
    open(os.path.join(HERE, "bilinear_%dx%d.raw" % (w, h)), "wb").write(np.ascontiguousarray(out).tobytes())
json.dump({"src": [W, H], "sizes": sizes, "opencv": cv2.__version__, "numpy": np.__version__,
           "python": sys.version.split()[0]}, open(os.path.join(HERE, "cases.json"), "w"), indent=1)
print("ok", cv2.__version__)
