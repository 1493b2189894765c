"""The head layouts rehead writes, as transformers models, and their registry.

Each layout is a ``configuration_*.py`` + ``modeling_*.py`` pair that imports only torch and
transformers, because the pair (with the sibling files its modeling file imports) is copied into
every checkpoint of that layout. Everything rehead says about a layout comes from the pair: the
config class describes it (``layout_summary``, ``kv_heads_per_layer``, ``layout_facts``,
``card_lines``), the model class knows what a conversion added (``_rehead_new_parameters``) and
its own loss (``layout_loss``). A layout is added with one ``register`` line. An output format that
transformers lacks is registered the same way: ``deci`` (DeciLM, ``nemotron-nas``), which DHA exports to.
"""

import re
import sys
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

SIBLING_IMPORT = re.compile(r"^from \.(\w+) import", re.MULTILINE)


def _file(cls: type) -> Path:
    return Path(sys.modules[cls.__module__].__file__)


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
        """The files a checkpoint of this layout carries: the configuration and modeling files, and the
        sibling modules they import (``from .modeling_stack import ...``), transitively."""
        files = [_file(self.config_class), _file(self.model_class)]
        for path in files:  # grows while it is read: the siblings' own siblings come too
            for name in SIBLING_IMPORT.findall(path.read_text()):
                if path.with_name(f"{name}.py") not in files:
                    files.append(path.with_name(f"{name}.py"))
        return files

    @property
    def auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": f"{_file(self.config_class).stem}.{self.config_class.__name__}",
            "AutoModelForCausalLM": f"{_file(self.model_class).stem}.{self.model_class.__name__}",
        }


LAYOUTS: dict[str, Layout] = {}
BY_MODEL_TYPE: dict[str, Layout] = {}


def register(name: str, config_class: type, model_class: type) -> Layout:
    """Makes a layout known to rehead (inspect, writer, card, tune) and to transformers' Auto classes."""
    layout = Layout(name, config_class, model_class)
    LAYOUTS[name] = BY_MODEL_TYPE[layout.model_type] = layout
    AutoConfig.register(layout.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return layout


def layout_config(config: dict):
    """The layout's config object for a config.json dict, or None for a stock checkpoint."""
    layout = BY_MODEL_TYPE.get(config.get("model_type"))
    if layout is None:
        return None
    values = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")}
    return layout.config_class(**values)


register("moh", MoHConfig, MoHForCausalLM)
register("dha", DHAConfig, DHAForCausalLM)
register("gda", GDAConfig, GDAForCausalLM)
register("deci", DeciLMConfig, DeciLMForCausalLM)
