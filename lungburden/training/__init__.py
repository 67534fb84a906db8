"""Training harness of the segmentation networks (paper sections 2.4, 2.6, 2.7).

- :mod:`.data`: training data sources (synthetic phantoms, real CT with inserted synthetic
  lesions, users' NIfTI image/mask pairs, DICOM CT + DICOM SEG pairs), the preprocessed-case cache,
  the windows dataset and the section 2.4 augmentation;
- :mod:`.trainer`: the optimisation loop (RMI + CE loss, SGD, ReduceLROnPlateau, stop at lr 1e-7),
  k-fold cross-validation with train/val/test per fold, checkpoints and resume.

See docs/training.md.
"""
