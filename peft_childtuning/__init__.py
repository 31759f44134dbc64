"""Child-Tuning (Xu et al., EMNLP 2021) as a PEFT tuner. Importing this package registers it with peft."""

from peft.utils import register_peft_method

from .config import ChildTuningConfig
from .layer import ChildTuningLayer, ChildTuningModule
from .model import ChildTuningModel
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
]

register_peft_method(name="childtuning", config_cls=ChildTuningConfig, model_cls=ChildTuningModel, prefix="childtuning_")
