"""Position tables: 3D rotary (1.0 crop grid, 1.5 slice grid), 3D sin-cos (2B) and timestep sinusoids."""

from .rotary import fold_sign, rotary_tables, rotate_pairs
from .sincos import sincos_1d, sincos_3d, timestep_sinusoids

__all__ = ["fold_sign", "rotary_tables", "rotate_pairs", "sincos_1d", "sincos_3d", "timestep_sinusoids"]
