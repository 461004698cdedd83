"""The baselines every paper compares to: PaDiM, PatchCore, and a naive mean-image detector."""
from adlab.embedding.naive import MeanImageConfig, MeanImageDetector
from adlab.embedding.padim import PaDiM, PaDiMConfig
from adlab.embedding.patchcore import PatchCore, PatchCoreConfig

__all__ = ["MeanImageConfig", "MeanImageDetector", "PaDiM", "PaDiMConfig", "PatchCore",
           "PatchCoreConfig"]
