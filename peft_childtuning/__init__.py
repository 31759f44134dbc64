"""Child-Tuning (Xu et al., EMNLP 2021) as a PEFT tuner. Importing this package registers it with peft.

An installed package imports itself when peft is imported (see ``peft_childtuning_autoload``), so that saved and
shared adapters load with peft alone.
"""

from peft.utils import register_peft_method

from .config import ChildTuningConfig
from .layer import ChildTuningLayer, ChildTuningModule
from .model import ChildTuningModel, detect_child_network
from .helpers import install as _install_helpers
from .hub import enable_peft_model_card, enable_peft_push_to_hub, push_to_hub
from .loading import install as _install_loaders
from .registration import CHILDTUNING_PEFT_TYPE
from .selection import select_child_network, shira_budget, shira_mask_fn
from .sparse_format import AdapterFormatError
from .trainer import ChildTuningCallback, prepare_child_network

__version__ = "0.1.0"
__all__ = [
    "AdapterFormatError",
    "CHILDTUNING_PEFT_TYPE",
    "ChildTuningCallback",
    "ChildTuningConfig",
    "ChildTuningLayer",
    "ChildTuningModel",
    "ChildTuningModule",
    "detect_child_network",
    "prepare_child_network",
    "push_to_hub",
    "select_child_network",
    "shira_budget",
    "shira_mask_fn",
]

register_peft_method(name="childtuning", config_cls=ChildTuningConfig, model_cls=ChildTuningModel, prefix="childtuning_")
# PeftModel.push_to_hub would upload transformers' template card over ours: for Child-Tuning adapters (only) it
# uploads the adapter with our model card in one commit instead
enable_peft_push_to_hub()
# the card that peft writes (save_pretrained, and transformers' Trainer.push_to_hub over its own template) gets our
# tags and loading note
enable_peft_model_card()
# every loader of a saved adapter (peft's, transformers') goes through one transaction: checked, then loaded and
# merged, or the model left exactly as it was (see `loading`)
_install_loaders()
# peft's helpers and status functions: Child-Tuning's answers where peft's would be wrong or obscure (see `helpers`)
_install_helpers()
