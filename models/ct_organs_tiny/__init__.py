"""The ct_organs_tiny model: spec, weights, card, training and evaluation scripts."""
