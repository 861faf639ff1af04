"""Ticks during fine-tuning: every norm's range recorded while a real model trains (a plain loop,
a Hugging Face Trainer, Lightning when installed), read back after a killed writer, shown per
module, and used as the calibration of a real fp16 export."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ticknorm
from factories import Growing
from ticknorm import ExportOptions, Inputs, Precision, api
from ticknorm.base.errors import InputSpecError, MissingDependencyError, TicknormWarning, TicksError
from ticknorm.cli import main
from ticknorm.ticks import Recorder, read_ticks, summarize_ticks

# Growing's input in training: fed this row, its norm's input has absmax 7 * 4**step and mean of
# squares 20 * 16**step, so the mean of squares passes fp16's 65504 at step 3 and the absmax
# passes fp16 max / 4 at step 6 (7 * 4**6 = 28672).
ROW = torch.arange(1.0, 8.0)


class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 16)
        self.rms = nn.RMSNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.rms(self.mix(self.norm(self.proj(x)))))


def _train(model, recorder: Recorder, steps: int, grow: bool = False) -> None:
    """A plain AdamW loop with `recorder.step()` after each optimizer step; `grow` multiplies the
    planted gain by 4 after each step, the way a diverging fine-tune grows a residual stream."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    inputs = ROW.expand(4, 7) if grow else torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(inputs).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if grow:
            with torch.no_grad():
                model.gain.mul_(4.0)
        recorder.step()


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """The Growing model trained 7 steps with a tick every step (steps 0-6), and its fp32 export."""
    folder = tmp_path_factory.mktemp("grown")
    model = Growing()
    with Recorder(model, folder / "ticks.jsonl", every=1) as recorder:
        _train(model, recorder, 7, grow=True)
    model.eval()
    torch.save(model.state_dict(), folder / "grown.pt")
    feeds = {"x": np.random.default_rng(0).uniform(0, 1e-3, (2, 3, 7)).astype(np.float32)}  # fits fp16 at gain 4**7
    np.savez(folder / "feeds.npz", **feeds)
    api.export(model, feeds, folder / "grown.onnx", ExportOptions(exporter="torchscript"))
    return folder, model, feeds


