"""pytest plugin (entry point `ticknorm`): the `ticknorm_drift` fixture checks a model against a
golden bundle inside a user's own test suite.

    def test_model_has_not_drifted(ticknorm_drift):
        ticknorm_drift("golden/bert", "model.onnx")            # ONNX Runtime CPU
        ticknorm_drift("golden/bert", "model.onnx", runtime="trt-fp16")
"""

import pytest


@pytest.fixture
def ticknorm_drift():
    from ticknorm.base.onnx_io import load_onnx
    from ticknorm.validate.drift import check_bundle

    def verify(bundle, model_path, runtime: str = "ort", allow_model_change: bool = False):
        report = check_bundle(bundle, load_onnx(model_path), runtime, allow_model_change)
        if not report.passed:
            pytest.fail(f"{model_path} drifted from {bundle}:\n{report.text()}", pytrace=False)
        return report

    return verify
