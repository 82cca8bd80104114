"""Objectives: the loss pieces recipes compose (consistency, tangents, adversarial, distribution matching) and the few-
step generator the data-free recipes train.
"""
