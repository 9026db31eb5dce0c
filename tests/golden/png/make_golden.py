# tests/golden/png/make_golden.py: provenance of the PNG reader's cases (not run by the tests).
# PIL writes small images of every 8-bit color type with its default (adaptive) filters and
# zlib level 9 (dynamic Huffman blocks), one with level 1 (fixed Huffman blocks likely), and each
# image's raw pixels as <name>.raw (row-major, channels as read: palette images expanded to RGB,
# or RGBA with a transparency chunk). Run: /tmp/wanref/bin/python make_golden.py
import os, numpy as np
from PIL import Image
here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(0)
def smooth(h, w, c):
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3 + k * 50) % 256 for k in range(c)], -1)
    noise = rng.integers(0, 16, size=(h, w, c))
    return ((base + noise) % 256).astype(np.uint8)
cases = {
    "rgb": (Image.fromarray(smooth(23, 37, 3), "RGB"), {"compress_level": 9}),
    "rgba": (Image.fromarray(smooth(19, 41, 4), "RGBA"), {"compress_level": 9}),
    "gray": (Image.fromarray(smooth(31, 17, 1)[..., 0], "L"), {"compress_level": 9}),
    "gray_alpha": (Image.fromarray(smooth(13, 29, 2), "LA"), {"compress_level": 6}),
    "rgb_fast": (Image.fromarray(smooth(64, 64, 3), "RGB"), {"compress_level": 1}),
    "noise": (Image.fromarray(rng.integers(0, 256, size=(40, 50, 3)).astype(np.uint8), "RGB"), {"compress_level": 9}),
}
pal = Image.fromarray(smooth(21, 33, 3), "RGB").convert("P", palette=Image.ADAPTIVE, colors=40)
cases["palette"] = (pal, {"compress_level": 9})
pal_t = pal.copy(); pal_t.info["transparency"] = bytes([128] * 10 + [255] * 30)
cases["palette_trns"] = (pal_t, {"compress_level": 9, "transparency": bytes([128] * 10 + [255] * 30)})
for name, (im, kw) in cases.items():
    im.save(os.path.join(here, name + ".png"), **kw)
    back = Image.open(os.path.join(here, name + ".png"))
    if back.mode == "P":
        back = back.convert("RGBA" if "transparency" in back.info else "RGB")
    open(os.path.join(here, name + ".raw"), "wb").write(np.asarray(back).tobytes())
    print(name, back.mode, back.size)
# Lanczos resizes (Image.LANCZOS, as Automodel's resize_and_crop): resize_<name>_<w>x<h>.raw
for name, size in [("rgb", (64, 40)), ("noise", (20, 16)), ("rgb_fast", (48, 24)), ("rgb_fast", (100, 130))]:
    im = Image.open(os.path.join(here, name + ".png")).convert("RGB")
    out = im.resize(size, Image.LANCZOS)
    open(os.path.join(here, "resize_%s_%dx%d.raw" % (name, size[0], size[1])), "wb").write(np.asarray(out).tobytes())
    print("resize", name, size)
