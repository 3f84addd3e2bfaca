"""Training progress: every method reports per epoch / grid chunk / region / template family
through its ``progress`` callback without changing the trained numbers, and a model asset's run
log (Dagster's event log) holds those lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest

from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets

#: Per method: tiny training options (seconds each) and a line its progress must contain.
TINY: dict[str, tuple[dict[str, Any], str]] = {
    "thecannon": ({"n_train": 150, "seed": 5, "regions": "none", "order": 1}, "region 1/1"),
    "thepayne": ({"n_train": 300, "hidden": 16, "epochs": 60, "n_components": 16, "n_calibration": 20},
                 "epoch 60/60: train rms"),
    "ferre": ({"teff_step": 500.0, "logg_step": 2.5, "metals_min": -1.0, "metals_step": 0.5, "alpha_min": 0.0,
               "alpha_max": 0.25, "n_validation": 0}, "grid: 96/96 nodes"),
    "apogeenet": ({"n_train": 60, "epochs": 2}, "epoch 2/2: train loss"),
}
#: Model asset of each method.
MODEL_ASSETS = {"thecannon": "thecannon_model", "thepayne": "thepayne_model", "ferre": "ferre_grid",
                "apogeenet": "apogeenet_model"}


def numeric_arrays(model: Any, path: Path) -> dict[str, np.ndarray]:
    """The numeric arrays of a model file (string arrays hold metadata such as timings)."""
    model.write(path)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if data[k].dtype.kind in "biuf"}


@pytest.mark.parametrize("method", sorted(TINY))
def test_progress_lines_do_not_change_the_model(method: str, tmp_path: Path) -> None:
    import importlib

    module = importlib.import_module(f"astra_dagster.methods.{method}")
    options, expected = TINY[method]
    lines: list[str] = []
    reported = module.train_model(**options, progress=lines.append)
    silent = module.train_model(**options)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith(f"{method}: ") and line.endswith(" s]") for line in lines), lines
    a, b = numeric_arrays(reported, tmp_path / "a.npz"), numeric_arrays(silent, tmp_path / "b.npz")
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_doppler_template_progress() -> None:
    from astra_dagster.methods.doppler import train_generator_emulators

    lines: list[str] = []
    train_generator_emulators(400, 0, 5, cache=False, progress=lines.append)
    assert [line.split(" [")[0] for line in lines] == [
        "doppler_templates: family 1/2 generator-3000-4200 trained",
        "doppler_templates: family 2/2 generator-3850-7000 trained",
        "doppler_templates: error floors calibrated"]


@pytest.mark.slow
def test_model_assets_log_their_progress(clean_db: str) -> None:
    configs = {MODEL_ASSETS[m]: {k: v for k, v in options.items() if k != "n_calibration"}
               for m, (options, _) in TINY.items()}
    configs["doppler_templates"] = {"n_train": 400, "n_hot": 0, "seed": 5}
    with dg.instance_for_test() as instance:
        result = materialize_assets(defs, [dg.AssetKey(k) for k in configs], instance=instance,
                                    log_level="WARNING",
                                    run_config={"ops": {k: {"config": c} for k, c in configs.items()}})
        assert result.success
        messages = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
    for method, (_, expected) in TINY.items():
        assert any(m.startswith(f"{method}: ") and expected in m for m in messages), (method, messages)
    assert any(m.startswith("doppler_templates: ") for m in messages), messages