def test_a_plain_loop_records_every_norm_at_each_tick_and_nothing_between(tmp_path):
    model, path = TwoNorms(), tmp_path / "ticks.jsonl"
    with Recorder(model, path, every=3) as recorder:
        assert model.norm._forward_hooks and model._forward_hooks  # step 0: armed for the first forward
        _train(model, recorder, 1)
        assert not model.norm._forward_hooks and not model._forward_hooks  # gone after that forward
        _train(model, recorder, 6)
    assert not model.rms._forward_hooks
    records = read_ticks(path)
    assert [(r["step"], r["module"]) for r in records] == [(s, m) for s in (0, 3, 6) for m in ("norm", "rms")]
    first = records[0]
    assert set(first) == {"step", "module"} | {f"{side}_{stat}" for side in ("input", "output") for stat in (
        "absmax", "mean", "var", "meansq_max", "fp16_overflow", "fp16_underflow", "bf16_overflow", "bf16_underflow")}
    assert first["output_mean"] == pytest.approx(0.0, abs=1e-6) and first["output_var"] == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():  # the step-0 record is what the untrained weights compute on that batch
        hidden = TwoNorms().proj(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    assert first["input_absmax"] == pytest.approx(hidden.abs().max().item(), rel=1e-6)
    assert first["input_meansq_max"] == pytest.approx(hidden.pow(2).mean(-1).max().item(), rel=1e-6)
    assert first["input_var"] == pytest.approx(hidden.double().var(unbiased=False).item(), rel=1e-5)


def test_a_norm_called_twice_in_one_forward_adds_up(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x) + self.norm(100.0 * x)

    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    with Recorder(Shared(), tmp_path / "t.jsonl") as recorder:
        recorder.model(x)
    (record,) = read_ticks(tmp_path / "t.jsonl")
    both = torch.cat([x, 100.0 * x]).double()
    assert record["input_absmax"] == 300.0 and record["input_meansq_max"] == pytest.approx(35000.0)
    assert record["input_mean"] == pytest.approx(both.mean().item()) and record["input_var"] == pytest.approx(
        both.var(unbiased=False).item())
    assert record["input_fp16_underflow"] == 0.0 and record["input_fp16_overflow"] == 0.0


def test_a_planted_norm_growing_past_fp16_is_flagged_at_its_step(grown):
    folder, _, _ = grown
    summary = summarize_ticks(read_ticks(folder / "ticks.jsonl"), "ticks.jsonl")
    (norm,) = summary.modules
    assert norm.module == "norm" and norm.steps == list(range(7))
    assert norm.values("input_absmax") == pytest.approx([7 * 4.0**s for s in range(7)])
    assert norm.first_absmax_past(summary.near_limit) == 6
    assert norm.overflow("fp16") == ("input mean of squares", 3, pytest.approx(20 * 16.0**6))
    assert norm.overflow("bf16") is None
    shown = CliRunner().invoke(main, ["ticks", "show", str(folder / "ticks.jsonl"), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)["modules"][0]
    assert (data["near_overflow_step"], data["overflow"]["step"], data["overflow"]["what"]) == (6, 3, "input mean of squares")


def test_ticks_show_prints_the_table_and_draws_the_plot(grown, tmp_path):
    folder, _, _ = grown
    done = CliRunner().invoke(main, ["ticks", "show", str(folder / "ticks.jsonl"), "--plot", str(tmp_path / "r.png"),
                                     "--headroom", "16"])
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == "ticks.jsonl: 1 modules, 7 ticks (steps 0-6)"
    row = next(line for line in lines if line.startswith("norm "))
    assert row.split()[:3] == ["norm", "7", "0-6"] and row.endswith(" 5   3 (input mean of squares)")  # 7*4**5 > 4094
    assert "1 module(s) approach fp16 overflow (absmax > 4094 = fp16 max / 16), first norm at step 5" in done.stdout
    assert "1 module(s) pass fp16's max 65504, first norm at step 3" in done.stdout
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {tmp_path / 'r.png'}" in done.stdout


def test_the_plot_names_ten_modules_and_counts_the_rest(tmp_path):
    records = [{"step": step, "module": f"layer.{n}.norm", "input_absmax": (n + 1) * 10.0**step, "output_absmax": 1.0}
               for step in range(5) for n in range(14)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    api.show_ticks(tmp_path / "many.jsonl", plot=tmp_path / "many.png")
    from matplotlib.image import imread

    assert imread(tmp_path / "many.png").shape[:2] == (600, 1000)


def test_a_killed_writer_loses_only_its_last_line(tmp_path):
    model, path = TwoNorms(), tmp_path / "ticks.jsonl"
    with Recorder(model, path, every=2) as recorder:
        _train(model, recorder, 3)  # ticks 0 and 2
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])  # killed mid-write: the last line is cut short, with no newline
    with pytest.warns(TicknormWarning, match=r"skipped 1 line\(s\) that are no tick \(line 4\)"):
        assert [(r["step"], r["module"]) for r in read_ticks(path)] == [(0, "norm"), (0, "rms"), (2, "norm")]
    with Recorder(model, path, every=2, first_step=3) as recorder:  # the resumed run appends on a fresh line
        _train(model, recorder, 1)
    with pytest.warns(TicknormWarning, match=r"\(line 4\)"):
        assert [r["step"] for r in read_ticks(path)] == [0, 0, 2, 3, 3]
    shown = CliRunner().invoke(main, ["ticks", "show", str(path)])
    assert shown.exit_code == 0 and shown.stderr.splitlines()[0].startswith(f"warning: {path}: skipped 1 line(s)")


def test_ticks_show_refuses_a_missing_or_corrupt_file_in_one_line(tmp_path):
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "other.jsonl").write_text('{"time": 1}\n{"time": 2}\n')
    for name, message in (("missing.jsonl", "ticks file not found"), ("binary.jsonl", "is not a ticks file (not text)"),
                          ("other.jsonl", "holds no ticks: no line is a JSON object with 'step' and 'module'")):
        done = CliRunner().invoke(main, ["ticks", "show", str(tmp_path / name)])
        assert done.exit_code == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.output
    bad_headroom = CliRunner().invoke(main, ["ticks", "show", str(tmp_path / "other.jsonl"), "--headroom", "0.5"])
    assert bad_headroom.exit_code == 2 and "--headroom" in bad_headroom.stderr


