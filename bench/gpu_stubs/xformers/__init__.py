"""Stand-in for xformers (bench/gpu_stubs/README.md): what audiocraft touches with its torch attention backend."""

from . import ops

__version__ = "0.0.0+gpu-check-stub"
__all__ = ["ops"]
