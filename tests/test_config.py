"""Configuration: defaults, the documented example, validation messages, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lungburden.config import (
    Config,
    ConfigError,
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    config_from_mapping,
    dump_config,
    load_config,
)
from lungburden.dicom_io.selection import SelectionRules
from lungburden.dicom_io.volume import LoadLimits

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "lungburden.example.yaml"


def _problems(exc: ConfigError) -> dict[str, tuple[object, str]]:
    return {key: (value, message) for key, value, message in exc.problems}


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.node.ae_title == "LUNGBURDEN"
    assert config.node.host == "0.0.0.0"
    assert config.node.port == 11112
    assert config.node.storage_dir == tmp_path / "var"
    assert config.node.allowed_calling_aets == []
    assert config.node.series_quiet_seconds == 15
    assert config.node.workers == 1
    assert config.destinations == []
    assert config.node.db_journal_mode == "WAL"
    # selection defaults are those of the pipeline's rules and loader limits
    assert config.selection.to_rules() == SelectionRules()
    assert config.selection.to_limits() == LoadLimits()


def test_example_file_is_valid_and_documents_every_key():
    config = load_config(EXAMPLE, environ={})
    assert [d.name for d in config.destinations] == ["pacs", "pacs-web"]
    pacs, web = config.destinations
    assert isinstance(pacs, DimseDestination)
    assert (pacs.host, pacs.port, pacs.ae_title) == ("127.0.0.1", 4242, "ORTHANC")
    assert isinstance(web, DicomwebDestination) and web.url == "http://127.0.0.1:8042/dicom-web"
    # relative storage_dir is resolved against the file's folder
    assert config.node.storage_dir == (EXAMPLE.parent / ".." / "var")
    # every key of every section appears in the example (documentation stays complete)
    raw = yaml.safe_load(EXAMPLE.read_text())
    dumped = dump_config(Config())
    for section in ("node", "http", "selection", "processing", "export", "logging"):
        assert set(raw[section]) == set(dumped[section]), section
    # and the example's values are the defaults, except the destinations and the storage path
    raw_defaults = dump_config(load_config(EXAMPLE, environ={}))
    for section in ("http", "selection", "processing", "export", "logging"):
        assert raw_defaults[section] == dumped[section], section


def test_errors_name_the_key_and_the_value():
    with pytest.raises(ConfigError) as info:
        config_from_mapping({
            "node": {"prot": 1, "port": "eleven", "ae_title": "A_TITLE_THAT_IS_TOO_LONG", "workers": 0},
            "selection": {"slice_thickness_mm": [5, 1], "kernel_regex": "(unclosed"},
            "export": {"max_attempts": "3"},
            "nodes": {},
        })
    problems = _problems(info.value)
    assert "did you mean 'port'" in problems["node.prot"][1]
    assert problems["node.port"] == ("eleven", "must be an integer")
    assert problems["export.max_attempts"][0] == "3"
    assert "did you mean 'node'" in problems["nodes"][1]
    text = str(info.value)
    assert "node.port: must be an integer (got 'eleven')" in text
    # range checks run once the types are right
    with pytest.raises(ConfigError) as info:
        config_from_mapping({
            "node": {"ae_title": "A_TITLE_THAT_IS_TOO_LONG", "workers": 0, "port": 70000},
            "selection": {"slice_thickness_mm": [5, 1], "kernel_regex": "(unclosed"},
        })
    problems = _problems(info.value)
    assert problems["node.ae_title"][0] == "A_TITLE_THAT_IS_TOO_LONG"
    assert problems["node.workers"] == (0, "must be between 1 and 64")
    assert problems["node.port"][0] == 70000
    assert problems["selection.slice_thickness_mm"][0] == [5, 1]
    assert "regular expression" in problems["selection.kernel_regex"][1]


def test_destinations_are_typed_and_validated():
    config = config_from_mapping({"destinations": [
        {"name": "pacs", "type": "dimse", "host": "10.0.0.1", "port": 104, "ae_title": "PACS"},
        {"name": "web", "type": "dicomweb", "url": "https://pacs/dicom-web", "headers": {"Authorization": "x"}},
        {"name": "out", "type": "folder", "path": "/tmp/out"},
    ]})
    assert [type(d) for d in config.destinations] == [DimseDestination, DicomwebDestination, FolderDestination]
    assert config.destination("out").path == Path("/tmp/out")
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"destinations": [
            {"name": "a", "type": "dimse", "host": "h"},
            {"name": "b", "type": "ftp"},
            {"name": "c", "type": "dicomweb", "url": "pacs:8042"},
            {"name": "c", "type": "folder", "path": "x"},
        ]})
    problems = _problems(info.value)
    assert problems["destinations[0].port"][1] == "is required"
    assert problems["destinations[0].ae_title"][1] == "is required"
    assert problems["destinations[1].type"] == ("ftp", "must be one of dimse, dicomweb, folder")
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"destinations": [
            {"name": "c", "type": "dicomweb", "url": "pacs:8042"},
            {"name": "c", "type": "folder", "path": "x"},
        ]})
    problems = _problems(info.value)
    assert problems["destinations[0].url"][0] == "pacs:8042"
    assert problems["destinations[1].name"] == ("c", "duplicate destination name")


def test_environment_overrides(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"port": 104, "storage_dir": "spool"},
        "destinations": [{"name": "pacs", "type": "dimse", "host": "a", "port": 104, "ae_title": "PACS"},
                         {"name": "pacs-web", "type": "dicomweb", "url": "http://a/dicom-web"}],
    }))
    env = {
        "LUNGBURDEN_NODE__PORT": "11113",
        "LUNGBURDEN_NODE__AE_TITLE": "0123",               # text stays text
        "LUNGBURDEN_NODE__ALLOWED_CALLING_AETS": "[CT01, ORTHANC]",
        "LUNGBURDEN_NODE__SERIES_QUIET_SECONDS": "2.5",
        "LUNGBURDEN_SELECTION__KERNEL_REGEX": "[LB]",      # not parsed as a YAML list
        "LUNGBURDEN_PROCESSING__MODEL": "threshold",
        "LUNGBURDEN_DESTINATIONS__PACS__HOST": "10.1.2.3",
        "LUNGBURDEN_DESTINATIONS__PACS_WEB__URL": "http://10.1.2.3/dicom-web",
        "LUNGBURDEN_DESTINATIONS__OUT__TYPE": "folder",
        "LUNGBURDEN_DESTINATIONS__OUT__PATH": "results",
        "LUNGBURDEN_READY_FILE": "/tmp/x",                  # no "__": not a configuration key
    }
    config = load_config(path, environ=env)
    assert config.node.port == 11113
    assert config.node.ae_title == "0123"
    assert config.node.allowed_calling_aets == ["CT01", "ORTHANC"]
    assert config.node.series_quiet_seconds == 2.5
    assert config.selection.kernel_regex == "[LB]"
    assert config.processing.model == "threshold"
    assert config.destination("pacs").host == "10.1.2.3"
    assert config.destination("pacs-web").url == "http://10.1.2.3/dicom-web"
    assert config.destination("out").path == tmp_path / "results"
    assert config.node.storage_dir == tmp_path / "spool"


def test_environment_errors_name_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"LUNGBURDEN_NODE__PORT": "abc"})
    assert "node.port (from LUNGBURDEN_NODE__PORT): must be an integer (got 'abc')" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"LUNGBURDEN_NOD__PORT": "1"})
    assert "LUNGBURDEN_NOD__PORT" in str(info.value) and "LUNGBURDEN_NODE__" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"LUNGBURDEN_NODE__PROT": "1"})
    assert "node.prot" in str(info.value)


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml", environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar, environ={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, environ={}).node.port == 11112


def test_dump_hides_passwords():
    config = config_from_mapping({"destinations": [
        {"name": "w", "type": "dicomweb", "url": "http://x", "username": "u", "password": "secret"}]})
    assert dump_config(config)["destinations"][0]["password"] == "***"


def test_serve_rejects_a_bad_precision_variable_at_start_up(tmp_path, monkeypatch, capsys):
    """$LUNGBURDEN_PRECISION (outside the YAML) is checked before the node starts, naming the variable."""
    from lungburden.cli import main
    from lungburden.exit_codes import EXIT_CONFIG

    assert EXIT_CONFIG == 78  # sysexits EX_CONFIG, for the node and the Orthanc plugin's worker alike
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUNGBURDEN_PRECISION", "half")
    assert main(["serve", "--check-config"]) == EXIT_CONFIG
    assert "$LUNGBURDEN_PRECISION must be one of auto, float32, bfloat16, got 'half'" in capsys.readouterr().err
    monkeypatch.setenv("LUNGBURDEN_PRECISION", "Float32")
    assert main(["serve", "--check-config"]) == 0
