"""Prediction with fine-tuned models.

Segmentation: :func:`ctfm.predict.seg.predict_seg` runs a batch; :mod:`ctfm.predict.aggregation`
is the streamed Gaussian sliding window (MONAI's windows and weights, bounded memory);
:mod:`ctfm.predict.writers` writes NIfTI, DICOM SEG, labels.json and statistics.
Classification: :func:`ctfm.predict.cls.predict_cls` writes one row of probabilities per scan.
"""
