"""Config, model, data, parallelization and the training loop."""
from trainer.config import JobConfig, load_config, reference_markdown, to_toml
from trainer.model import model_parameters

__all__ = ["JobConfig", "load_config", "model_parameters", "reference_markdown", "to_toml"]
