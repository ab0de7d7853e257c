"""The COSMOS and SIMLA models on timm and open_clip, and conversions from and to upstream's weight layouts."""
from .convert import (config_for_weights, config_name_for_weights, convert_upstream_state_dict, detect_layout,
                      export_upstream_state_dict, load_open_clip_weights, load_weights, state_dict_from_checkpoint,
                      to_cosmos_state_dict, to_upstream, upstream_key, upstream_weight_decay)
from .cosmos import CONFIGS, CosmosConfig, CosmosModel, Tokenizer, config, trim_to_longest
from .simla import SIMLA_CONFIGS, SIMLAModel, SIMLAModelConfig, simla_config

__all__ = ["CONFIGS", "CosmosConfig", "CosmosModel", "SIMLA_CONFIGS", "SIMLAModel", "SIMLAModelConfig", "Tokenizer",
           "config", "config_for_weights", "config_name_for_weights", "convert_upstream_state_dict", "detect_layout",
           "export_upstream_state_dict", "load_open_clip_weights", "load_weights", "simla_config",
           "state_dict_from_checkpoint", "to_cosmos_state_dict", "to_upstream", "trim_to_longest", "upstream_key",
           "upstream_weight_decay"]
