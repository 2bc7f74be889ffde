"""Evaluation: the evaluate stage and the success gates (scores come from `aeselect.scoring`)."""
