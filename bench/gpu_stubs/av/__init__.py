"""Stand-in for PyAV (bench/gpu_stubs/README.md): importable; any use raises."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"av (PyAV) is a stand-in here (bench/gpu_stubs): av.{name} is not available; use WAV")
