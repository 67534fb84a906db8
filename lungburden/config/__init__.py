"""Configuration of the lungburden node: one YAML file, typed dataclasses, env overrides."""

from lungburden.config.loader import ConfigError, apply_env_overrides, config_from_mapping, dump_config, load_config
from lungburden.config.schema import (
    Config,
    DicomwebDestination,
    DimseDestination,
    ExportConfig,
    FolderDestination,
    HttpConfig,
    LoggingConfig,
    NodeConfig,
    ProcessingConfig,
    SelectionConfig,
)

__all__ = [
    "Config", "ConfigError", "DicomwebDestination", "DimseDestination", "ExportConfig", "FolderDestination",
    "HttpConfig", "LoggingConfig", "NodeConfig", "ProcessingConfig", "SelectionConfig",
    "apply_env_overrides", "config_from_mapping", "dump_config", "load_config",
]
