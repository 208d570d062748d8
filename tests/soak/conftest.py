"""The tiny model saved as a folder (harness.model_dir) for the soak's server process."""

from tests.service.harness import model_dir

__all__ = ["model_dir"]
