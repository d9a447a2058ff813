"""Position tables: 3D rotary (1.0 crop grid, 1.5 slice grid), 3D sin-cos (2B) and timestep sinusoids."""

from .rotary import apply_rotary, rotary_tables
from .sincos import sincos_1d, sincos_3d, timestep_sinusoids

__all__ = ["apply_rotary", "rotary_tables", "sincos_1d", "sincos_3d", "timestep_sinusoids"]
