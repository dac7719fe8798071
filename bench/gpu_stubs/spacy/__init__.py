"""Stand-in for spaCy (bench/gpu_stubs/README.md): importable; loading a language model raises."""


def load(*args, **kwargs):
    raise ModuleNotFoundError("spacy is a stand-in here (bench/gpu_stubs): no spaCy model can be loaded")


def __getattr__(name: str):
    raise AttributeError(f"spacy is a stand-in here (bench/gpu_stubs): spacy.{name} is not available")
