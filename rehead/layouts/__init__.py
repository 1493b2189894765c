"""The head layouts rehead writes, as transformers models.

Each layout is a ``configuration_*.py`` + ``modeling_*.py`` pair that imports only torch and
transformers, because the pair is copied into every checkpoint of that layout. An output format
that transformers lacks is one too: ``deci`` (DeciLM, ``nemotron-nas``), which DHA exports to.
"""

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_deci import DeciLMConfig
from .configuration_dha import DHAConfig
from .configuration_gda import GDAConfig
from .configuration_moh import MoHConfig
from .modeling_deci import DeciLMForCausalLM
from .modeling_dha import DHAForCausalLM
from .modeling_gda import GDAForCausalLM
from .modeling_moh import MoHForCausalLM

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Layout:
    name: str
    config_class: type
    model_class: type

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def files(self) -> list[Path]:
        return [HERE / f"configuration_{self.name}.py", HERE / f"modeling_{self.name}.py", HERE / "modeling_stack.py"]

    @property
    def auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": f"configuration_{self.name}.{self.config_class.__name__}",
            "AutoModelForCausalLM": f"modeling_{self.name}.{self.model_class.__name__}",
        }


LAYOUTS = {
    layout.name: layout
    for layout in [
        Layout("moh", MoHConfig, MoHForCausalLM),
        Layout("dha", DHAConfig, DHAForCausalLM),
        Layout("gda", GDAConfig, GDAForCausalLM),
        Layout("deci", DeciLMConfig, DeciLMForCausalLM),
    ]
}
BY_MODEL_TYPE = {layout.model_type: layout for layout in LAYOUTS.values()}


def register_auto_classes() -> None:
    for layout in LAYOUTS.values():
        AutoConfig.register(layout.model_type, layout.config_class, exist_ok=True)
        AutoModelForCausalLM.register(layout.config_class, layout.model_class, exist_ok=True)
