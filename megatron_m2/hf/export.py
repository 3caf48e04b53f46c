"""Write a self-contained Hugging Face folder: config.json with auto_map, (sharded) safetensors, remote code,
tokenizer.model and preprocessor_config.json."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.hf.modeling_m2 import M2EncoderModel
from megatron_m2.hf.processing_m2 import TOKENIZER_FILE, M2ImageProcessor, M2Processor, M2Tokenizer

HF_DIR = Path(__file__).parent
REMOTE_CODE = ("configuration_m2.py", "modeling_m2.py", "processing_m2.py")
AUTO_MAP = {"AutoConfig": "configuration_m2.M2EncoderConfig", "AutoModel": "modeling_m2.M2EncoderModel"}


def write_remote_code(folder: Union[str, Path], config: M2EncoderConfig) -> None:
    """Copy the modeling code and point auto_map at it, so AutoModel works without megatron_m2 installed."""
    folder = Path(folder)
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, folder / name)
    config.auto_map = dict(AUTO_MAP)


def write_processor(folder: Union[str, Path], config: M2EncoderConfig,
                    tokenizer_model: Optional[Union[str, Path]] = None) -> None:
    folder = Path(folder)
    tokenizer = None
    if tokenizer_model is not None:
        if not Path(tokenizer_model).is_file():
            raise FileNotFoundError(f"--tokenizer-model {tokenizer_model} does not exist")
        shutil.copyfile(tokenizer_model, folder / TOKENIZER_FILE)
        tokenizer = M2Tokenizer(str(folder / TOKENIZER_FILE), config.max_text_length)
    M2Processor(tokenizer, M2ImageProcessor(config.image_size)).save_pretrained(str(folder))


def save_hf_folder(model: M2EncoderModel, folder: Union[str, Path], tokenizer_model: Optional[str] = None,
                   max_shard_size: Union[int, str] = "5GB") -> Path:
    """save_pretrained (safetensors, sharded above max_shard_size) + remote code + processor files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_remote_code(folder, model.config)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    write_processor(folder, model.config, tokenizer_model)
    return folder
