"""Write a self-contained Hugging Face folder: config.json with auto_map, (sharded) safetensors, remote code, the
image processor (preprocessor_config.json) and, with a tokenizer model, tokenizer.model + tokenizer_config.json +
processor_config.json, so AutoModel / AutoProcessor / AutoTokenizer / AutoImageProcessor (trust_remote_code=True)
load it with transformers, torch, sentencepiece and Pillow only."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

from megatron_m2.errors import ConfigError
from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.hf.modeling_m2 import M2EncoderModel

HF_DIR = Path(__file__).parent
REMOTE_CODE = ("configuration_m2.py", "modeling_m2.py", "processing_m2.py", "tokenization_m2.py",
               "image_processing_m2.py")
AUTO_MAP = {"AutoConfig": "configuration_m2.M2EncoderConfig", "AutoModel": "modeling_m2.M2EncoderModel"}
TOKENIZER_FILE = "tokenizer.model"


def write_remote_code(folder: Union[str, Path], config: M2EncoderConfig) -> None:
    """Copy the modeling code and point auto_map at it, so AutoModel works without megatron_m2 installed."""
    folder = Path(folder)
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, folder / name)
    config.auto_map = dict(AUTO_MAP)


def image_processor_for(config: M2EncoderConfig):
    """The image processor of the model's saved preprocessing (resize mode, size, interpolation, mean/std)."""
    from megatron_m2.hf.image_processing_m2 import M2ImageProcessor

    try:
        return M2ImageProcessor.for_model(config.image_size, config.image_resize_mode, config.image_interpolation,
                                          config.image_mean, config.image_std)
    except ValueError as exc:
        raise ConfigError(f"model config: {exc}") from exc


def write_processor(folder: Union[str, Path], config: M2EncoderConfig,
                    tokenizer_model: Optional[Union[str, Path]] = None) -> None:
    """preprocessor_config.json always; with a tokenizer model also the tokenizer files and processor_config.json."""
    folder = Path(folder)
    image_processor = image_processor_for(config)
    if tokenizer_model is None:
        image_processor.save_pretrained(str(folder))
        return
    from megatron_m2.hf.processing_m2 import M2Processor
    from megatron_m2.hf.tokenization_m2 import M2Tokenizer

    if not Path(tokenizer_model).is_file():
        raise ConfigError(f"--tokenizer-model {tokenizer_model} does not exist")
    if Path(tokenizer_model).resolve() != (folder / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_model, folder / TOKENIZER_FILE)
    try:
        tokenizer = M2Tokenizer(str(folder / TOKENIZER_FILE), model_max_length=config.max_text_length)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer-model {tokenizer_model}: {exc}") from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"--tokenizer-model {tokenizer_model} has {tokenizer.vocab_size} pieces, the model's "
                          f"vocab_size is {config.vocab_size}: pass the tokenizer the model was trained with")
    M2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))


def save_hf_folder(model: M2EncoderModel, folder: Union[str, Path], tokenizer_model: Optional[str] = None,
                   max_shard_size: Union[int, str] = "5GB") -> Path:
    """save_pretrained (safetensors, sharded above max_shard_size) + remote code + processor files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_remote_code(folder, model.config)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    write_processor(folder, model.config, tokenizer_model)
    return folder
