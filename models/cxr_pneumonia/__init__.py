"""The cxr_pneumonia model: spec, weights, card, training and evaluation scripts."""
