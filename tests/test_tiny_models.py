"""The tiny models: every model the tiny configs name is built, the blend included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

from limits_ray.tiny_models import BLEND_WEIGHT

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_the_blend_is_the_weighted_mean_of_the_two_policies(tiny_models):
    base, other, blend = (load_file(path / "model.safetensors") for path in
                          (tiny_models.policy, tiny_models.policy_b, tiny_models.policy_blend))
    assert set(blend) == set(base)
    for name in base:
        np.testing.assert_allclose(blend[name], (1 - BLEND_WEIGHT) * base[name] + BLEND_WEIGHT * other[name], rtol=1e-6, atol=1e-7)
    assert (tiny_models.policy_blend / "tokenizer.json").is_file()


def test_every_model_of_the_tiny_configs_is_built(tiny_models):
    built = {path.name for path in tiny_models.root.iterdir() if path.is_dir()}
    for name in ("tiny.yaml", "tiny_policies.yaml", "tiny_nightly.yaml"):
        text = yaml.safe_load((CONFIGS / name).read_text())
        models = [text["generation"]["model"], *(reward.get("model", "") for reward in text["rewards"]),
                  *(policy["model"] for policy in text.get("policies", []))]
        for model in filter(None, models):
            assert model.startswith("runs/tiny-models/") and model.removeprefix("runs/tiny-models/") in built, (name, model)
