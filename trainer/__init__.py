"""Config, model, data, parallelization and the training loop."""
from trainer.config import JobConfig, load_config, reference_markdown, to_toml


def __getattr__(name: str):
    # The model needs torch and the config does not: `kintsugi launch` names a bad config
    # before it imports torch.
    if name == "model_parameters":
        from trainer.model import model_parameters

        return model_parameters
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = ["JobConfig", "load_config", "model_parameters", "reference_markdown", "to_toml"]
