"""Named task suites: lm-eval task name -> shots."""

from .offline import OFFLINE_TASKS

SUITES: dict[str, dict[str, int]] = {
    # MoH's LLaMA3-8B table (Jin et al. 2024, Table 4) with its shot counts
    "moh14": {
        "mmlu": 5, "ceval-valid": 5, "cmmlu": 5, "gsm8k": 8, "truthfulqa_mc2": 0, "hellaswag": 10, "logiqa": 0,
        "boolq": 32, "lambada_openai": 0, "sciq": 0, "piqa": 0, "winogrande": 0, "nq_open": 32, "arc_challenge": 25,
    },
    # the six commonsense tasks MHA2MLA (Ji et al. 2025) and TransMLA report, zero-shot
    "commonsense": {"arc_easy": 0, "arc_challenge": 0, "hellaswag": 0, "openbookqa": 0, "piqa": 0, "winogrande": 0},
    # built from real text that ships with rehead: runs with no hub access
    "offline": {name: 0 for name in OFFLINE_TASKS},
}
