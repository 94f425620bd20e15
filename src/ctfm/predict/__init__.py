"""Prediction with fine-tuned models (classification here; segmentation in its own module)."""