def test_bad_recorder_requests_are_one_clear_line(tmp_path):
    for every in (0, -5, 2.5):
        with pytest.raises(TicksError, match=r"every=.*: ticks come every N optimizer steps, N a whole number >= 1") as raised:
            Recorder(TwoNorms(), tmp_path / "t.jsonl", every=every)
        assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
    with pytest.raises(TicksError, match=r"TwoNorms has no module matching 'encoder\.\*' to record \(its modules: 'proj'"):
        Recorder(TwoNorms(), tmp_path / "t.jsonl", modules="encoder.*")
    assert [path for path, _ in Recorder(TwoNorms(), tmp_path / "t.jsonl", modules=nn.Linear).modules] == ["proj", "mix", "head"]
    assert [path for path, _ in Recorder(TwoNorms(), tmp_path / "t.jsonl", modules="*n*").modules] == ["norm"]
    assert not (tmp_path / "t.jsonl").exists()


def test_recorder_is_part_of_the_public_api():
    assert ticknorm.Recorder is Recorder and ticknorm.show_ticks is api.show_ticks


def test_a_hugging_face_trainer_records_with_the_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ticknorm.ticks.hf import TicksCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32, num_labels=2)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=generator), "labels": torch.tensor(n % 2)}
            for n in range(24)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[TicksCallback(tmp_path / "ticks.jsonl", every=2)])
    trainer.train()
    norms = [path for path, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    records = read_ticks(tmp_path / "ticks.jsonl")
    assert [(r["step"], r["module"]) for r in records] == [(s, m) for s in (0, 2, 4) for m in norms]
    assert len(norms) == 5 and all(not dict(model.named_modules())[m]._forward_hooks for m in norms)
    assert all(math.isfinite(r["input_absmax"]) and r["output_var"] > 0 for r in records)
    with pytest.raises(TicksError, match="every=0"):
        TicksCallback(tmp_path / "t.jsonl", every=0)


def test_a_lightning_trainer_records_with_the_callback(tmp_path):
    pytest.importorskip("lightning", reason="lightning is not installed: its callback (pip install "
                                            "'ticknorm[lightning]') is tested where it is")
    import lightning.pytorch as pl

    from ticknorm.ticks.lightning import TicksCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TwoNorms()

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()  # calls the submodule, not the LightningModule

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 8)), batch_size=4)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[TicksCallback(tmp_path / "ticks.jsonl", every=2)])
    trainer.fit(Module(), data)
    assert [(r["step"], r["module"]) for r in read_ticks(tmp_path / "ticks.jsonl")] == [
        (s, m) for s in (0, 2, 4) for m in ("net.norm", "net.rms")]


def test_the_lightning_adapter_names_its_extra_when_lightning_is_missing():
    try:
        import lightning  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pip install 'ticknorm\[lightning\]'"):
            import ticknorm.ticks.lightning  # noqa: F401
    else:
        pytest.skip("lightning is installed: its callback is tested by training with it")


