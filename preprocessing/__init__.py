"""Data preparation for slicreg: the embedded example CT, dataset layouts, and the paper's preprocessing.

- :mod:`preprocessing.example` -- fetch the real example CT (TotalSegmentator's test scan) and map its labels to
  the 13 BTCV organs;
- :mod:`preprocessing.geometry` -- reorient, resample to 2 mm, crop/pad to 192 x 160 x 256 around the
  soft-tissue centre, and map results back to the original grid;
- :mod:`preprocessing.datasets` -- read and validate dataset folders (the project's dataset.json, BTCV,
  Learn2Reg AbdomenCTCT) and write dataset.json;
- :mod:`preprocessing.cohort` -- the synthetic cohort made from the example scan.

This package builds on :mod:`slicreg` and never imports :mod:`pipelines`.
"""
