"""Data: synthetic scene generation, the prepare stage and the prepared-cache dataset."""
