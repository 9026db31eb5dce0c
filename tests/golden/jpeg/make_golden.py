# tests/golden/jpeg/make_golden.py: provenance of the JPEG decoder's cases (not run by the tests).
# Writes <name>.jpg and <name>.raw: the pixels PIL (Pillow 13, libjpeg-turbo, its defaults: islow
# IDCT, fancy upsampling) decodes, np.asarray(Image.open(p).convert("RGB" or "L")).tobytes(),
# row-major, 3 channels (RGB) or 1 (gray). cases.txt lists name, width, height, channels and how
# the file was made. Run: /tmp/wanref/bin/python make_golden.py
#
# Files written by PIL: baseline at several qualities and subsamplings (subsampling=0/1/2 is
# 4:4:4, 4:2:2, 4:2:0), sizes that are not multiples of the MCU (37x23, 127x31, 1x1, 3x5, 5x3,
# 4x9), grayscale, progressive, optimize=True (per-image Huffman tables), restart intervals
# (PIL's restart_marker_blocks / restart_marker_rows, also in a progressive file), keep_rgb=True
# (Adobe APP14 transform 0: RGB stored as is), 16-bit quantization tables (PIL then writes SOF1,
# extended sequential), EXIF + ICC + comment segments.
# PIL cannot write 4:4:0 or a true 4:1:1 (its "4:1:1" means 4:2:0), one scan per component, a
# file without DHT (the MJPEG convention: the standard tables) or RGB told only by the component
# ids 'R','G','B'; the small baseline encoder below (float DCT, the standard Annex K tables, the
# libjpeg quality scaling) writes those, with restart intervals, and PIL decodes them for .raw.
# big420_q80_1024x768.jpg (a 1024x768 4:2:0 file for the decoder's timing) keeps only the CRC-32
# of PIL's pixels, in cases.txt (the raw bytes would be 2.3 MB).
import io, os, zlib
import numpy as np
from PIL import Image

here = os.path.dirname(os.path.abspath(__file__))


