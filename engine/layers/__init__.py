"""Model building blocks: each calls engine.kernels.ops, never a kernel directly."""
