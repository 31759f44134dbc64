"""Adds Child-Tuning to peft's closed `PeftType` enum, so that peft's own machinery treats it as a built-in method.

peft only registers methods whose name is already a `PeftType` member, and its save, load and model-card code reads
`peft_type.value`: a plain string in its mappings breaks `load_adapter` and `get_model_status`.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "CHILDTUNING"


def _extend_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, creating the member the way `enum` itself does for declared members."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # a class attribute first (EnumType.__setattr__ refuses to rebind names already in the member map), then the maps
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


CHILDTUNING_PEFT_TYPE = _extend_peft_type(PEFT_TYPE_NAME)
