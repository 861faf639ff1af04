import ml_dtypes
import numpy as np
import pytest

from ticknorm.base.errors import InputSpecError
from ticknorm.base.inputs import Dim, feeds_from_specs, load_npz, parse_input_spec


def test_spec_with_named_dynamic_axes_dtype_and_range():
    spec = parse_input_spec("input_ids:batch=2xmax_len=16:int64:0..30522")
    assert spec.dims == (Dim(2, "batch"), Dim(16, "max_len"))
    assert spec.dynamic_axes == {0: "batch", 1: "max_len"}
    assert (spec.dtype, spec.low, spec.high) == (np.dtype(np.int64), 0, 30522)
    values = feeds_from_specs([spec], seed=1)["input_ids"]
    assert values.shape == (2, 16) and values.min() >= 0 and values.max() < 30522 and len(np.unique(values)) > 16


def test_defaults_and_dtypes():
    feeds = feeds_from_specs([parse_input_spec(s) for s in ("x:1x3x4x4", "m:2x5:bool", "h:3:bf16", "ids:2x3:int32")])
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (1, 3, 4, 4)
    assert feeds["m"].dtype == np.bool_
    assert feeds["h"].dtype == ml_dtypes.bfloat16
    assert set(np.unique(feeds["ids"])) <= {0, 1}
    assert np.array_equal(feeds_from_specs([parse_input_spec("x:4")], 7)["x"], feeds_from_specs([parse_input_spec("x:4")], 7)["x"])


@pytest.mark.parametrize("text, match", [
    ("x", "expected NAME:DIMS"),
    ("x:2xa", "dim 'a' is not SIZE or NAME=SIZE"),
    ("x:2:complex7", "unknown dtype 'complex7'"),
    ("x:2:int64:9..1", "is empty"),
    ("x:2:int64:nope", "is not LOW..HIGH"),
    (":2", "expected NAME:DIMS"),
])
def test_bad_specs(text, match):
    with pytest.raises(InputSpecError, match=match):
        parse_input_spec(text)


def test_duplicate_names_and_bad_npz(tmp_path):
    with pytest.raises(InputSpecError, match="given more than once"):
        feeds_from_specs([parse_input_spec("x:2"), parse_input_spec("x:3")])
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(InputSpecError, match="not a readable .npz"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(InputSpecError, match="input file not found"):
        load_npz(tmp_path / "none.npz")


def test_token_ids_span_the_vocabulary_of_the_model(tmp_path):
    from ticknorm import ExportOptions, Inputs, api
    from ticknorm.base.inputs import index_ranges

    path = tmp_path / "m.onnx"
    api.export("examples/tiny_transformer.py:build", Inputs(("input_ids:2x16:int64",)), path, ExportOptions(exporter="torchscript"))
    import onnx

    model = onnx.load(str(path))
    assert index_ranges(model) == {"input_ids": 1000}
    feeds, _ = Inputs(("input_ids:4x64:int64",)).feeds(model)
    assert feeds["input_ids"].max() > 500 and feeds["input_ids"].max() < 1000
    fixed, _ = Inputs(("input_ids:4x64:int64:0..3",)).feeds(model)
    assert fixed["input_ids"].max() <= 2


@pytest.mark.parametrize("text, match", [
    ("x:2:int64:0..0.5", "whole numbers"), ("x:2:uint8:-5..5", "whole numbers"), ("x:2:int64:-..5", "not LOW..HIGH"),
])
def test_ranges_that_do_not_fit_the_dtype(text, match):
    with pytest.raises(InputSpecError, match=match):
        parse_input_spec(text)


def test_a_single_array_npy_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(InputSpecError, match="one array, not named inputs"):
        load_npz(tmp_path / "x.npy")


def test_polygraphy_inputs_and_bundle_folders_give_every_iteration(tmp_path):
    from polygraphy.json import save_json

    iterations = [{"x": np.full((2, 3), value, np.float32)} for value in (1.0, 2.0, 3.0)]
    save_json(iterations, str(tmp_path / "inputs.json"))  # what `polygraphy run --save-inputs` writes
    from ticknorm.base.inputs import Inputs, load_feed_sets

    for source in (tmp_path / "inputs.json", tmp_path):  # the file, or the folder of a bundle holding it
        loaded = load_feed_sets(source)
        assert [float(feeds["x"][0, 0]) for feeds in loaded] == [1.0, 2.0, 3.0]
    assert len(Inputs(file=str(tmp_path / "inputs.json")).feed_sets()) == 3
    assert float(Inputs(file=str(tmp_path)).feeds()[0]["x"][0, 0]) == 1.0  # an export's example: the first
    (tmp_path / "foreign.json").write_text('{"not": "inputs"}')
    with pytest.raises(InputSpecError, match="holds no Polygraphy inputs"):
        load_feed_sets(tmp_path / "foreign.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InputSpecError, match="is not a readable Polygraphy inputs file"):
        load_feed_sets(tmp_path / "broken.json")
    with pytest.raises(InputSpecError, match="input file not found"):
        load_feed_sets(tmp_path / "none.json")
