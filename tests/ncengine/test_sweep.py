"""Sweep specs: expansion, bundling, presets, and bad specs rejected with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ncengine.config import MAX_EPOCHS, RunConfig
from ncengine.errors import InputError
from ncengine.sweep import SweepSpec, bundles, expand, preset


def _locs(exc: ValidationError) -> list[str]:
    return [".".join(map(str, e["loc"])) for e in exc.errors()]


def test_expand_cartesian_product_seeds_innermost():
    spec = {"grid": {"model.batch_norm": ["affine", "none"], "optim.weight_decay": [1e-4, 1e-3, 1e-2]},
            "seeds": [0, 1]}
    cfgs = expand(spec)
    assert len(cfgs) == 2 * 3 * 2
    got = [(c.model.batch_norm, c.optim.weight_decay, c.seed) for c in cfgs]
    want = [(bn, wd, s) for bn in ["affine", "none"] for wd in [1e-4, 1e-3, 1e-2] for s in [0, 1]]
    assert got == want
    assert all(c.model.depth == 6 for c in cfgs)  # base defaults untouched


def test_config_json_roundtrip():
    c = expand({"grid": {"schedule.epochs": [7]}})[0]
    assert RunConfig.model_validate(c.model_dump(mode="json")) == c


def test_unknown_key_named():
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"grid": {"optim.wieght_decay": [1e-3]}})
    assert _locs(e.value) == ["grid"]
    assert "optim.wieght_decay" in str(e.value)
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"grid": {"optim": [1]}})
    assert "section" in str(e.value)


def test_empty_grid_list_named():
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"grid": {"optim.weight_decay": []}})
    assert _locs(e.value) == ["grid"] and "empty" in str(e.value)


def test_wrong_type_in_grid_named_with_index():
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"grid": {"optim.weight_decay": [1e-3, "lots"]}})
    assert "grid.optim.weight_decay[1]" in str(e.value) and "optim.weight_decay" in str(e.value)
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"grid": {"model.batch_norm": ["group"]}})
    assert "grid.model.batch_norm[0]" in str(e.value)


def test_bad_base_and_seeds_named():
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"base": {"optim": {"lr": "fast"}}})
    assert _locs(e.value) == ["base.optim.lr"]
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"seeds": "zero"})
    assert _locs(e.value) == ["seeds"]
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"seeds": []})
    assert _locs(e.value) == ["seeds"]
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate({"surprise": 1})
    assert _locs(e.value) == ["surprise"]


def test_hostile_specs_refused():
    with pytest.raises(ValidationError) as e:
        RunConfig.model_validate({"schedule": {"epochs": MAX_EPOCHS + 1}})
    assert _locs(e.value) == ["schedule.epochs"]
    with pytest.raises(ValidationError) as e:
        RunConfig.model_validate({"model": {"width": 10**7}})
    assert _locs(e.value) == ["model.width"]
    with pytest.raises(ValidationError) as e:
        RunConfig.model_validate({"data": {"n": 10**9}})
    assert _locs(e.value) == ["data.n"]
    with pytest.raises(ValidationError):  # too many runs
        SweepSpec.model_validate({"grid": {"optim.lr": [0.1] * 100, "optim.weight_decay": [0.1] * 100}})
    with pytest.raises(ValidationError) as e:
        RunConfig.model_validate({"model": {"depth": 1}})
    assert _locs(e.value) == ["model.depth"]


def test_presets():
    cfgs = expand(preset("thesis-fig3.1"))
    assert len(cfgs) == 21
    assert {c.model.batch_norm for c in cfgs} == {"affine", "non_affine", "none"}
    assert sorted({c.optim.weight_decay for c in cfgs}) == [1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 7e-3, 1e-2]
    c = cfgs[0]
    assert (c.model.depth, c.model.width, c.data.n, c.optim.batch_size, c.schedule.epochs) == (6, 256, 10000, 128, 300)
    assert (c.optim.lr, c.optim.momentum) == (0.0679, 0.9)
    c33 = expand(preset("thesis-fig3.3", scale="small"))
    assert len(c33) == 7 and all(c.model.depth == 15 and c.model.batch_norm == "affine" for c in c33)
    assert c33[0].measure.layers == "all" and c33[0].schedule.epochs < 300
    with pytest.raises(InputError) as e:
        preset("thesis-fig9")
    assert e.value.field == "preset"


def test_bundles():
    cfgs = expand(preset("thesis-fig3.1", scale="small"))
    assert [len(b) for b in bundles(cfgs)] == [21]
    assert [len(b) for b in bundles(cfgs, max_bundle_size=8)] == [8, 8, 5]
    mixed = expand({"grid": {"model.depth": [3, 4], "optim.lr": [0.1, 0.2]}, "seeds": [0, 1]})
    bs = bundles(mixed)
    assert [len(b) for b in bs] == [4, 4]
    assert all(len({c.model.depth for c in b}) == 1 for b in bs)
    assert sorted(id(c) for b in bs for c in b) == sorted(id(c) for c in mixed)
    other_data = expand({"grid": {"data.seed": [0, 1]}})
    assert len(bundles(other_data)) == 2
