"""adlab: unsupervised visual anomaly detection, one readable module per equation."""
from adlab.config import by_profile, device, print_setup, profile, seed_everything
from adlab.detector import Detector, Prediction, evaluate

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "evaluate", "profile", "by_profile", "device",
           "seed_everything", "print_setup"]