def scene(h, w, seed, noise=6.0):
    """Smooth color ramps, sinusoids, a sharp-edged disc and a little noise: chroma that varies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / max(w, 1) * 5.0 + seed) * np.cos(y / max(h, 1) * 3.0)
    g = 40 + 180 * (x + 2 * y) / max(w + 2 * h, 1)
    b = 128 + 90 * np.cos((x - y) / 4.0)
    img = np.stack([r, g, b], -1)
    cy, cx, rad = h * 0.45, w * 0.6, max(2.0, min(h, w) * 0.3)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < rad ** 2
    img[disc] = [230, 30, 60]
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ==== a small baseline encoder for what PIL cannot write ====

ZZ = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14,
      21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60,
      61, 54, 47, 55, 62, 63]
Q_LUM = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22,
         29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103,
         121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
Q_CHR = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99,
         99, 99, 99, 99, 99] + [99] * 32
DC_BITS = [[0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
DC_VALS = [list(range(12)), list(range(12))]
AC_BITS = [[0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d], [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77]]
AC_VALS = [bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738"
    "393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5"
    "a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa"),
    bytes.fromhex(
    "000102031104052131061241510761711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a353637"
    "38393a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a92939495969798999aa2a3"
    "a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9fa")]
assert len(AC_VALS[0]) == 162 and len(AC_VALS[1]) == 162


def codes(bits, vals):
    out, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            out[vals[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return out


def scaled(table, quality):
    s = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (t * s + 50) // 100)) for t in table]


C8 = np.array([[(np.sqrt(0.125) if u == 0 else 0.5) * np.cos((2 * x + 1) * u * np.pi / 16) for x in range(8)]
               for u in range(8)])


class Bits:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, code, length):
        for i in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((code >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc, self.n = 0, 0

    def flush(self):   # pad with 1 bits
        while self.n:
            self.put(1, 1)


def magnitude(v):
    n = abs(int(v)).bit_length()
    return n, (v if v >= 0 else v + (1 << n) - 1)


def seg(marker, payload):
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def encode(rgb, samp, quality=80, restart=0, interleaved=True, ids=(1, 2, 3), color="ycc", jfif=True, dht=True,
           extra=b""):
    """Baseline JPEG of an RGB image: samp = [(h, v)] per component; restart = MCUs per interval
    (0: none); interleaved=False writes one scan per component; color "ycc" (JFIF YCbCr) or "rgb"."""
    h_img, w_img = rgb.shape[:2]
    f = rgb.astype(np.float64)
    if color == "ycc":
        y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        planes = [y, (f[..., 2] - y) / 1.772 + 128, (f[..., 0] - y) / 1.402 + 128]
    else:
        planes = [f[..., 0], f[..., 1], f[..., 2]]
    maxh, maxv = max(s[0] for s in samp), max(s[1] for s in samp)
    mx, my = -(-w_img // (8 * maxh)), -(-h_img // (8 * maxv))
    qts = [scaled(Q_LUM, quality), scaled(Q_CHR, quality)]
    tq = [0, 1, 1] if color == "ycc" else [0, 0, 0]
    th = tq
    comps = []
    for ci, (hs, vs) in enumerate(samp):
        full = np.pad(planes[ci], ((0, my * 8 * maxv - h_img), (0, mx * 8 * maxh - w_img)), mode="edge")
        fy, fx = maxv // vs, maxh // hs
        ds = full.reshape(full.shape[0] // fy, fy, full.shape[1] // fx, fx).mean(axis=(1, 3))
        q = np.array(qts[tq[ci]], np.float64)[np.argsort(ZZ)].reshape(8, 8)   # natural order
        bh, bw = ds.shape[0] // 8, ds.shape[1] // 8
        blocks = np.zeros((bh, bw, 64), np.int64)
        for by in range(bh):
            for bx in range(bw):
                blk = ds[by * 8:by * 8 + 8, bx * 8:bx * 8 + 8] - 128
                coef = np.round((C8 @ blk @ C8.T) / q).astype(np.int64).reshape(64)
                blocks[by, bx] = coef[ZZ]
        dw, dh = -(-w_img * hs // maxh), -(-h_img * vs // maxv)
        comps.append(dict(h=hs, v=vs, blocks=blocks, nbw=-(-dw // 8), nbh=-(-dh // 8)))
    dcc = [codes(DC_BITS[i], DC_VALS[i]) for i in range(2)]
    acc = [codes(AC_BITS[i], AC_VALS[i]) for i in range(2)]

    def block(bits, coefs, pred, t):
        diff = int(coefs[0]) - pred
        n, v = magnitude(diff)
        bits.put(*dcc[t][n])
        if n:
            bits.put(v, n)
        run = 0
        for k in range(1, 64):
            c = int(coefs[k])
            if c == 0:
                run += 1
                continue
            while run > 15:
                bits.put(*acc[t][0xF0])
                run -= 16
            n, v = magnitude(c)
            bits.put(*acc[t][(run << 4) | n])
            bits.put(v, n)
            run = 0
        if run:
            bits.put(*acc[t][0])
        return int(coefs[0])

    def scan(cis, units):
        """units: list of MCUs, each a list of (component index, block row, block col)."""
        bits, pred, out, rst = Bits(), [0, 0, 0], bytearray(), 0
        for m, mcu in enumerate(units):
            if restart and m and m % restart == 0:
                bits.flush()
                out += bits.out + bytes([0xFF, 0xD0 + rst % 8])
                bits, pred, rst = Bits(), [0, 0, 0], rst + 1
            for ci, by, bx in mcu:
                pred[ci] = block(bits, comps[ci]["blocks"][by, bx], pred[ci], th[ci])
        bits.flush()
        out += bits.out
        hdr = bytes([len(cis)]) + b"".join(bytes([ids[ci], (th[ci] << 4) | th[ci]]) for ci in cis) + bytes([0, 63, 0])
        return seg(0xDA, hdr) + bytes(out)

    data = b"\xff\xd8"
    if jfif:
        data += seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    data += extra
    for t in range(2 if color == "ycc" else 1):
        data += seg(0xDB, bytes([t]) + bytes(qts[t][k] for k in range(64)))
    data += seg(0xC0, bytes([8]) + h_img.to_bytes(2, "big") + w_img.to_bytes(2, "big") + bytes([3]) +
                b"".join(bytes([ids[ci], (s[0] << 4) | s[1], tq[ci]]) for ci, s in enumerate(samp)))
    if dht:
        for t in range(2 if color == "ycc" else 1):
            data += seg(0xC4, bytes([t]) + bytes(DC_BITS[t]) + bytes(DC_VALS[t]))
            data += seg(0xC4, bytes([0x10 | t]) + bytes(AC_BITS[t]) + AC_VALS[t])
    if restart:
        data += seg(0xDD, restart.to_bytes(2, "big"))
    if interleaved:
        units = [[(ci, my_ * c["v"] + v, mx_ * c["h"] + h) for ci, c in enumerate(comps) for v in range(c["v"])
                  for h in range(c["h"])] for my_ in range(my) for mx_ in range(mx)]
        data += scan([0, 1, 2], units)
    else:
        for ci, c in enumerate(comps):
            data += scan([ci], [[(ci, by, bx)] for by in range(c["nbh"]) for bx in range(c["nbw"])])
    return data + b"\xff\xd9"


# ==== the cases ====

def pil_jpeg(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue(), np.asarray(img)


def enc(src, *a, **kw):
    return encode(src, *a, **kw), src


def rgb_img(w, h, seed):
    return Image.fromarray(scene(h, w, seed), "RGB")


def gray_img(w, h, seed):
    return Image.fromarray(scene(h, w, seed)[..., 1], "L")


exif = Image.Exif()
exif[0x0112] = 6            # orientation: rotate 90 (ignored by the decoder, as by PIL's plain open)
exif[0x010F] = "nemo-lua"   # make
cases = [
    ("b444_q75_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 1), quality=75, subsampling=0)),
    ("b444_q100_16x16", "PIL", pil_jpeg(rgb_img(16, 16, 2), quality=100, subsampling=0)),
    ("b444_q30_64x48", "PIL", pil_jpeg(rgb_img(64, 48, 3), quality=30, subsampling=0)),
    ("b422_q90_50x40", "PIL", pil_jpeg(rgb_img(50, 40, 4), quality=90, subsampling=1)),
    ("b422_q80_5x3", "PIL", pil_jpeg(rgb_img(5, 3, 5), quality=80, subsampling=1)),
    ("b422_q80_4x9", "PIL", pil_jpeg(rgb_img(4, 9, 6), quality=80, subsampling=1)),
    ("b422_q60_127x31", "PIL", pil_jpeg(rgb_img(127, 31, 7), quality=60, subsampling=1)),
    ("b420_q75_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 8), quality=75, subsampling=2)),
    ("b420_q50_127x31", "PIL", pil_jpeg(rgb_img(127, 31, 9), quality=50, subsampling=2)),
    ("b420_q95_64x48", "PIL", pil_jpeg(rgb_img(64, 48, 10), quality=95, subsampling=2)),
    ("b420_q75_16x16", "PIL", pil_jpeg(rgb_img(16, 16, 11), quality=75, subsampling=2)),
    ("b420_q75_1x1", "PIL", pil_jpeg(rgb_img(1, 1, 12), quality=75, subsampling=2)),
    ("b420_q80_3x5", "PIL", pil_jpeg(rgb_img(3, 5, 13), quality=80, subsampling=2)),
    ("b420_q85_50x40", "PIL", pil_jpeg(rgb_img(50, 40, 14), quality=85, subsampling=2)),
    ("gray_q85_37x23", "PIL", pil_jpeg(gray_img(37, 23, 15), quality=85)),
    ("gray_q60_1x1", "PIL", pil_jpeg(gray_img(1, 1, 16), quality=60)),
    ("gray_q95_127x31", "PIL", pil_jpeg(gray_img(127, 31, 17), quality=95)),
    ("prog420_q75_64x48", "PIL", pil_jpeg(rgb_img(64, 48, 18), quality=75, progressive=True, subsampling=2)),
    ("prog444_q90_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 19), quality=90, progressive=True, subsampling=0)),
    ("prog422_q70_127x31", "PIL", pil_jpeg(rgb_img(127, 31, 20), quality=70, progressive=True, subsampling=1)),
    ("prog_gray_q80_50x40", "PIL", pil_jpeg(gray_img(50, 40, 21), quality=80, progressive=True)),
    ("prog420_q50_1x1", "PIL", pil_jpeg(rgb_img(1, 1, 22), quality=50, progressive=True, subsampling=2)),
    ("opt420_q75_50x40", "PIL", pil_jpeg(rgb_img(50, 40, 23), quality=75, optimize=True, subsampling=2)),
    ("rst420_q75_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 24), quality=75, subsampling=2, restart_marker_blocks=1)),
    ("rst444_rows_q80_50x40", "PIL", pil_jpeg(rgb_img(50, 40, 25), quality=80, subsampling=0,
                                               restart_marker_rows=1)),
    ("rst_gray_q80_37x23", "PIL", pil_jpeg(gray_img(37, 23, 26), quality=80, restart_marker_blocks=3)),
    ("prog_rst420_q75_64x48", "PIL", pil_jpeg(rgb_img(64, 48, 27), quality=75, progressive=True, subsampling=2,
                                              restart_marker_blocks=2)),
    ("adobe_rgb_q90_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 28), quality=90, keep_rgb=True, subsampling=0)),
    ("sof1_q16bit_50x40", "PIL", pil_jpeg(rgb_img(50, 40, 29), subsampling=2,
                                          qtables=[[min(400, 4 + 9 * (k // 8 + k % 8)) for k in range(64)],
                                                   [min(600, 8 + 20 * (k // 8 + k % 8)) for k in range(64)]])),
    ("exif_icc_q80_37x23", "PIL", pil_jpeg(rgb_img(37, 23, 30), quality=80, exif=exif.tobytes(),
                                           icc_profile=b"not a real profile" * 20, comment=b"a JPEG comment")),
    ("c440_q80_37x23", "encoder", enc(scene(23, 37, 31), [(1, 2), (1, 1), (1, 1)], 80)),
    ("c440_rst_q85_50x40", "encoder", enc(scene(40, 50, 32), [(1, 2), (1, 1), (1, 1)], 85, restart=3)),
    ("c411_q80_50x40", "encoder", enc(scene(40, 50, 33), [(4, 1), (1, 1), (1, 1)], 80)),
    ("c411_q90_37x23", "encoder", enc(scene(23, 37, 34), [(4, 1), (1, 1), (1, 1)], 90)),
    ("c420_sep_scans_q80_37x23", "encoder", enc(scene(23, 37, 35), [(2, 2), (1, 1), (1, 1)], 80,
                                                   interleaved=False, restart=4)),
    ("c_y22_c12_q80_37x23", "encoder", enc(scene(23, 37, 36), [(2, 2), (1, 2), (1, 2)], 80)),
    ("c_rgb_ids_q90_37x23", "encoder", enc(scene(23, 37, 37), [(1, 1)] * 3, 90, ids=(82, 71, 66), color="rgb",
                                              jfif=False)),
    ("c_no_dht_q75_37x23", "encoder", enc(scene(23, 37, 38), [(2, 1), (1, 1), (1, 1)], 75, dht=False,
                                             extra=seg(0xE1, b"Exif\x00\x00" + bytes(40)) + seg(0xFE, b"hi"))),
]

listing = []
for name, how, (data, src) in cases:
    path = os.path.join(here, name + ".jpg")
    open(path, "wb").write(data)
    im = Image.open(path)
    mode = "L" if im.mode == "L" else "RGB"
    px = np.asarray(im.convert(mode))
    open(os.path.join(here, name + ".raw"), "wb").write(px.tobytes())
    listing.append("%s %d %d %d %s" % (name, im.size[0], im.size[1], 1 if mode == "L" else 3, how))
    # a check that the file is what it claims (the little encoder works): PIL's decoding is near the source
    err = np.abs(px.astype(np.int64) - src.astype(np.int64)).mean()
    print("%-26s %-3s %-9s %5d bytes, sampling %s, mean |decoded - source| %.2f" % (
        name, im.mode, "%dx%d" % im.size, len(data), [l[1:3] for l in im.layer], err))

# the timing image: 1024x768 4:2:0, quality 85; only the CRC-32 of PIL's pixels is kept
big = Image.fromarray(scene(768, 1024, 99, noise=1.5), "RGB")
data, _ = pil_jpeg(big, quality=80, subsampling=2)
open(os.path.join(here, "big420_q80_1024x768.jpg"), "wb").write(data)
px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
listing.append("big420_q80_1024x768 1024 768 3 PIL crc32=%d" % zlib.crc32(px.tobytes()))
print("big", len(data), "bytes")
open(os.path.join(here, "cases.txt"), "w").write("\n".join(listing) + "\n")
