"""transformers integration: ``from_pretrained`` builds ``AnybitLinear`` modules for anybit checkpoints.

``register()`` (run by ``import anybit``) adds the ``quant_method: "anybit"`` config and
quantizer to transformers' registries. Before weights load, the quantizer swaps each listed
``nn.Linear`` of the meta-device model for an ``AnybitLinear`` with the spec's buffer shapes, then
checks the checkpoint against the model so that a damaged one fails with one ``AnybitError``.
"""

from __future__ import annotations

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from anybit.errors import AnybitError
from anybit.formats.checkpoint import QUANT_METHOD, WHERE, check_model_tensors, check_quantization_config
from anybit.nn.linear import AnybitLinear


class AnybitConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config``: format version, module specs, unquantized modules."""

    def __init__(self, format_version=None, modules=None, unquantized_modules=None, **info):
        info.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = modules
        self.unquantized_modules = unquantized_modules if unquantized_modules is not None else []
        self.__dict__.update(info)  # method, settings: kept so that saving again writes them back
        self.specs = check_quantization_config(self.to_dict())

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "specs"}


class AnybitHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints only

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        for name, spec in self.quantization_config.specs.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise AnybitError(f"{WHERE}.modules names {name}, which {type(model).__name__} does not have") from None
            if not isinstance(linear, nn.Linear) or linear.weight.shape != (spec.out_features, spec.in_features):
                raise AnybitError(f"{WHERE}.modules[{name!r}] is a {spec.out_features}x{spec.in_features} linear; "
                                  f"the model's {name} is {linear}")
            if (linear.bias is not None) != spec.bias:
                raise AnybitError(f"{WHERE}.modules[{name!r}].bias is {spec.bias}, the model's linear disagrees")
            model.set_submodule(name, AnybitLinear(spec, device=linear.weight.device, dtype=linear.weight.dtype))
        if checkpoint_files:
            check_model_tensors(model, checkpoint_files, self.quantization_config.specs)

    def is_serializable(self):
        return True  # buffers are the format: save_pretrained writes an anybit checkpoint again

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # AnybitLinear is one custom op under torch.compile (anybit.nn.compiled)


def register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(AnybitConfig)
        register_quantizer(QUANT_METHOD)(AnybitHfQuantizer)
