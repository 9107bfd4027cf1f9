"""--precision auto: bf16 only where the hardware computes it natively (alignkit.precision)."""

from __future__ import annotations

import pytest
import yaml

from alignkit import cli, precision
from alignkit.config import EvalConfig, ModelConfig, PipelineConfig


@pytest.fixture
def prefs(sample_prefs, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return sample_prefs(4)


@pytest.fixture
def hardware(monkeypatch):
    """Set what native_bf16 answers; resets the once-per-process warning."""
    monkeypatch.setattr(precision, "_warned", False)

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "native_bf16", lambda: native)

    return set_native


@pytest.mark.parametrize("native, resolved", [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_by_hardware_and_explicit_values_stay(hardware, native, resolved):
    hardware(native)
    assert ModelConfig(model="m", precision="auto").precision == resolved
    for explicit in ("fp32", "bf16"):
        assert ModelConfig(model="m", precision=explicit).precision == explicit
    # the sampling commands default to auto, resolved when the config is built
    assert PipelineConfig().precision == resolved
    assert EvalConfig.model_fields["precision"].default == "auto"


def test_training_commands_keep_fp32_by_default(hardware):
    hardware(True)
    assert ModelConfig(model="m").precision == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp32.*bf16.*auto"):
        ModelConfig(model="m", precision="fp16")


def test_cpu_flags_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    real_path = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    assert {"avx2", "avx512_bf16", "amx_tile"} <= precision._cpuinfo_flags()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert "bf16" in precision._cpuinfo_flags()


def test_explicit_bf16_warns_once_where_emulated(hardware, capsys):
    hardware(False)
    precision.warn_if_emulated("fp32")
    assert capsys.readouterr().err == ""
    precision.warn_if_emulated("bf16")
    precision.warn_if_emulated("bf16")
    err = capsys.readouterr().err
    assert err.count("warning: --precision bf16 on a CPU without native bf16") == 1


def test_explicit_bf16_is_silent_where_native(hardware, capsys):
    hardware(True)
    precision.warn_if_emulated("bf16")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("native, resolved", [(True, "bf16"), (False, "fp32")])
def test_a_run_records_the_resolved_precision(hardware, native, resolved, tiny_model_dir, prefs, tmp_path, capsys):
    """config.yaml holds what ran, never "auto"; auto never prints the emulation warning."""
    hardware(native)
    out = tmp_path / "run"
    assert cli.main(["dpo", "--model", str(tiny_model_dir), "--data", str(prefs), "--output-dir", str(out),
                     "--batch-size", "2", "--max-steps", "1", "--no-progress", "--precision", "auto"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["precision"] == resolved
    assert "warning" not in capsys.readouterr().err
