"""Per-user train / validation / test token arrays: sources, partitions, token caches, synthetic users.

    from comigs_jax.data import default_data_config, load_user_data
    cfg = default_data_config(); cfg.source = "synthetic"
    data = load_user_data(cfg)            # data.train[i], data.valid[i], data.test[i]: 1-D uint16 arrays

See docs/data.md.
"""
from comigs_jax.data.build import InsufficientDataError, UserData, load_user_data
from comigs_jax.data.config import (AGNEWS_CATEGORIES, PARTITIONS, SLIMPAJAMA_CATEGORIES, SOURCES,
                                    default_data_config, resolve_categories, validate_data_config)
from comigs_jax.data.sources import DataSourceError
from comigs_jax.data.synthetic import base_stream, general_stream

__all__ = [
    "UserData", "load_user_data", "default_data_config", "validate_data_config", "resolve_categories",
    "base_stream", "general_stream", "DataSourceError", "InsufficientDataError", "SOURCES", "PARTITIONS",
    "SLIMPAJAMA_CATEGORIES", "AGNEWS_CATEGORIES",
]