def test_calibration_keeps_a_norm_that_overflowed_in_training_in_fp32(grown, tmp_path):
    folder, _, feeds = grown
    measured = api.convert(folder / "grown.onnx", tmp_path / "plain16.onnx", Precision("fp16"), Inputs(arrays=feeds))
    assert "norm" not in measured.precision.modules  # the export's inputs alone never show it
    calibrated = api.convert(folder / "grown.onnx", tmp_path / "cal16.onnx",
                             Precision("fp16", calibration=folder / "ticks.jsonl"), Inputs(arrays=feeds))
    island = next(i for i in calibrated.precision.islands if i.module == "norm")
    assert island.node == "/norm/LayerNormalization"
    assert island.reason == ("input mean of squares reached 3.355e+08 > fp16 max 65504 in training "
                             "(from step 3, --calibration ticks.jsonl)")
    written = onnx.load(str(tmp_path / "cal16.onnx"))
    assert Precision.of_graph(written).calibration == str(folder / "ticks.jsonl")
    assert calibrated.passed
    done = CliRunner().invoke(main, ["convert", str(folder / "grown.onnx"), "-o", str(tmp_path / "c.onnx"), "--precision",
                                     "fp16", "--input-file", str(folder / "feeds.npz"), "--calibration",
                                     str(folder / "ticks.jsonl")])
    assert done.exit_code == 0, done.output
    assert "norm [/norm/LayerNormalization]: input mean of squares reached 3.355e+08" in done.stdout


def test_export_takes_the_calibration_too(grown, tmp_path):
    folder, model, feeds = grown
    result = api.export(model, feeds, tmp_path / "e16.onnx", ExportOptions(
        exporter="torchscript", precision=Precision("fp16", calibration=folder / "ticks.jsonl")))
    assert [i.module for i in result.conversion.precision.islands if "--calibration" in i.reason] == ["norm"]


def test_a_calibration_from_another_model_is_refused_or_warned_about(grown, tmp_path):
    folder, _, _ = grown
    other = tmp_path / "other.jsonl"
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8))
    with Recorder(model, other) as recorder:
        _train(model, recorder, 1)
    command = ["convert", str(folder / "grown.onnx"), "-o", str(tmp_path / "x.onnx"), "--precision", "fp16", "--input-file",
               str(folder / "feeds.npz")]
    refused = CliRunner().invoke(main, [*command, "--calibration", str(other)])
    assert refused.exit_code == 2 and not (tmp_path / "x.onnx").exists()
    assert refused.stderr.splitlines()[-1] == ("error: --calibration other.jsonl: none of its 2 modules is in this model "
                                               "(it recorded 1, 3; this model's modules look like 'head'): was it "
                                               "recorded on another model?")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((folder / "ticks.jsonl").read_text() + json.dumps({"step": 0, "module": "encoder.ghost"}) + "\n")
    warned = CliRunner().invoke(main, [*command, "--calibration", str(mixed)])
    assert warned.exit_code == 0, warned.output
    assert ("warning: --calibration mixed.jsonl: 1 recorded module(s) are not in this model and are not used: "
            "encoder.ghost") in warned.stderr
    fp32 = CliRunner().invoke(main, ["export", "--model", "tests/factories.py:small", "--input", "x:2x8", "-o",
                                     str(tmp_path / "s.onnx"), "--calibration", str(mixed)])
    assert fp32.exit_code == 2 and "--calibration chooses fp32 islands of a low-precision graph" in fp32.stderr
    with pytest.raises(InputSpecError, match="give --precision fp16 or bf16"):
        Precision(calibration="ticks.jsonl")


def test_a_golden_bundle_keeps_the_training_ranges(grown, tmp_path):
    folder, _, _ = grown
    done = CliRunner().invoke(main, ["drift", "snapshot", str(folder / "grown.onnx"), "--model", "tests/factories.py:growing",
                                     "--checkpoint", str(folder / "grown.pt"), "--input", "x:2x3x7", "--calibration",
                                     str(folder / "ticks.jsonl"), "-o", str(tmp_path / "bundle")])
    assert done.exit_code == 0, done.output
    stored = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["calibration"]
    assert stored["file"] == str(folder / "ticks.jsonl") and list(stored["modules"]) == ["norm"]
    norm = stored["modules"]["norm"]
    assert (norm["ticks"], norm["steps"], norm["input_absmax"]) == (7, [0, 6], 28672.0)
    assert norm["input_meansq_max"] == pytest.approx(20 * 16.0**6) and 0 < norm["output_absmax"] < 10
    assert api.check(tmp_path / "bundle", folder / "grown.onnx").passed  # a bundle with calibration loads as before
