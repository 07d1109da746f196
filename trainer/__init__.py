"""Config, model, data, parallelization and the training loop."""
from trainer.config import JobConfig, load_config, reference_markdown, to_toml

__all__ = ["JobConfig", "load_config", "reference_markdown", "to_toml"]
