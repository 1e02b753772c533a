import time

import torch

from anybit.methods import build_method
from anybit.pipeline import quantize_model
from anybit.timing import recording, stage, timed


@timed("inner")
def _inner():
    time.sleep(0.01)


def test_stages_nest_by_path_and_sum_repeats():
    timings = {}
    with recording(timings):
        with stage("outer"):
            _inner()
            _inner()
        _inner()
    assert set(timings) == {"outer", "outer/inner", "inner"}
    assert timings["outer/inner"] >= 0.02 and timings["outer"] >= timings["outer/inner"]
    assert 0.01 <= timings["inner"] < timings["outer"]


def test_nothing_is_recorded_outside_a_recording():
    timings = {}
    _inner()
    with recording(timings):
        pass
    assert timings == {}


def test_quantize_model_reports_method_stages(llama):
    samples = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(llama, samples, build_method("skim", 3.25), progress=False)
    for key in ("calibration_forward", "statistics", "quantize", "quantize/kmeans", "quantize/lfull",
                "quantize/allocation", "quantize/gptq"):
        assert result.timings[key] > 0, key
    assert result.timings["quantize"] >= result.timings["quantize/kmeans"] + result.timings["quantize/gptq"]
