"""The COSMOS and SIMLA models on timm and open_clip, and the open_clip weight converter."""
from .convert import convert_open_clip_state_dict, load_open_clip_weights, state_dict_from_checkpoint
from .cosmos import CONFIGS, CosmosConfig, CosmosModel, Tokenizer, config, trim_to_longest
from .simla import SIMLA_CONFIGS, SIMLAModel, SIMLAModelConfig, simla_config

__all__ = ["CONFIGS", "CosmosConfig", "CosmosModel", "SIMLA_CONFIGS", "SIMLAModel", "SIMLAModelConfig", "Tokenizer", "config", "convert_open_clip_state_dict",
           "load_open_clip_weights", "simla_config", "state_dict_from_checkpoint",
           "trim_to_longest"]
