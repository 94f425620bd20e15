"""Prediction with fine-tuned models: segmentation label maps on the input's own grid.

:func:`ctfm.predict.seg.predict_seg` runs a batch; :mod:`ctfm.predict.aggregation` is the
streamed Gaussian sliding window (MONAI's windows and weights, bounded memory);
:mod:`ctfm.predict.writers` writes NIfTI, DICOM SEG, labels.json and statistics.
"""
