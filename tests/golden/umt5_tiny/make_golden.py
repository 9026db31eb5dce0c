#!/usr/bin/env python3
"""tests/golden/umt5_tiny/make_golden.py: provenance of the umt5_tiny case (UMT5EncoderModel, Wan's
text encoder): runs ../t5_tiny/make_golden.py for "umt5" (that file describes the case and its
files). PROVENANCE ONLY: nothing in the build or the tests runs this script.
  /tmp/wanref/bin/python tests/golden/umt5_tiny/make_golden.py
"""
import os
import runpy
import sys

sys.argv = [sys.argv[0], "umt5"]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "t5_tiny", "make_golden.py"),
               run_name="__main__")
