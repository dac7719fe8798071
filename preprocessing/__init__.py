"""Dataset preparation: an upload (archive or audio file) in, 32 kHz clips with descriptions and an audiocraft
manifest out. `prepare(params, work_dir)` writes it, `load_prepared(folder)` reads it back."""

from preprocessing.dataset import PreparedClip, PreparedDataset, load_prepared
from preprocessing.params import PrepareParams
from preprocessing.prepare import prepare

__all__ = ["PrepareParams", "PreparedClip", "PreparedDataset", "prepare", "load_prepared"]
