#!/usr/bin/env bash
# tests/golden/h264/make_golden.sh: writes <name>.mp4 (nemo.mp4's encoder) and <name>.yuv (what
# FFmpeg decodes from it: yuv420p planes, each frame Y then Cb then Cr, cropped) for the clips of
# inputs.lua. A provenance record: the tests never run it. FFMPEG names an ffmpeg binary (the one
# used: ffmpeg n9.0.2, the build inside imageio-ffmpeg 0.8.1 from PyPI).
set -eu
cd "$(dirname "$0")/../../.."
FFMPEG=${FFMPEG:-ffmpeg}
./nemo-lua -e '
package.path = "tests/golden/h264/?.lua;" .. package.path
local mp4 = require "nemo.mp4"
for _, c in ipairs(require("inputs").clips()) do
    local f = io.open("tests/golden/h264/" .. c.name .. ".mp4", "wb")
    f:write(mp4.encode(c.frames, c.width, c.height, 3, {fps = 8, qp = c.qp, keyint = c.keyint, deblock = c.deblock}))
    f:close()
end'
for n in noise mix coarse motion motion_nodb motion34 motion51 still; do
    "$FFMPEG" -v error -i "tests/golden/h264/$n.mp4" -f rawvideo -pix_fmt yuv420p "tests/golden/h264/$n.yuv" -y
done
