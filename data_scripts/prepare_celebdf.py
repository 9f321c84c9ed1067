#!/usr/bin/env python
"""Preprocess Celeb-DF v2 into face crops and a DeepfakeBench JSON.

Usage: python data_scripts/prepare_celebdf.py CELEBDF_ROOT OUT [--num_frames 32] [--size 256] [--skip_errors] ...
See data_scripts/README.md (download) and lesson nbs/14_real_data.ipynb (what it does); --help lists options.
"""
from deepfake_course.data.preprocess import prepare_celebdf_cli

if __name__ == '__main__': prepare_celebdf_cli()
