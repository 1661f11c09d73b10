"""The Large Vision Model: a LLaMA decoder over visual tokens, its trainer, evaluation and prompting.

    uvd train recipes/train/tiny.yaml    uvd eval OUT --data RUN    uvd prompt OUT --data RUN
"""
from uvd.model.config import BOS_ID, EOS_ID, MODEL_SIZES, PAD_ID, VOCAB_SIZE, ModelConfig, TrainConfig, load_train_config
from uvd.model.llama import LLaMA

__all__ = ["BOS_ID", "EOS_ID", "MODEL_SIZES", "PAD_ID", "VOCAB_SIZE", "ModelConfig", "TrainConfig", "LLaMA",
           "load_train_config"]
