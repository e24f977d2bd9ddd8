"""spinfx.kernels: torch.library custom ops (spinfx::*), fake impls, CPU paths, Triton bodies. Leaves: import nothing from the rest of spinfx."""
