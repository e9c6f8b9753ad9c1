"""Data preparation for slicreg: the embedded example CT, dataset layouts, and the paper's preprocessing.

- :mod:`preprocessing.example` -- fetch the real example CT (TotalSegmentator's test scan) and map its labels to
  the 13 BTCV organs;
- the paper's preprocessing (reorient, 2 mm, crop/pad to 192 x 160 x 256, map back) is the method's inference
  geometry and lives in the core, :mod:`slicreg.geometry` (:mod:`preprocessing.geometry` re-exports it);
- :mod:`preprocessing.datasets` -- read and validate dataset folders (the project's dataset.json, BTCV,
  Learn2Reg AbdomenCTCT) and write dataset.json;
- :mod:`preprocessing.cohort` -- the synthetic cohort made from the example scan;
- :mod:`preprocessing.ct` and :mod:`preprocessing.acquisition` -- the simulated CT acquisition the cohort can use.

This package builds on :mod:`slicreg` and never imports :mod:`pipelines`.
"""
