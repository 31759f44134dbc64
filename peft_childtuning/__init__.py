"""Child-Tuning (Xu et al., EMNLP 2021) as a PEFT tuner. Importing this package registers it with peft."""

from peft.utils import register_peft_method

from .config import ChildTuningConfig
from .layer import ChildTuningLayer, ChildTuningModule
from .model import ChildTuningModel
from .registration import CHILDTUNING_PEFT_TYPE

__version__ = "0.1.0"
__all__ = ["CHILDTUNING_PEFT_TYPE", "ChildTuningConfig", "ChildTuningLayer", "ChildTuningModel", "ChildTuningModule"]

register_peft_method(name="childtuning", config_cls=ChildTuningConfig, model_cls=ChildTuningModel, prefix="childtuning_")
