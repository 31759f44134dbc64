"""Child-Tuning (Xu et al., EMNLP 2021) as a PEFT tuner. Importing this package registers it with peft."""

from peft.utils import register_peft_method

from .config import ChildTuningConfig
from .layer import ChildTuningLayer, ChildTuningModule
from .model import ChildTuningModel
from .hub import enable_peft_push_to_hub, push_to_hub
from .registration import CHILDTUNING_PEFT_TYPE
from .trainer import ChildTuningCallback, prepare_child_network

__version__ = "0.1.0"
__all__ = [
    "CHILDTUNING_PEFT_TYPE",
    "ChildTuningCallback",
    "ChildTuningConfig",
    "ChildTuningLayer",
    "ChildTuningModel",
    "ChildTuningModule",
    "prepare_child_network",
    "push_to_hub",
]

register_peft_method(name="childtuning", config_cls=ChildTuningConfig, model_cls=ChildTuningModel, prefix="childtuning_")
# PeftModel.push_to_hub would upload transformers' template card over ours: for Child-Tuning adapters (only) it
# uploads the adapter with our model card in one commit instead
enable_peft_push_to_hub()
