"""Model definitions for the paged engine and the checkpoint spec they are built from."""
